"""Models by id (GET and DELETE /v1/models/{id}) and checkpoints as models, through the real
server (conftest.py's): a user reads its own models and nobody else's, a checkpoint answers
with the adapters saved at its step, and a deleted model stops answering while its job stays.
"""
from __future__ import annotations

import openai
import pytest
from serve_helpers import CHAT, upload, wait_for, wait_job

HYPER = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 20}  # 12 rows: 9 steps
NOT_FOUND = {"type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def train(client, **colaft):
    job = client.fine_tuning.jobs.create(model="llama", training_file=upload(client, CHAT).id, hyperparameters=HYPER,
                                         extra_body={"colaft": colaft})
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    return job


def get(server, user: str, model: str):
    with server.http(server.keys[user]) as h:
        return h.get(f"/v1/models/{model}")


def delete(server, user: str, model: str):
    with server.http(server.keys[user]) as h:
        return h.delete(f"/v1/models/{model}")


def assert_not_found(r, model: str) -> None:
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert {k: error[k] for k in NOT_FOUND} == NOT_FOUND and model in error["message"]
    assert error["message"] == f"The model {model!r} does not exist or you do not have access to it"


def ask(client, model: str, question: str = "who are you"):
    """The greedy answer's tokens and their logprobs."""
    choice = client.chat.completions.create(model=model, max_tokens=4, logprobs=True,
                                            messages=[{"role": "user", "content": question}]).choices[0]
    return [(t.token, t.logprob) for t in choice.logprobs.content]


def test_a_model_is_read_by_id_by_its_owner_only(server, alice, bob):
    base = alice.models.retrieve("llama")
    assert (base.id, base.object, base.owned_by) == ("llama", "model", "colaft") and base.created > 0
    assert_not_found(get(server, "alice", "gpt-nope"), "gpt-nope")
    job = train(alice)
    model = alice.models.retrieve(job.fine_tuned_model)
    assert (model.id, model.object, model.owned_by, model.created) == \
        (job.fine_tuned_model, "model", job.organization_id, job.finished_at)
    checkpoints = list(alice.fine_tuning.jobs.checkpoints.list(job.id))
    names = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert names == [f"{job.fine_tuned_model}:ckpt-step-{s}" for s in (9, 6, 3)]
    for c in checkpoints:
        m = alice.models.retrieve(c.fine_tuned_model_checkpoint)
        assert (m.id, m.owned_by, m.created) == (c.fine_tuned_model_checkpoint, job.organization_id, c.created_at)
    mine, theirs = ({m.id for m in client.models.list()} for client in (alice, bob))
    assert {"llama", "bert", job.fine_tuned_model, *names} <= mine
    for name in (job.fine_tuned_model, *names):  # someone else's model answers as a missing one
        assert name not in theirs
        assert_not_found(get(server, "bob", name), name)
    for name in (f"{job.fine_tuned_model}:ckpt-step-4",  # not a listed checkpoint
                 f"{job.fine_tuned_model}:ckpt-step-09", f"ft:bert:{job.id}", f"ft:llama:other:{job.id}"):
        assert_not_found(get(server, "alice", name), name)


def test_a_checkpoint_answers_with_the_adapters_of_its_step(server, alice):
    job = train(alice)
    last, _, first = [c.fine_tuned_model_checkpoint for c in alice.fine_tuning.jobs.checkpoints.list(job.id)]
    final = ask(alice, job.fine_tuned_model)
    assert ask(alice, last) == final  # the checkpoint at the last step holds the final adapters
    assert ask(alice, first) != final and ask(alice, first) != ask(alice, "llama")  # its own: after 3 steps
    completion = alice.completions.create(model=first, prompt="who are you", max_tokens=3)
    assert completion.model == first and completion.choices[0].finish_reason in ("stop", "length")
    # a collaborative job's model is the mean of every collaborative delta: its checkpoints are no models
    collaborative = train(alice, mode="collaborative")
    name = list(alice.fine_tuning.jobs.checkpoints.list(collaborative.id))[0].fine_tuned_model_checkpoint
    assert_not_found(get(server, "alice", name), name)
    assert name not in {m.id for m in alice.models.list()}
    with pytest.raises(openai.NotFoundError):
        ask(alice, name)


def test_deleting_a_model_unloads_and_removes_its_adapters_and_keeps_its_job(server, alice, bob):
    job = train(alice)
    model = job.fine_tuned_model
    checkpoint = list(alice.fine_tuning.jobs.checkpoints.list(job.id))[0]
    answer = ask(alice, model)  # loaded in the engine
    assert_not_found(delete(server, "bob", model), model)
    r = delete(server, "alice", "llama")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_deletable", r.text
    assert "base model" in r.json()["error"]["message"]

    deleted = alice.models.delete(model)
    assert (deleted.id, deleted.object, deleted.deleted) == (model, "model", True)
    folder = server.data_dir / "jobs" / job.id
    wait_for(lambda: not (folder / "adapter").exists() and not (folder / "peft").exists(), 30)
    # unloaded from the engine (its log line comes after the folders are gone)
    wait_for(lambda: f"the adapters of {job.id} are deleted" in server.log_text(), 30)
    assert_not_found(get(server, "alice", model), model)
    with pytest.raises(openai.NotFoundError) as e:
        ask(alice, model)
    assert e.value.body["code"] == "model_not_found"
    assert model not in {m.id for m in alice.models.list()}
    kept = alice.fine_tuning.jobs.retrieve(job.id)
    assert (kept.status, kept.fine_tuned_model) == ("succeeded", model)
    assert any(e.message == f"Fine-tuned model deleted: {model}" for e in alice.fine_tuning.jobs.list_events(job.id))
    with server.http(server.keys["alice"]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{job.id}/adapter?format=colaft")
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_deleted"
    assert_not_found(delete(server, "alice", model), model)  # once

    # its checkpoints are models of their own: the last one still answers as the model did
    assert ask(alice, checkpoint.fine_tuned_model_checkpoint) == answer
    assert alice.models.delete(checkpoint.fine_tuned_model_checkpoint).deleted
    assert_not_found(get(server, "alice", checkpoint.fine_tuned_model_checkpoint),
                     checkpoint.fine_tuned_model_checkpoint)
    assert [c.step_number for c in alice.fine_tuning.jobs.checkpoints.list(job.id)] == [6, 3]
    wait_for(lambda: not any((folder / "checkpoints").glob("step-0000009")), 30)


def test_the_model_of_a_job_not_finished_cannot_be_deleted(server, alice):
    job = alice.fine_tuning.jobs.create(model="llama", training_file=upload(alice, CHAT).id,
                                        hyperparameters={"n_epochs": 50, "batch_size": 1})  # 600 steps
    name = f"ft:llama:{job.id}"
    assert_not_found(get(server, "alice", name), name)  # no model yet
    r = delete(server, "alice", name)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert "cancel it first" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
    alice.fine_tuning.jobs.cancel(job.id)
    assert_not_found(delete(server, "alice", name), name)  # cancelled: it never had a model


def test_completions_racing_the_deletion_of_their_model_answer_200_or_404(server, alice):
    """Completions queued for the engine when the model's deletion reaches it: each answers
    (the adapters were still there) or is a 404 model_not_found, never a server error."""
    import threading

    model = train(alice).fine_tuned_model
    statuses, stop = [], threading.Event()

    def hammer():
        with server.http(server.keys["alice"]) as h:
            while not stop.is_set():
                r = h.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
                statuses.append(r.status_code)
                if r.status_code not in (200, 404):
                    stop.set()

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: statuses.count(200) >= 12, 60)
    assert alice.models.delete(model).deleted
    wait_for(lambda: statuses.count(404) >= 12 or stop.is_set(), 60)
    stop.set()
    for t in threads:
        t.join()
    assert set(statuses) == {200, 404}, sorted(set(statuses))
