"""Jobs whose fits run on the user's device: `colaft client` against the real `colaft serve`.

One server (tiny Llama, inline backend, a 3 s client timeout) for the module. The reference
of every exactness check is the same job (same file, seed and hyperparameters) with its fits
on the server's backend: synchronous staleness 0 gives the same adapter to round-off.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from serve_helpers import CHAT, REPO, Server, adapter, add_user, assert_same, upload, wait_for, wait_job

from colaft.client import Client, build_owner
from colaft.io.tensors import state_from_bytes, state_to_bytes
from colaft.packets import packets_from_bytes

HYPER = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5}  # 12 rows: 6 steps
TIMEOUT = 3.0  # --client-timeout of the test server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data = tmp_path_factory.mktemp("remote") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--backend", "inline", "--client-timeout", str(TIMEOUT),
                 "--max-polls-per-key", "64").start()  # 48 at once in test_waiting_clients_...
    srv.keys = keys
    srv.openai = {name: srv.client(key) for name, key in keys.items()}
    yield srv
    srv.stop()


def create(server, user: str, fit: str = "server", hyper=HYPER, seed: int = 5, **colaft):
    client = server.openai[user]
    f = upload(client, CHAT, f"{user}.jsonl")
    return client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters=hyper, seed=seed,
                                          extra_body={"colaft": {"fit": fit, **colaft}})


def messages(server, user: str, job_id: str) -> list[str]:
    return [e.message for e in server.openai[user].fine_tuning.jobs.list_events(job_id, limit=1000)][::-1]


def start_client(server, user: str, job_id: str) -> subprocess.Popen:
    """`colaft client` in its own process (group), as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLAFT_API_KEY": server.keys[user]}
    return subprocess.Popen([sys.executable, "-c", "import sys; from colaft.app.cli import main; sys.exit(main())",
                             "client", "--server", server.url, "--job", job_id, "--wait", "2"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def reference(server):
    """The job with its fits on the server (inline backend), trained once for the module."""
    job = wait_job(server.openai["alice"], create(server, "alice").id, 120)
    assert job.status == "succeeded", job.error
    return adapter(server, "alice", job.id)


def test_client_fit_job_equals_server_fit_job(server, reference):
    job = create(server, "alice", "client")
    assert job.model_extra["colaft"]["fit"] == "client"
    proc = start_client(server, "alice", job.id)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"job {job.id}: succeeded, model ft:llama:{job.id}" in out
    assert "6 messages fitted into versions 0..6 (6 updates pushed, 0 duplicates skipped, 0 resyncs)" in out
    assert wait_job(server.openai["alice"], job.id).status == "succeeded"
    assert_same(adapter(server, "alice", job.id), reference)
    events = messages(server, "alice", job.id)
    assert any("colaft client --job" in m for m in events)
    assert any(m.startswith("The fit client connected") for m in events)


def test_interval_and_staleness_on_the_client(server):
    """I = 4 over 6 steps (a flush at the end) and S = 1: the Python API's Client finishes the job."""
    job = create(server, "alice", "client", seed=9, interval=4, staleness=1)
    summary = Client(server.url, server.keys["alice"], job.id, wait=2, quiet=True).run()
    assert summary.status == "succeeded" and summary.messages == 7 and summary.updates == 2  # 6 pushes + flush
    assert wait_job(server.openai["alice"], job.id).status == "succeeded"


def test_server_fit_job_goes_on_while_the_client_job_waits_and_the_client_resumes(server, reference):
    """Two users: bob's client-fit job (client SIGKILLed mid-job, restarted later) and alice's
    server-fit job, which never waits for bob's client. Bob's adapter is the undisturbed one."""
    long_hyper = {**HYPER, "n_epochs": 4}  # 12 steps
    bob_job = create(server, "bob", "client", hyper=long_hyper)
    proc = start_client(server, "bob", bob_job.id)
    wait_for(lambda: any(e.type == "metrics" and e.data["step"] >= 3
                         for e in server.openai["bob"].fine_tuning.jobs.list_events(bob_job.id, limit=100)), 60, 0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-job, possibly mid-fit or mid-push
    proc.wait(10)
    step_at_kill = _last_step(server, bob_job.id)
    alice_job = create(server, "alice", hyper=long_hyper, seed=6)  # server fits, started while bob's waits
    done = wait_job(server.openai["alice"], alice_job.id, 120)
    assert done.status == "succeeded", done.error
    wait_for(lambda: "Waiting for the fit client" in " ".join(messages(server, "bob", bob_job.id)), 30)
    assert server.openai["bob"].fine_tuning.jobs.retrieve(bob_job.id).status == "running"
    assert _last_step(server, bob_job.id) <= step_at_kill + 1  # S = 0: at most the step in flight ran

    proc = start_client(server, "bob", bob_job.id)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert wait_job(server.openai["bob"], bob_job.id).status == "succeeded"
    events = messages(server, "bob", bob_job.id)
    assert "The fit client is back: training resumes" in events
    steps = [e.data["step"] for e in server.openai["bob"].fine_tuning.jobs.list_events(bob_job.id, limit=1000)
             if e.type == "metrics"][::-1]
    assert steps == list(range(1, 13))  # every step once
    undisturbed = create(server, "bob", "client", hyper=long_hyper)
    assert Client(server.url, server.keys["bob"], undisturbed.id, wait=2, quiet=True).run().status == "succeeded"
    assert_same(adapter(server, "bob", bob_job.id), adapter(server, "bob", undisturbed.id))


def _last_step(server, job_id: str) -> int:
    return max((e.data["step"] for e in server.openai["bob"].fine_tuning.jobs.list_events(job_id, limit=100)
                if e.type == "metrics"), default=0)


def test_duplicate_and_stale_pushes_are_refused_and_not_applied(server, reference):
    job = create(server, "alice", "client")
    with server.http(server.keys["alice"]) as h:
        base = f"/v1/fine_tuning/jobs/{job.id}/fit"
        r = wait_for(lambda: (r := h.get(base + "/state")).status_code == 200 and r)
        state, meta = state_from_bytes(r.content)
        assert (meta["version"], meta["seq"]) == (0, 0)
        owner = build_owner(job.id, meta, state)
        r = h.get(base + "/packets", params={"after": 0, "wait": 10})
        assert r.status_code == 200
        update = owner.push(packets_from_bytes(r.content))
        first = state_to_bytes(owner.state(), {"version": 1, "seq": 1})
        assert h.post(base + "/updates", content=first).status_code == 200
        for body, code in [(first, "duplicate_update"),  # the same push again
                           (state_to_bytes(state, {"version": 0, "seq": 1}), "duplicate_update"),  # older
                           (state_to_bytes({**owner.state(), "version": 3}, {"version": 3, "seq": 1}),
                            "unexpected_update"),  # skips versions
                           (state_to_bytes({**owner.state(), "version": 2}, {"version": 2, "seq": 1}),
                            "unexpected_update")]:  # message 1 is answered already
            r = h.post(base + "/updates", content=body)
            assert r.status_code == 409 and r.json()["error"]["code"] == code, r.text
        assert h.post(base + "/updates", content=b"not safetensors").status_code == 400
        _, meta = state_from_bytes(h.get(base + "/state").content)
        assert (meta["version"], meta["seq"]) == (1, 1)  # applied once
        assert update.version == 1
    # the real client takes over from version 1 and ends with the reference adapter
    summary = Client(server.url, server.keys["alice"], job.id, wait=2, quiet=True).run()
    assert summary.status == "succeeded" and (summary.start_version, summary.version) == (1, 6)
    assert_same(adapter(server, "alice", job.id), reference)


def test_only_the_owner_pulls_and_pushes(server):
    job = create(server, "alice", "client", seed=11)
    base = f"/v1/fine_tuning/jobs/{job.id}/fit"
    with server.http(server.keys["bob"]) as h:
        for method, path in [("GET", "/state"), ("GET", "/packets?after=0&wait=0"), ("POST", "/updates")]:
            r = h.request(method, base + path, content=b"x" if method == "POST" else None)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    for key in (None, "sk-colaft-wrong"):
        with server.http(key) as h:
            for method, path in [("GET", "/state"), ("GET", "/packets?after=0"), ("POST", "/updates")]:
                assert h.request(method, base + path).status_code == 401
    with pytest.raises(ValueError, match="404"):  # the CLI says so and exits non-zero
        from colaft.client import ClientError
        try:
            Client(server.url, server.keys["bob"], job.id, quiet=True).run()
        except ClientError as e:
            raise ValueError(str(e)) from None
    server.openai["alice"].fine_tuning.jobs.cancel(job.id)
    server_job = create(server, "alice", seed=12)  # a server-fit job has no fit endpoints
    with server.http(server.keys["alice"]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{server_job.id}/fit/state")
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_a_client_job"
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": server_job.training_file,
                                                 "colaft": {"staleness": 2}})
        assert r.status_code == 400 and "client-fit" in r.json()["error"]["message"]


def test_waiting_clients_do_not_hold_up_other_requests(server):
    """More long polls of one key waiting at once than the server's 40 handler threads: a status
    call still answers at once."""
    import concurrent.futures
    import time

    job = create(server, "alice", "client", seed=13)
    base = f"/v1/fine_tuning/jobs/{job.id}/fit/packets"
    with server.http(server.keys["alice"]) as h:
        wait_for(lambda: h.get(base, params={"after": 0, "wait": 10}).status_code == 200)  # step 1's packets
    polls = 48

    def poll(_):  # S = 0: no step 2 before step 1's update, so each waits its 4 s
        with server.http(server.keys["alice"]) as h:
            return h.get(base, params={"after": 1, "version": 0, "wait": 4}).status_code
    with concurrent.futures.ThreadPoolExecutor(polls) as pool:
        waiting = [pool.submit(poll, i) for i in range(polls)]
        time.sleep(1.0)  # every poll is in
        t = time.perf_counter()
        assert server.openai["alice"].fine_tuning.jobs.retrieve(job.id).status == "running"
        seconds = time.perf_counter() - t
        assert [f.result() for f in waiting] == [204] * polls
    assert seconds < 2.0, seconds  # not behind the polls' 4 s
    server.openai["alice"].fine_tuning.jobs.cancel(job.id)


def test_the_client_waits_out_a_429s_retry_after_and_tries_again():
    """A server that answers 429 (a quota of requests or of polls) with Retry-After once: the
    client waits that long and asks again, instead of taking the error for an answer."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((time.monotonic(), self.path))
            if len(asked) == 1:
                status, headers = 429, {"Retry-After": "2"}
                body = {"error": {"message": "Too many requests: retry after 2 s", "type": "rate_limit_exceeded",
                                  "param": None, "code": "quota_exceeded"}}
            else:
                status, headers, body = 200, {}, {"status": "succeeded", "fine_tuned_model": "ft:llama:job"}
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        summary = Client(f"http://127.0.0.1:{httpd.server_address[1]}", "sk-colaft-x", "job", quiet=True,
                         patience=1).run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary.status == "succeeded" and summary.fine_tuned_model == "ft:llama:job"
    assert [path for _, path in asked] == ["/v1/fine_tuning/jobs/job/fit/state"] * 2
    assert asked[1][0] - asked[0][0] >= 2.0  # it waited as long as it was told (past its patience of 1 s)
