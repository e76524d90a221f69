"""The HTTP API as a whole (colaft.serve.api), through the real server: a user reaches only its
own objects (another's id answers like a missing one), bad input answers in OpenAI's error
shape and changes nothing, and status calls stay fast while the engine trains.
"""
from __future__ import annotations

import statistics
import time

import openai
import pytest
from serve_helpers import CHAT, REVIEWS, jsonl, upload, wait_job
from tiny_models import QA


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
        assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
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
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error", error
            assert error["param"] == param and param.split(".")[-1] in error["message"], (body, error)
        r = job(training_file="file-nope")
        assert r.status_code == 404 and r.json()["error"]["param"] == "training_file"
        r = h.post("/v1/fine_tuning/jobs", json={"model": "bert", "training_file": f})
        assert r.status_code == 400 and "trains on text/label classification" in r.json()["error"]["message"]
        r = h.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = h.post("/v1/chat/completions", json={"model": "llama", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"

        assert h.get("/v1/files").json()["data"] == files_before
        assert h.get("/v1/fine_tuning/jobs").json()["data"] == jobs_before
    with pytest.raises(openai.BadRequestError) as e:
        alice.fine_tuning.jobs.create(model="llama", training_file=f, hyperparameters={"n_epochs": 51})
    assert "n_epochs" in str(e.value)


def test_status_calls_stay_fast_while_training(server, alice):
    f = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id,
                                        hyperparameters={"n_epochs": 50, "batch_size": 1})
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
