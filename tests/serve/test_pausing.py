"""Pausing and resuming jobs (POST /v1/fine_tuning/jobs/{id}/pause and /resume), through the real
server: a paused job takes no step while the other jobs go on, and once resumed ends with the
adapters of a run that never paused, bit for bit (after a restart too, from the checkpoint taken
at the pause); a client-fit job pauses and resumes under its running client; the 400s; and a
paused job counts against the active-job quota.

One server for the module (tiny Llama, inline backend, one torch thread): two runs of the same
job alone on it compute the same sums in the same order, so their adapters are equal, not
merely close.
"""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import CHAT, Server, adapter, add_user, assert_same, upload, wait_for, wait_job

from colaft.client import Client

HYPER = {"n_epochs": 12, "batch_size": 4, "learning_rate_multiplier": 5}  # 12 rows: 36 steps
QUOTA = 2  # --max-active-jobs-per-user


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data = tmp_path_factory.mktemp("pausing") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob", "carol")}
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--backend", "inline", "--client-timeout", "3",
                 "--max-active-jobs-per-user", str(QUOTA)).start()
    srv.keys = keys
    srv.openai = {name: srv.client(key) for name, key in keys.items()}
    yield srv
    srv.stop()


def create(srv, user: str, hyper=HYPER, seed: int = 5, **colaft):
    client = srv.openai[user]
    return client.fine_tuning.jobs.create(model="llama", training_file=upload(client, CHAT).id,
                                          hyperparameters=hyper, seed=seed, extra_body={"colaft": colaft})


def steps(srv, user: str, job_id: str) -> list[int]:
    """The steps the job has taken, oldest first."""
    events = srv.openai[user].fine_tuning.jobs.list_events(job_id, limit=10000).data
    return [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data][::-1]


def messages(srv, user: str, job_id: str) -> list[str]:
    return [e.message for e in srv.openai[user].fine_tuning.jobs.list_events(job_id, limit=10000).data][::-1]


def pause_at(srv, user: str, job_id: str, step: int):
    """Pause the job once it has taken `step` steps (with the openai package's call); the job as answered."""
    wait_for(lambda: len(steps(srv, user, job_id)) >= step, 120, 0.05)
    return srv.openai[user].fine_tuning.jobs.pause(job_id)


def post(srv, user: str, job_id: str, action: str) -> httpx.Response:
    with srv.http(srv.keys[user]) as h:
        return h.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")


def stays_paused(srv, user: str, job_id: str, seconds: float = 1.5) -> int:
    """The job takes no step for `seconds` (once the step in flight at the pause is recorded); its step."""
    time.sleep(0.5)
    before = steps(srv, user, job_id)
    time.sleep(seconds)
    assert steps(srv, user, job_id) == before
    assert srv.openai[user].fine_tuning.jobs.retrieve(job_id).status == "paused"
    return len(before)


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it did train


@pytest.fixture(scope="module")
def reference(server):
    """HYPER's job with seed 5, trained alone without a pause."""
    job = wait_job(server.openai["alice"], create(server, "alice").id)
    assert job.status == "succeeded", job.error
    return adapter(server, "alice", job.id)


def test_a_paused_job_resumes_where_it_stopped_bit_for_bit(server, reference):
    job = create(server, "alice")
    paused = pause_at(server, "alice", job.id, 4)
    assert (paused.id, paused.status) == (job.id, "paused")
    at = stays_paused(server, "alice", job.id)
    assert 4 <= at < 36
    assert server.openai["alice"].fine_tuning.jobs.resume(job.id).status == "running"
    done = wait_job(server.openai["alice"], job.id)
    assert done.status == "succeeded", done.error
    assert steps(server, "alice", job.id) == list(range(1, 37))  # every step once
    events = messages(server, "alice", job.id)
    assert events.index("Job paused") < events.index("Job resumed") < events.index("The job has successfully completed")
    assert f"job {job.id} paused at step {at}" in server.log_text()  # and checkpointed there
    assert_equal(adapter(server, "alice", job.id), reference)


def test_the_other_jobs_go_on_while_one_is_paused(server, reference):
    paused = create(server, "alice")
    assert pause_at(server, "alice", paused.id, 2).status == "paused"
    other = create(server, "bob", {**HYPER, "n_epochs": 4})  # started after the pause: it steps alone
    done = wait_job(server.openai["bob"], other.id)
    assert done.status == "succeeded", done.error
    at = stays_paused(server, "alice", paused.id, 0.5)
    assert at < 36 and steps(server, "bob", other.id) == list(range(1, 13))
    assert post(server, "alice", paused.id, "resume").status_code == 200
    assert wait_job(server.openai["alice"], paused.id).status == "succeeded"
    assert_same(adapter(server, "alice", paused.id), reference)


def test_pause_and_resume_answer_400_when_the_job_is_not_in_that_state(server):
    job = create(server, "alice", {**HYPER, "n_epochs": 50, "batch_size": 1}, seed=8)  # 600 steps: still running
    r = post(server, "alice", job.id, "resume")  # queued or running: not paused
    assert r.status_code == 400 and r.json()["error"]["code"] == "job_not_paused", r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert post(server, "bob", job.id, "pause").status_code == 404  # someone else's job
    assert post(server, "alice", "ftjob-nope", "pause").status_code == 404
    r = post(server, "alice", job.id, "pause")
    assert r.status_code == 200, r.text
    r = post(server, "alice", job.id, "pause")
    assert r.status_code == 400 and r.json()["error"]["code"] == "job_paused"
    assert server.openai["alice"].fine_tuning.jobs.cancel(job.id).status == "cancelled"  # a paused job cancels
    for action, code in [("pause", "job_finished"), ("resume", "job_not_paused")]:
        r = post(server, "alice", job.id, action)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["param"] == "job_id"
    events = [m for m in messages(server, "alice", job.id) if not m.startswith("Step ")]  # the step in flight
    assert events[-2:] == ["Job paused", "Fine-tuning job cancelled"]
    short = wait_job(server.openai["alice"], create(server, "alice", {**HYPER, "n_epochs": 1}).id)
    r = post(server, "alice", short.id, "pause")
    assert r.status_code == 400 and "succeeded" in r.json()["error"]["message"]


def test_a_paused_job_counts_against_the_active_job_quota(server):
    jobs = [create(server, "carol", seed=s) for s in range(QUOTA)]
    assert post(server, "carol", jobs[0].id, "pause").status_code == 200
    with server.http(server.keys["carol"]) as h:
        r = h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": jobs[0].training_file})
    assert r.status_code == 429 and "queued, running or paused" in r.json()["error"]["message"], r.text
    for job in jobs:
        server.openai["carol"].fine_tuning.jobs.cancel(job.id)


def test_a_client_fit_job_pauses_under_its_client_and_resumes(server):
    hyper = {**HYPER, "n_epochs": 6}  # 18 steps
    job = create(server, "bob", hyper, fit="client")
    summary = []
    fitting = threading.Thread(target=lambda: summary.append(
        Client(server.url, server.keys["bob"], job.id, wait=1, quiet=True).run()))
    fitting.start()
    try:
        assert pause_at(server, "bob", job.id, 3).status == "paused"
        at = stays_paused(server, "bob", job.id, 4.0)  # past --client-timeout: the polling client is there
        assert fitting.is_alive() and at < 18
        with server.http(server.keys["bob"]) as h:  # nothing new for a poll while paused
            r = h.get(f"/v1/fine_tuning/jobs/{job.id}/fit/packets", params={"after": at, "wait": 1})
        assert r.status_code == 204, r.text
        assert post(server, "bob", job.id, "resume").status_code == 200
        fitting.join(120)
    finally:
        if fitting.is_alive():
            server.openai["bob"].fine_tuning.jobs.cancel(job.id)
            fitting.join(30)
    assert summary and summary[0].status == "succeeded", summary
    assert summary[0].messages == 18 and summary[0].resyncs == 0 and summary[0].duplicates == 0
    assert steps(server, "bob", job.id) == list(range(1, 19))
    assert not any("Waiting for the fit client" in m for m in messages(server, "bob", job.id))
    alone = wait_job(server.openai["bob"], create(server, "bob", hyper).id)  # its fits on the server
    assert_same(adapter(server, "bob", job.id), adapter(server, "bob", alone.id))


def test_a_job_paused_before_a_restart_stays_paused_and_resumes_from_its_checkpoint(server, reference):
    """Last in the module: the module's server is killed and started again (on a new port)."""
    job = create(server, "alice")
    assert pause_at(server, "alice", job.id, 5).status == "paused"
    at = stays_paused(server, "alice", job.id, 0.5)
    wait_for(lambda: f"job {job.id} paused at step {at}" in server.log_text())  # checkpointed
    server.stop(signal.SIGKILL)  # nothing more is saved: the pause's checkpoint is what comes back
    server.start()
    server.openai = {name: server.client(key) for name, key in server.keys.items()}
    assert stays_paused(server, "alice", job.id, 1.0) == at
    assert post(server, "alice", job.id, "resume").status_code == 200
    assert wait_job(server.openai["alice"], job.id).status == "succeeded"
    assert steps(server, "alice", job.id) == list(range(1, 37))
    assert_equal(adapter(server, "alice", job.id), reference)
