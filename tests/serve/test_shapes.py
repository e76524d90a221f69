"""The service's answers have the reference's shapes: the openai package's types validate them
(strictly), the fields OpenAI's API reference types as non-null strings or objects hold one,
lists page as OpenAI's cursor pages, jobs keep their suffix, metadata and integrations, and an
invalid request is a 400 `invalid_request_error` naming its field in `param`."""
from __future__ import annotations

import openai
import pytest
from openai.types import Completion, FileObject
from openai.types.chat import ChatCompletion
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from serve_helpers import CHAT, upload, wait_job

NON_NULL = {FineTuningJob: ("id", "created_at", "hyperparameters", "model", "object", "organization_id",
                            "result_files", "seed", "status", "training_file", "integrations", "method"),
            FineTuningJobEvent: ("id", "created_at", "level", "message", "object", "data", "type"),
            FileObject: ("id", "bytes", "created_at", "filename", "object", "purpose", "status", "status_details"),
            ChatCompletion: ("id", "choices", "created", "model", "object", "system_fingerprint", "usage"),
            Completion: ("id", "choices", "created", "model", "object", "system_fingerprint", "usage"),
            FineTuningJobCheckpoint: ("id", "created_at", "fine_tuned_model_checkpoint", "fine_tuning_job_id",
                                      "metrics", "object", "step_number")}
"""Per type, the fields OpenAI's API reference types as a value that is not null (the openai
package's types make many of them Optional; the reference's OpenAPI document does not)."""
WANDB = {"type": "wandb", "wandb": {"project": "colaft-tests", "name": "run-1", "entity": None, "tags": ["a"]}}


def shaped(cls, data: dict):
    """`data` validated strictly as `cls`, with every NON_NULL field of it not null."""
    obj = cls.model_validate(data, strict=True)
    assert not [f for f in NON_NULL[cls] if data.get(f) is None], (cls.__name__, data)
    return obj


def test_a_job_its_events_files_and_answers_have_the_references_shapes(server, alice):
    f = upload(alice, CHAT)
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/fine_tuning/jobs", json={
            "model": "llama", "training_file": f.id, "suffix": "my-bot", "metadata": {"team": "nlp"},
            "integrations": [WANDB], "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": "auto", "learning_rate_multiplier": "auto"}}}})
        assert r.status_code == 200, r.text
        created = shaped(FineTuningJob, r.json())
        assert created.integrations[0].model_dump() == WANDB  # echoed, not dropped
        job = wait_job(alice, created.id)
        assert job.status == "succeeded", job.error
        data = h.get(f"/v1/fine_tuning/jobs/{job.id}").json()
        job = shaped(FineTuningJob, data)
        assert job.fine_tuned_model == f"ft:llama:my-bot:{job.id}"
        assert job.metadata == {"team": "nlp"} and data["integrations"] == [WANDB]
        # "auto" is resolved and recorded, as OpenAI's jobs show it
        assert job.hyperparameters.batch_size == 8 and job.hyperparameters.learning_rate_multiplier == 1.0
        assert job.method.supervised.hyperparameters.model_dump() == job.hyperparameters.model_dump()
        events = h.get(f"/v1/fine_tuning/jobs/{job.id}/events", params={"limit": 100}).json()
        assert events["data"] and events["first_id"] == events["data"][0]["id"]
        for e in events["data"]:
            shaped(FineTuningJobEvent, e)
        for c in h.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]:
            checkpoint = shaped(FineTuningJobCheckpoint, c)
            assert checkpoint.fine_tuned_model_checkpoint.startswith(f"ft:llama:my-bot:{job.id}:ckpt-step-")
        for file_id in (f.id, job.result_files[0]):
            shaped(FileObject, h.get(f"/v1/files/{file_id}").json())
        # the suffixed model answers
        chat = h.post("/v1/chat/completions", json={"model": job.fine_tuned_model, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "who are you"}]})
        assert chat.status_code == 200, chat.text
        shaped(ChatCompletion, chat.json())
        r = h.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2})
        shaped(Completion, r.json())
        assert r.json()["system_fingerprint"].startswith("fp_")
        assert job.fine_tuned_model in {m["id"] for m in h.get("/v1/models").json()["data"]}


def test_files_page_as_openais_cursor_pages(server, bob):
    for i in range(3):
        upload(bob, CHAT[:2], f"page-{i}.jsonl")
    with server.http(server.keys["bob"]) as h:
        for order in ("asc", "desc"):
            whole = h.get("/v1/files", params={"order": order}).json()
            ids = [f["id"] for f in whole["data"]]
            assert len(ids) >= 3 and not whole["has_more"]
            assert (whole["first_id"], whole["last_id"]) == (ids[0], ids[-1])
            seen, after = [], None
            while True:
                page = h.get("/v1/files", params={"order": order, "limit": 2,
                                                  **({"after": after} if after else {})}).json()
                assert [page["first_id"], page["last_id"]] == [page["data"][0]["id"], page["data"][-1]["id"]]
                seen += [f["id"] for f in page["data"]]
                if not page["has_more"]:
                    break
                after = page["last_id"]
            assert seen == ids
        assert [f["id"] for f in h.get("/v1/files", params={"order": "asc"}).json()["data"]] == ids[::-1]
        empty = h.get("/v1/files", params={"after": ids[-1]}).json()  # the oldest: nothing after it
        assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)
    # the openai package follows the pages itself
    assert [f.id for f in bob.files.list(limit=2, order="desc")] == ids


def _error(r, param: str, *words: str) -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


def test_invalid_requests_are_400_invalid_request_errors_naming_the_param(server, alice):
    f = upload(alice, CHAT).id
    with server.http(server.keys["alice"]) as h:
        before = h.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]

        def job(**body):
            return h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": f, **body})
        over = {f"k{i}": "v" for i in range(17)}
        for body, param, words in [
                ({"metadata": over}, "metadata", ("17 pairs", "at most 16")),
                ({"metadata": {"k" * 65: "v"}}, "metadata", ("longer than 64",)),
                ({"metadata": {"k": "v" * 513}}, "metadata", ("longer than 512",)),
                ({"method": {"type": "dpo", "dpo": {}}}, "method.type", ("'dpo' is not supported", "supervised")),
                ({"method": {"type": "reinforcement"}}, "method.type", ("'reinforcement'",)),
                ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs", ("50",)),
                ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size", ("256",)),
                ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier",
                 ("greater than 0",)),
                ({"hyperparameters": {"learning_rate_multiplier": 1e300}},
                 "hyperparameters.learning_rate_multiplier", ("larger than float32",)),
                ({"integrations": [{"type": "slack", "wandb": {"project": "p"}}]}, "integrations.0.type", ()),
                ({"suffix": "s" * 65}, "suffix", ("64",)),
                ({"training_file": None}, "training_file", ())]:
            _error(job(**body), param, *words)
        _error(h.get("/v1/files", params={"limit": 0}), "limit")
        _error(h.post("/v1/chat/completions", json={"model": "llama", "messages": []}), "messages")
        assert h.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before
        # OpenAI's limits themselves are accepted, as are its ranges' ends
        at_limits = {f"{i:064d}": "v" * 512 for i in range(16)}
        for body in ({"metadata": at_limits, "suffix": "s" * 64},
                     {"hyperparameters": {"n_epochs": 50, "batch_size": 256, "learning_rate_multiplier": 500}}):
            r = job(**body)
            assert r.status_code == 200, r.text
            created = shaped(FineTuningJob, r.json())
            assert created.hyperparameters.batch_size == min(body.get("hyperparameters", {}).get("batch_size", 8),
                                                             len(CHAT))
            h.post(f"/v1/fine_tuning/jobs/{created.id}/cancel")
    with pytest.raises(openai.BadRequestError) as e:  # what the openai package raises for it
        alice.fine_tuning.jobs.create(model="llama", training_file=f, method={"type": "dpo"})
    assert e.value.param == "method.type"
    assert "dpo" in str(e.value)
