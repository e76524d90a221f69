"""`colaft serve` end to end: the real server on a free loopback port, the openai package and httpx as clients.

Tiny random models (tiny_models.py) keep a job to a second or two. The server, its users and
the waiting are in serve_helpers.py (shared with the PostgreSQL and Ray tests).
"""
from __future__ import annotations

import io
import signal
import statistics
import threading
import time
import zipfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from serve_helpers import CHAT, REVIEWS, Server, add_user, jsonl, upload, wait_for, wait_job
from tiny_models import BAD, GOOD, QA


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    data = tmp_path_factory.mktemp("serve") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"llama={tiny_llama_dir}", f"bert={tiny_bert_dir}"], "--max-upload-mb", "0.25",
                 "--checkpoint-every", "4").start()
    srv.keys = keys
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server):
    return server.client(server.keys["alice"])


@pytest.fixture(scope="module")
def bob(server):
    return server.client(server.keys["bob"])


# ------------------------------------------------------------------ users and keys

def test_users_cli_prints_the_key_once_and_stores_only_its_hash(server, capsys):
    from colaft.app.cli import main

    assert main(["users", "add", "carol", "--data-dir", str(server.data_dir)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("sk-colaft-") and len(key) > 40 and "carol" in err and key not in err
    assert main(["users", "add", "carol", "--data-dir", str(server.data_dir)]) == 1  # a name is taken once
    assert "already exists" in capsys.readouterr().err
    # the running server takes the new key at once; the database holds no key in clear text
    assert server.client(key).models.list().data
    for path in server.data_dir.glob("colaft.db*"):
        assert key.encode() not in path.read_bytes()
    assert main(["users", "list", "--data-dir", str(server.data_dir)]) == 0
    listed = capsys.readouterr().out
    assert "carol" in listed and "sk-colaft" not in listed


def test_missing_or_wrong_key_answers_401(server):
    for key in (None, "sk-colaft-wrong", server.keys["alice"] + "x"):
        with server.http(key) as h:
            for method, path in [("GET", "/v1/files"), ("GET", "/v1/fine_tuning/jobs"), ("GET", "/v1/models"),
                                 ("POST", "/v1/chat/completions")]:
                r = h.request(method, path, json={} if method == "POST" else None)
                assert r.status_code == 401, (key, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-colaft-nope").files.list()
    with server.http(None) as h:
        r = h.get("/v1/files", headers={"Authorization": f"Basic {server.keys['alice']}"})
        assert r.status_code == 401


# ------------------------------------------------------------------ training: two users at once

def test_two_users_train_concurrently_on_one_base_model(server, alice, bob, tiny_llama_dir, tmp_path):
    fa, fb = upload(alice, CHAT, "alice.jsonl"), upload(bob, CHAT[::-1], "bob.jsonl")
    assert (fa.purpose, fa.status, fa.bytes) == ("fine-tune", "processed", len(jsonl(CHAT)))
    hyper = {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 5}
    # bob's job is running (and longer) when alice's starts: all of alice's steps share bob's batches
    jb = bob.fine_tuning.jobs.create(model="llama", training_file=fb.id, seed=3,
                                     method={"type": "supervised", "supervised": {"hyperparameters": {
                                         **hyper, "n_epochs": 40}}},
                                     extra_body={"colaft": {"adapter": "linear", "targets": ["q_proj", "o_proj"]}})
    wait_job(bob, jb.id, 60, until=("running",))
    ja = alice.fine_tuning.jobs.create(model="llama", training_file=fa.id, hyperparameters=hyper, seed=7)
    assert ja.status == "queued" and ja.hyperparameters.n_epochs == 4 and ja.hyperparameters.batch_size == 4
    ja, jb = wait_job(alice, ja.id), wait_job(bob, jb.id)
    assert (ja.status, jb.status) == ("succeeded", "succeeded"), (ja.error, jb.error)
    assert ja.fine_tuned_model == f"ft:llama:{ja.id}" and ja.trained_tokens > 0 and ja.finished_at
    # one server step for both jobs: the engine logs the jobs per step (no ids, no data)
    assert " 2 jobs, 8 rows, personal mode" in server.log_text()

    events = list(alice.fine_tuning.jobs.list_events(ja.id, limit=100))
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics][::-1] == list(range(1, 13))  # newest first
    assert events[0].message == "The job has successfully completed"
    assert all(isinstance(e.data["train_loss"], float) for e in metrics)
    checkpoints = list(alice.fine_tuning.jobs.checkpoints.list(ja.id))
    assert [c.step_number for c in checkpoints] == [12, 9, 6]  # the last three epochs, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{ja.fine_tuned_model}:ckpt-step-12"
    results = alice.files.content(ja.result_files[0]).text.splitlines()
    assert results[0] == "step,train_loss" and len(results) == 13
    assert {m.id for m in alice.models.list()} >= {"llama", "bert", ja.fine_tuned_model}
    assert jb.fine_tuned_model not in {m.id for m in alice.models.list()}

    # The same job trained alone on the idle server ends with the same adapter: sharing
    # batches with bob's job changed nothing for alice's.
    again = alice.fine_tuning.jobs.create(model="llama", training_file=fa.id, hyperparameters=hyper, seed=7)
    assert wait_job(alice, again.id).status == "succeeded"
    with server.http(server.keys["alice"]) as h:
        mixed, alone = (_load_zip(h.get(f"/v1/fine_tuning/jobs/{j}/adapter?format=colaft"), tmp_path / j)
                        for j in (ja.id, again.id))
    from safetensors.torch import load_file
    a, b = load_file(mixed / "adapters.safetensors"), load_file(alone / "adapters.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert all(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # trained away from B = 0

    # The PEFT adapter loads in peft and answers as the server does.
    with server.http(server.keys["alice"]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{ja.id}/adapter")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        peft_dir = _load_zip(r, tmp_path / "peft")
        assert (peft_dir / "adapter_config.json").is_file()
        assert h.get(f"/v1/fine_tuning/jobs/{jb.id}/adapter").status_code == 404  # bob's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft_dir).eval()
    question = "who are you"
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    answer = alice.chat.completions.create(model=ja.fine_tuned_model, max_tokens=6,
                                           messages=[{"role": "user", "content": question}])
    assert answer.choices[0].message.content == tok.decode(out, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == ids.shape[1] and answer.usage.completion_tokens == len(out)


def _load_zip(response: httpx.Response, folder: Path) -> Path:
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(folder)
    return folder


def test_classification_job_and_completions(server, bob):
    f = upload(bob, REVIEWS * 2, "reviews.jsonl")
    valid = upload(bob, REVIEWS, "valid.jsonl")
    job = bob.fine_tuning.jobs.create(model="bert", training_file=f.id, validation_file=valid.id,
                                      hyperparameters={"n_epochs": 3, "batch_size": 8,
                                                       "learning_rate_multiplier": 10})
    job = wait_job(bob, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in bob.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Validation: loss=") and "accuracy=" in m for m in messages)
    for used in (f, valid):  # a finished job needs its files no more
        assert bob.files.delete(used.id).deleted
    labels = {bob.completions.create(model=job.fine_tuned_model, prompt=t).choices[0].text for t in GOOD + BAD}
    assert labels <= {"pos", "neg"}
    chat = bob.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": GOOD[0]}])
    assert chat.choices[0].message.content in {"pos", "neg"}


def test_inference_batches_rows_of_different_adapters(server, alice, bob):
    """Requests for the base model and two fine-tuned models, sent at once, answer as they do one by one."""
    jobs = []
    for client, adapter in ((alice, "lowrank"), (bob, "mlp")):
        f = upload(client, CHAT)
        jobs.append(client.fine_tuning.jobs.create(model="llama", training_file=f.id, extra_body={
            "colaft": {"adapter": adapter}}, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 20}))
    ma, mb = (wait_job(c, j.id).fine_tuned_model for c, j in zip((alice, bob), jobs))
    asks = [(alice, "llama", q) for q, _ in QA[:3]] + [(alice, ma, q) for q, _ in QA] + [(bob, mb, q) for q, _ in QA]

    def ask(client, model, question):
        return client.chat.completions.create(model=model, max_tokens=5,
                                              messages=[{"role": "user", "content": question}]
                                              ).choices[0].message.content
    one_by_one = [ask(*a) for a in asks]
    together = [None] * len(asks)

    def worker(i):
        together[i] = ask(*asks[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == one_by_one
    assert one_by_one[:3] != one_by_one[3:6] or one_by_one[:3] != one_by_one[9:12]  # the adapters do act


def test_collaborative_jobs_train_beside_personal_ones(server, alice, bob):
    """Collaborative jobs share a batch in collaborative mode; a personal job trains in its own batch meanwhile."""
    f = upload(alice, CHAT)
    g = upload(bob, CHAT)
    hyper = {"n_epochs": 3, "batch_size": 4}
    first = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={**hyper, "n_epochs": 30},
                                          extra_body={"colaft": {"mode": "collaborative"}})
    wait_job(alice, first.id, 60, until=("running",))  # still running while bob's jobs train
    jobs = [(alice, first),
            (bob, bob.fine_tuning.jobs.create(model="llama", training_file=g.id, hyperparameters=hyper,
                                               extra_body={"colaft": {"mode": "collaborative", "adapter": "linear"}})),
            (bob, bob.fine_tuning.jobs.create(model="llama", training_file=g.id, hyperparameters=hyper))]
    done = [wait_job(c, j.id) for c, j in jobs]
    assert [j.status for j in done] == ["succeeded"] * 3, [j.error for j in done]
    assert done[0].model_extra["colaft"]["mode"] == "collaborative"
    log = server.log_text()
    assert " 2 jobs, 8 rows, collaborative mode" in log and " 1 jobs, 4 rows, personal mode" in log
    for client, job in zip((alice, bob, bob), done):
        answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                                messages=[{"role": "user", "content": "who are you"}])
        assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.UnprocessableEntityError) as e:  # an mlp delta cannot be averaged
        alice.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                      extra_body={"colaft": {"mode": "collaborative", "adapter": "mlp"}})
    assert "mergeable" in str(e.value)


# ------------------------------------------------------------------ isolation

def test_a_user_sees_and_touches_only_its_own(server, alice, bob):
    f = upload(alice, CHAT, "secret-alice.jsonl")
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 1})
    # bob trains at the same time, so his events exist whatever ran before on this worker
    bobs_job = bob.fine_tuning.jobs.create(model="llama", training_file=upload(bob, CHAT, "bob.jsonl").id,
                                           hyperparameters={"n_epochs": 1})
    job = wait_job(alice, job.id)
    wait_job(bob, bobs_job.id)
    for call in (lambda: bob.files.retrieve(f.id), lambda: bob.files.content(f.id), lambda: bob.files.delete(f.id),
                 lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.fine_tuning.jobs.cancel(job.id),
                 lambda: list(bob.fine_tuning.jobs.list_events(job.id)),
                 lambda: list(bob.fine_tuning.jobs.checkpoints.list(job.id)),
                 lambda: bob.fine_tuning.jobs.create(model="llama", training_file=f.id),
                 lambda: bob.chat.completions.create(model=job.fine_tuned_model,
                                                     messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.NotFoundError):
            call()
    with server.http(server.keys["bob"]) as h:
        missing = h.get("/v1/files/file-doesnotexist").json()
        theirs = h.get(f"/v1/files/{f.id}").json()
        assert missing["error"]["message"].replace("file-doesnotexist", "X") == \
            theirs["error"]["message"].replace(f.id, "X")  # indistinguishable from a missing id
    assert f.id not in {x.id for x in bob.files.list()}
    assert job.id not in {j.id for j in bob.fine_tuning.jobs.list()}
    assert alice.files.retrieve(f.id).id == f.id  # still there for its owner
    # nothing in the log or in bob's events holds alice's key or data
    log = server.log_text()
    for secret in (*server.keys.values(), "secret-alice", QA[0][1]):
        assert secret not in log
    bobs = [e for j in bob.fine_tuning.jobs.list() for e in bob.fine_tuning.jobs.list_events(j.id, limit=1000)]
    assert bobs and not any(f.id in e.message or job.id in e.message or "alice" in e.message for e in bobs)


# ------------------------------------------------------------------ bad input changes nothing

def test_bad_input_answers_clearly_and_changes_nothing(server, alice):
    with server.http(server.keys["alice"]) as h:
        files_before = h.get("/v1/files").json()["data"]
        jobs_before = h.get("/v1/fine_tuning/jobs").json()["data"]

        def up(data: bytes, purpose="fine-tune", name="x.jsonl"):
            return h.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})
        good = jsonl(CHAT[:2])
        cases = [(good + b'{"messages": [}\n', 400, "line 3: not valid JSON"),
                 (good + b"[1, 2]\n", 400, "line 3: expected a JSON object"),
                 (jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), 400, "line 1: the last message"),
                 (jsonl([{"messages": [{"role": "robot", "content": "hi"}]}]), 400, "line 1: message 0"),
                 (jsonl(CHAT[:1] + REVIEWS[:1]), 400, "line 2: a classification record in a chat file"),
                 (jsonl([{"question": "q"}]), 400, "line 1: a record needs"),
                 (b"\n\n", 400, "no record"),
                 (b"\xff\xfe" + good, 400, "line 1: not UTF-8")]
        for data, status, text in cases:
            r = up(data)
            assert r.status_code == status and text in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == "file"
        r = up(good, purpose="assistants")
        assert r.status_code == 422 and r.json()["error"]["param"] == "purpose"
        r = up(b'{"text": "' + b"a" * 400_000 + b'", "label": "x"}\n')
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        f = up(good).json()["id"]
        reviews = up(jsonl(REVIEWS)).json()["id"]
        files_before = h.get("/v1/files").json()["data"]

        def job(**body):
            return h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": f, **body})
        for body, param in [({"model": "gpt-9"}, "model"), ({"model": "ft:llama:ftjob-x"}, "model"),
                            ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                            ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
                            ({"hyperparameters": {"learning_rate_multiplier": -1}},
                             "hyperparameters.learning_rate_multiplier"),
                            ({"hyperparameters": {"n_epochz": 2}}, "hyperparameters.n_epochz"),
                            ({"colaft": {"adapter": "huge"}}, "colaft.adapter"),
                            ({"colaft": {"rank": 0}}, "colaft.rank"),
                            ({"colaft": {"mode": "shared"}}, "colaft.mode"),
                            ({"colaft": {"targets": ["nope_proj"]}}, "colaft.targets"),
                            ({"colaft": {"fit_device": "tpu:9"}}, "colaft.fit_device"),
                            ({"training_file": reviews}, "training_file"),
                            ({"validation_file": reviews}, "validation_file"),
                            ({"surprise": 1}, "surprise")]:
            r = job(**body)
            assert r.status_code == 422, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and param.split(".")[-1] in error["message"], (body, error)
        r = job(training_file="file-nope")
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
        r = h.post("/v1/fine_tuning/jobs", json={"model": "bert", "training_file": f})
        assert r.status_code == 422 and "trains on text/label classification" in r.json()["error"]["message"]
        r = h.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = h.post("/v1/chat/completions", json={"model": "llama", "messages": []})
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages"

        assert h.get("/v1/files").json()["data"] == files_before
        assert h.get("/v1/fine_tuning/jobs").json()["data"] == jobs_before
    with pytest.raises(openai.UnprocessableEntityError) as e:
        alice.fine_tuning.jobs.create(model="llama", training_file=f, hyperparameters={"n_epochs": 5000})
    assert "n_epochs" in str(e.value)


# ------------------------------------------------------------------ cancel, and files in use

def test_cancel_and_deleting_a_file_in_use(server, alice):
    f = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 500})
    wait_job(alice, job.id, 60, until=("running",))
    with pytest.raises(openai.ConflictError) as e:
        alice.files.delete(f.id)
    assert job.id in str(e.value)
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    time.sleep(1.0)  # the engine drops the job at its next tick
    steps = len([e for e in alice.fine_tuning.jobs.list_events(job.id, limit=10000) if e.type == "metrics"])
    time.sleep(1.0)
    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=10000))
    assert len([e for e in events if e.type == "metrics"]) == steps < 1500  # no step after the cancel
    assert events[0].message == "Fine-tuning job cancelled"
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        alice.fine_tuning.jobs.cancel(job.id)
    assert alice.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)


# ------------------------------------------------------------------ the event loop stays free

def test_status_calls_stay_fast_while_training(server, alice):
    f = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 300})
    wait_job(alice, job.id, 60, until=("running",))
    seconds = []
    with server.http(server.keys["alice"]) as h:
        for _ in range(40):
            start = time.perf_counter()
            assert h.get(f"/v1/fine_tuning/jobs/{job.id}").json()["status"] == "running"
            seconds.append(time.perf_counter() - start)
    alice.fine_tuning.jobs.cancel(job.id)
    median, worst = statistics.median(seconds), max(seconds)
    print(f"\nstatus call while training: median {1000 * median:.1f} ms, max {1000 * worst:.1f} ms")
    assert median < 0.25 and worst < 2.0


# ------------------------------------------------------------------ a killed server loses nothing

def test_restart_after_sigkill_resumes_and_loses_nothing(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    key = add_user(data, "dana")
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--checkpoint-every", "5").start()
    try:
        client = srv.client(key)
        f = upload(client, CHAT)
        done = wait_job(client, client.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                                               hyperparameters={"n_epochs": 2}).id)
        done_events = [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)]
        answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                                messages=[{"role": "user", "content": "who are you"}])
        long = client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 60})
        # killed once the job has a checkpoint past its first
        wait_for(lambda: any(e.message.startswith("Step 12/") for e in
                             client.fine_tuning.jobs.list_events(long.id, limit=30).data), 120)
        before = [e.id for e in client.fine_tuning.jobs.list_events(long.id, limit=10000)]
        srv.stop(signal.SIGKILL)

        client = srv.start().client(key)  # a new port
        assert {x.id for x in client.files.list()} == {f.id, *done.result_files}
        again = client.fine_tuning.jobs.retrieve(done.id)
        assert again.status == "succeeded" and again.fine_tuned_model == done.fine_tuned_model
        assert [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)] == done_events
        assert client.chat.completions.create(
            model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "who are you"}]
        ).choices[0].message.content == answer.choices[0].message.content  # its adapters came back from disk
        finished = wait_job(client, long.id, 240)
        assert finished.status == "succeeded", finished.error
        events = list(client.fine_tuning.jobs.list_events(long.id, limit=10000))
        assert set(before) <= {e.id for e in events}  # no event lost
        resumed = [e.message for e in events if e.message.startswith("Resumed from the checkpoint at step")]
        assert len(resumed) == 1
        step = int(resumed[0].split("step ")[1].split()[0])
        assert step >= 10  # the newest checkpoint before the kill (every 5 steps), not the start
        oldest_first = events[::-1]
        resumed_at = [e.message for e in oldest_first].index(resumed[0])
        total = 60 * 2  # 12 rows in batches of 8
        assert [e.data["step"] for e in oldest_first[resumed_at:] if e.type == "metrics"] == \
            list(range(step + 1, total + 1))
    finally:
        srv.stop()
