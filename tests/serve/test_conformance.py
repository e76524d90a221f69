"""Conformance with OpenAI's API reference: every endpoint driven with the `openai` package, and
each answer's raw JSON validated against the reference's schema of its object, written below as
JSON Schemas (jsonschema, draft 2020-12) from the reference's OpenAPI document (components
OpenAIFile, DeleteFileResponse, ListFilesResponse, FineTuningJob, FineTuningJobEvent,
FineTuningJobCheckpoint, Model, DeleteModelResponse, CreateChatCompletionResponse,
CreateChatCompletionStreamResponse, CreateCompletionResponse, ErrorResponse and the lists').

Strict: a property the reference does not list is refused (`additionalProperties` only where the
reference has it: metadata, an event's `data`, the legacy logprobs' maps), required properties
are required, and a property may be null exactly where the reference types it nullable (a
`string | null` may be null, an `object` or a `string` may not). colaft's own additions are
listed apart (COLAFT), so that nothing else can slip in.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import jsonschema
import openai
import pytest
from serve_helpers import CHAT, add_user, jsonl, wait_job

from colaft.serve.api import create_app
from colaft.serve.db import Database
from colaft.serve.routes.common import Service
from colaft.serve.settings import Settings

# ------------------------------------------------------------------ the reference's schemas
STR, INT, NUM, BOOL, OBJECT = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, \
    {"type": "object"}


def obj(required: dict, optional: dict | None = None) -> dict:
    """An object with `required` and `optional` properties and no other."""
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            "additionalProperties": False}


def null(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def extended(schema: dict, **properties) -> dict:
    """`schema` with colaft's own optional `properties` besides the reference's."""
    return {**schema, "properties": {**schema["properties"], **properties}}


ERROR = obj({"error": obj({"code": null(STR), "message": STR, "param": null(STR), "type": STR})})

FILE = obj({"id": STR, "object": enum("file"), "bytes": INT, "created_at": INT, "filename": STR,
            "purpose": enum("assistants", "assistants_output", "batch", "batch_output", "fine-tune",
                            "fine-tune-results", "vision", "user_data"),
            "status": enum("uploaded", "processed", "error")},
           {"expires_at": INT, "status_details": STR})
FILE_DELETED = obj({"id": STR, "object": enum("file"), "deleted": BOOL})
FILE_LIST = obj({"object": STR, "data": array(FILE), "first_id": STR, "last_id": STR, "has_more": BOOL})

AUTO = enum("auto")
HYPERPARAMETERS = obj({}, {
    "batch_size": {"anyOf": [AUTO, {"type": "integer", "minimum": 1, "maximum": 256}]},
    "learning_rate_multiplier": {"anyOf": [AUTO, {"type": "number", "exclusiveMinimum": 0}]},
    "n_epochs": {"anyOf": [AUTO, {"type": "integer", "minimum": 1, "maximum": 50}]}})
METADATA = null({"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                 "additionalProperties": {"type": "string", "maxLength": 512}})
INTEGRATION = obj({"type": enum("wandb"),
                   "wandb": obj({"project": STR}, {"name": null(STR), "entity": null(STR), "tags": array(STR)})})
METHOD = obj({"type": enum("supervised", "dpo", "reinforcement")},
             {"supervised": obj({}, {"hyperparameters": HYPERPARAMETERS}), "dpo": OBJECT, "reinforcement": OBJECT})
JOB_STATUS = enum("validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused")
"""The reference's statuses, and "paused", what its pause operation makes a job."""
JOB = obj({"id": STR, "created_at": INT, "error": null(obj({"code": STR, "message": STR, "param": null(STR)})),
           "fine_tuned_model": null(STR), "finished_at": null(INT), "hyperparameters": HYPERPARAMETERS, "model": STR,
           "object": enum("fine_tuning.job"), "organization_id": STR, "result_files": array(STR),
           "status": JOB_STATUS, "trained_tokens": null(INT), "training_file": STR, "validation_file": null(STR),
           "seed": INT},
          {"integrations": null(array(INTEGRATION)), "estimated_finish": null(INT), "method": METHOD,
           "metadata": METADATA})
EVENT = obj({"id": STR, "object": enum("fine_tuning.job.event"), "created_at": INT,
             "level": enum("info", "warn", "error"), "message": STR},
            {"type": enum("message", "metrics"), "data": OBJECT})
CHECKPOINT = obj({"id": STR, "created_at": INT, "fine_tuned_model_checkpoint": STR, "step_number": INT,
                  "metrics": obj({}, {k: NUM for k in ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                                                       "valid_mean_token_accuracy", "full_valid_loss",
                                                       "full_valid_mean_token_accuracy")}),
                  "fine_tuning_job_id": STR, "object": enum("fine_tuning.job.checkpoint")})
JOB_LIST = obj({"object": enum("list"), "data": array(JOB), "has_more": BOOL})
EVENT_LIST = obj({"object": enum("list"), "data": array(EVENT), "has_more": BOOL})
CHECKPOINT_LIST = obj({"object": enum("list"), "data": array(CHECKPOINT), "has_more": BOOL},
                      {"first_id": null(STR), "last_id": null(STR)})

MODEL = obj({"id": STR, "created": INT, "object": enum("model"), "owned_by": STR})
MODEL_LIST = obj({"object": enum("list"), "data": array(MODEL)})
MODEL_DELETED = obj({"id": STR, "deleted": BOOL, "object": STR})

USAGE = obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT},
            {"completion_tokens_details": OBJECT, "prompt_tokens_details": OBJECT})
TOP_LOGPROB = obj({"token": STR, "logprob": NUM, "bytes": null(array(INT))})
TOKEN_LOGPROB = obj({**TOP_LOGPROB["properties"], "top_logprobs": array(TOP_LOGPROB)})
CHAT_LOGPROBS = null(obj({"content": null(array(TOKEN_LOGPROB)), "refusal": null(array(TOKEN_LOGPROB))}))
FINISH = ("stop", "length", "tool_calls", "content_filter", "function_call")
SERVICE_TIER = null(enum("auto", "default", "flex", "scale", "priority"))
CHAT_COMPLETION = obj(
    {"id": STR, "created": INT, "model": STR, "object": enum("chat.completion"),
     "choices": array(obj({"finish_reason": enum(*FINISH), "index": INT, "logprobs": CHAT_LOGPROBS,
                           "message": obj({"role": enum("assistant"), "content": null(STR), "refusal": null(STR)},
                                          {"tool_calls": array(OBJECT), "annotations": array(OBJECT),
                                           "function_call": OBJECT, "audio": null(OBJECT)})}))},
    {"service_tier": SERVICE_TIER, "system_fingerprint": STR, "usage": USAGE})
CHAT_CHUNK = obj(
    {"id": STR, "created": INT, "model": STR, "object": enum("chat.completion.chunk"),
     "choices": array(obj({"delta": obj({}, {"content": null(STR), "function_call": OBJECT,
                                             "tool_calls": array(OBJECT), "refusal": null(STR),
                                             "role": enum("developer", "system", "user", "assistant", "tool")}),
                           "finish_reason": null(enum(*FINISH)), "index": INT}, {"logprobs": CHAT_LOGPROBS}))},
    {"service_tier": SERVICE_TIER, "system_fingerprint": STR, "usage": null(USAGE)})
COMPLETION = obj(
    {"id": STR, "created": INT, "model": STR, "object": enum("text_completion"),
     "choices": array(obj({"finish_reason": enum("stop", "length", "content_filter"), "index": INT, "text": STR,
                           "logprobs": null(obj({}, {"text_offset": array(INT), "token_logprobs": array(NUM),
                                                     "tokens": array(STR),
                                                     "top_logprobs": array({"type": "object",
                                                                            "additionalProperties": NUM})}))}))},
    {"system_fingerprint": STR, "usage": USAGE})

# ------------------------------------------------------------------ colaft's additions
PAGE = {"first_id": null(STR), "last_id": null(STR)}
COLAFT = {"job": extended(JOB, suffix=null(STR), colaft=OBJECT),
          "jobs": extended(JOB_LIST, **PAGE), "events": extended(EVENT_LIST, **PAGE)}
"""A job's `suffix` and colaft's own options (`colaft`), and cursor ids on the lists of jobs and of
events (as the reference's lists of files and checkpoints have them)."""
COLAFT["jobs"]["properties"]["data"] = array(COLAFT["job"])


def conforms(data, schema: dict):
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    return data


def raw(response) -> dict:
    """The JSON an openai `.with_raw_response` call got."""
    return response.http_response.json()


def _operations() -> set[str]:
    """The operations this colaft's app has ("POST /v1/fine_tuning/jobs/{}/cancel"): some come with later changes."""
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{Path(folder) / 'colaft.db'}")
        try:
            paths = create_app(Service(Settings(Path(folder)), db, {}, 1, 0)).openapi()["paths"]
        finally:
            db.close()
    return {f"{method.upper()} {re.sub(r'{[^}]*}', '{}', path)}" for path, methods in paths.items()
            for method in methods}


OPERATIONS = _operations()


def served(operation: str):
    return pytest.mark.skipif(operation not in OPERATIONS, reason=f"this colaft has no {operation}")


# ------------------------------------------------------------------ the endpoints, through the openai package
@pytest.fixture(scope="module")
def me(server):
    return server.client(add_user(server.data_dir, "conformance"))


@pytest.fixture(scope="module")
def trained(me):
    """A succeeded job with a suffix, metadata, integrations (one with tags, one without) and a method."""
    file = me.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
    job = me.fine_tuning.jobs.create(
        model="llama", training_file=file.id, suffix="conf", metadata={"team": "nlp"}, seed=7,
        integrations=[{"type": "wandb", "wandb": {"project": "p", "tags": ["a"]}},
                      {"type": "wandb", "wandb": {"project": "q", "name": None}}],
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": "auto"}}})
    job = wait_job(me, job.id)
    assert job.status == "succeeded", job.error
    return job


@pytest.fixture(scope="module")
def long_file(me):
    """Training data for a job that runs long enough to be acted on while it runs (30 steps an epoch)."""
    return me.files.create(file=("long.jsonl", jsonl(CHAT * 20)), purpose="fine-tune").id


def test_files(me):
    created = conforms(raw(me.files.with_raw_response.create(file=("a.jsonl", jsonl(CHAT)), purpose="fine-tune")),
                       FILE)
    file_id = created["id"]
    listed = conforms(raw(me.files.with_raw_response.list()), FILE_LIST)
    assert file_id in [f["id"] for f in listed["data"]]
    assert conforms(raw(me.files.with_raw_response.retrieve(file_id)), FILE) == created
    content = me.files.with_raw_response.content(file_id)
    assert content.http_response.content == jsonl(CHAT)
    assert content.http_response.headers["content-type"].startswith("application/jsonl")
    deleted = conforms(raw(me.files.with_raw_response.delete(file_id)), FILE_DELETED)
    assert deleted == {"id": file_id, "object": "file", "deleted": True}


def test_jobs_events_checkpoints(me, trained):
    job = conforms(raw(me.fine_tuning.jobs.with_raw_response.retrieve(trained.id)), COLAFT["job"])
    assert job["metadata"] == {"team": "nlp"} and job["fine_tuned_model"].startswith("ft:llama:conf:")
    assert job["integrations"][0]["wandb"]["tags"] == ["a"] and "tags" not in job["integrations"][1]["wandb"]
    conforms(raw(me.fine_tuning.jobs.with_raw_response.list(limit=5)), COLAFT["jobs"])
    events = conforms(raw(me.fine_tuning.jobs.with_raw_response.list_events(trained.id, limit=100)), COLAFT["events"])
    assert {e["type"] for e in events["data"]} == {"message", "metrics"}
    checkpoints = conforms(raw(me.fine_tuning.jobs.checkpoints.with_raw_response.list(trained.id)), CHECKPOINT_LIST)
    assert checkpoints["data"] and all("train_loss" in c["metrics"] for c in checkpoints["data"])
    results = me.files.with_raw_response.retrieve(job["result_files"][0])
    assert conforms(raw(results), FILE)["purpose"] == "fine-tune-results"
    csv = me.files.with_raw_response.content(job["result_files"][0]).http_response
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith("step,")


def test_a_job_created_and_cancelled(me, long_file):
    created = conforms(raw(me.fine_tuning.jobs.with_raw_response.create(
        model="llama", training_file=long_file, hyperparameters={"n_epochs": 50})), COLAFT["job"])
    assert created["status"] in ("validating_files", "queued", "running") and created["error"] is None
    cancelled = conforms(raw(me.fine_tuning.jobs.with_raw_response.cancel(created["id"])), COLAFT["job"])
    assert cancelled["status"] == "cancelled"


def test_models(me, trained):
    models = conforms(raw(me.models.with_raw_response.list()), MODEL_LIST)
    assert {"llama", trained.fine_tuned_model} <= {m["id"] for m in models["data"]}


@served("GET /v1/models/{}")
def test_a_model_retrieved(me, trained):
    for model in ("llama", trained.fine_tuned_model):
        assert conforms(raw(me.models.with_raw_response.retrieve(model)), MODEL)["id"] == model


@served("DELETE /v1/models/{}")
def test_a_fine_tuned_model_deleted(me, trained):
    other = wait_job(me, me.fine_tuning.jobs.create(model="llama", training_file=trained.training_file,
                                                    hyperparameters={"n_epochs": 1}).id)
    deleted = conforms(raw(me.models.with_raw_response.delete(other.fine_tuned_model)), MODEL_DELETED)
    assert deleted["id"] == other.fine_tuned_model and deleted["deleted"] is True


@served("POST /v1/fine_tuning/jobs/{}/pause")
@served("POST /v1/fine_tuning/jobs/{}/resume")
def test_a_job_paused_and_resumed(me, long_file):
    job = me.fine_tuning.jobs.create(model="llama", training_file=long_file, hyperparameters={"n_epochs": 50})
    try:
        wait_job(me, job.id, 60, until=("running",))
        paused = conforms(raw(me.fine_tuning.jobs.with_raw_response.pause(job.id)), COLAFT["job"])
        assert paused["status"] == "paused"
        resumed = conforms(raw(me.fine_tuning.jobs.with_raw_response.resume(job.id)), COLAFT["job"])
        assert resumed["status"] in ("queued", "running")
    finally:
        me.fine_tuning.jobs.cancel(job.id)


def test_chat_completions(me, trained):
    for model in ("llama", trained.fine_tuned_model):
        answer = conforms(raw(me.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Who are you?"}], max_tokens=4, n=2, logprobs=True,
            top_logprobs=2)), CHAT_COMPLETION)
        assert len(answer["choices"]) == 2 and answer["choices"][0]["logprobs"]["content"]


def test_a_chat_completion_streamed(me):
    stream = me.chat.completions.create(model="llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                        stream=True, stream_options={"include_usage": True}, logprobs=True)
    chunks = [conforms(chunk.to_dict(mode="json"), CHAT_CHUNK) for chunk in stream]  # as the package read them
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] in ("stop", "length")


def test_completions(me):
    answer = conforms(raw(me.completions.with_raw_response.create(model="llama", prompt="Hello", max_tokens=4,
                                                                 logprobs=2)), COMPLETION)
    logprobs = answer["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) > 0


def test_errors(server, me):
    for call, error in [(lambda: me.files.retrieve("file-nope"), openai.NotFoundError),
                        (lambda: me.fine_tuning.jobs.create(model="llama", training_file="file-nope",
                                                            hyperparameters={"n_epochs": 0}), openai.BadRequestError),
                        (lambda: server.client("sk-colaft-wrong").models.list(), openai.AuthenticationError)]:
        with pytest.raises(error) as e:
            call()
        conforms(e.value.response.json(), ERROR)


def test_the_lists_of_jobs_and_events_page_like_the_references_other_lists(me, trained):
    """colaft's additions to the jobs' and events' lists are the cursor ids the reference's lists
    of files and checkpoints have: the first and last objects' ids."""
    page = raw(me.fine_tuning.jobs.with_raw_response.list_events(trained.id, limit=2))
    assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
