"""/openapi.json tells the truth: every success has its object's schema in each media type it is
sent in, every error status an operation can answer is declared with OpenAI's error envelope
(and no 422, which the server never sends), every route that takes a key declares the bearer
scheme, and a method a path does not take is a 405 with Allow. The dicts the handlers build
validate against the declared models; and schemathesis, run against a live server, finds every
answer conforming (schema, status code, content type, headers, and auth enforced)."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schema_cases import with_real_values
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_helpers import CHAT, Server, add_user, jsonl, upload, wait_job

from colaft.serve import objects
from colaft.serve.api import create_app
from colaft.serve.db import Checkpoint, Database, Event, File, Job
from colaft.serve.inference import Answer, Choice, Delta, TokenLogprob
from colaft.serve.routes.answers import Shape
from colaft.serve.routes.common import Service, listed
from colaft.serve.settings import Settings

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with no base model: its routes and schema, no engine."""
    data = tmp_path_factory.mktemp("openapi")
    return create_app(Service(Settings(data), Database(f"sqlite:///{data / 'colaft.db'}"), {}, 1 << 20, 0))


@pytest.fixture(scope="module")
def document(app) -> dict:
    return app.openapi()


def operations(document: dict):
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_success_has_its_objects_schema(document):
    for label, operation in operations(document):
        content = operation["responses"]["200"]["content"]
        assert content, label
        for media_type, entry in content.items():
            schema = entry.get("schema") or entry.get("itemSchema")
            assert schema, (label, media_type)
            if media_type == "application/json":
                assert schema["$ref"].startswith("#/components/schemas/"), label


def test_errors_are_declared_with_the_envelope_and_no_422(document):
    assert "422" not in str(document) and "HTTPValidationError" not in document["components"]["schemas"]
    for label, operation in operations(document):
        responses = operation["responses"]
        errors = {code for code in responses if code[0] in "45"}
        assert {"413", "500"} <= errors, label
        if label != "GET /health":
            assert {"401", "429"} <= errors, label
            assert responses["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
        if "{" in label or "after" in str(operation.get("parameters", [])):
            assert "404" in errors, label
        if operation.get("parameters") and any(p["in"] == "query" for p in operation["parameters"]) \
                or "requestBody" in operation:
            assert "400" in errors, label
        for code in errors:
            assert responses[code]["content"] == {"application/json": {"schema": ERROR}}, (label, code)
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_routes_that_take_a_key_declare_the_bearer_scheme(document):
    schemes = document["components"]["securitySchemes"]
    assert list(schemes) == ["bearer"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    for label, operation in operations(document):
        assert operation.get("security") == (None if label == "GET /health" else [{"bearer": []}]), label
    assert "/" not in document["paths"] and not any(p.startswith("/static") for p in document["paths"])


def test_each_answer_is_declared_in_the_media_type_it_is_sent_in(document):
    def media(label):
        method, path = label.split(" ")
        return set(document["paths"][path][method.lower()]["responses"]["200"]["content"])

    assert media("GET /v1/files/{file_id}/content") == {"application/jsonl", "text/csv"}
    assert media("GET /v1/fine_tuning/jobs/{job_id}/adapter") == {"application/zip"}
    assert media("POST /v1/chat/completions") == media("POST /v1/completions") == {"application/json",
                                                                                   "text/event-stream"}
    assert media("GET /v1/fine_tuning/jobs/{job_id}/fit/state") == {"application/json", "application/octet-stream"}
    assert "204" in document["paths"]["/v1/fine_tuning/jobs/{job_id}/fit/packets"]["get"]["responses"]
    chunk = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "ChatCompletionChunk" in str(chunk) and "ChatCompletionChunk" in document["components"]["schemas"]
    for label, operation in operations(document):
        assert operation["responses"]["200"]["content"] != {"application/json": {"schema": {}}}, label


def test_a_405_lists_every_method_its_path_takes(app, document):
    with TestClient(app) as client:
        assert client.get("/openapi.json").json() == document  # the schema served is this one
        for path, methods in document["paths"].items():
            r = client.request("PATCH", path.replace("{file_id}", "file-x").replace("{job_id}", "ftjob-x"))
            assert r.status_code == 405, path
            assert r.headers["allow"] == ", ".join(sorted(m.upper() for m in methods)), path
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_answers_the_handlers_build_are_the_declared_objects(app):
    file = File(id="file-1", user_id="u", filename="a.jsonl", purpose="fine-tune", bytes=3, created_at=1,
                format="chat", rows=2)
    hyper = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}
    job = Job(id="ftjob-1", user_id="u", model="m", training_file="file-1", hyperparameters=hyper,
              options={"adapter": "lowrank"}, seed=1, status="failed", created_at=1, finished_at=2,
              error={"code": "training_failed", "message": "x", "param": None}, result_files=[],
              integrations=[{"type": "wandb", "wandb": {"project": "p", "name": None, "entity": None, "tags": None}}])
    event = Event(id="ftevent-1", job_id="ftjob-1", created_at=1, level="info", type="message", message="hi")
    checkpoint = Checkpoint(id="ftckpt-1", job_id="ftjob-1", step=3, created_at=1, path="x",
                            metrics={"train_loss": None, "trained_tokens": 40})
    for model, data in [(objects.FileObject, file.to_api()), (objects.FineTuningJob, job.to_api()),
                        (objects.FineTuningJobEvent, event.to_api()),
                        (objects.FineTuningJobCheckpoint, checkpoint.to_api("ft:m:ftjob-1")),
                        (objects.FileList, listed([file.to_api()], False)), (objects.JobList, listed([], False)),
                        (objects.EventList, listed([event.to_api()], True))]:
        model.model_validate(data, strict=True)
    token = TokenLogprob("a", -0.5, [97], [TokenLogprob("b", -1.0, [98])])
    answer = Answer([Choice(0, "a", "length", 1, [token])], 3)
    for chat, whole, chunk in [(True, objects.ChatCompletion, objects.ChatCompletionChunk),
                               (False, objects.Completion, objects.CompletionChunk)]:
        shape = Shape(chat, "m", "fp_1", include_usage=True)
        whole.model_validate(shape.whole(answer), strict=True)
        events = shape.chunks(Delta(0, "a", [token]), True) + shape.chunks(Delta(0, "", None, "stop"), False)
        events.append(shape.usage_chunk(answer))
        for e in events:
            chunk.model_validate_json(e.removeprefix("data: "), strict=True)
    with TestClient(app) as client:
        objects.Health.model_validate(client.get("/health").json(), strict=True)


# ------------------------------------------------------------------ schemathesis against a live server
EXAMPLES = {GenerationMode.POSITIVE: 4, GenerationMode.NEGATIVE: 3}
"""Examples per operation, generation mode and path id: the live test stays within about half a minute."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, ignored_auth]
SLOW = {"max_tokens": 4, "max_completion_tokens": 4, "wait": 0.1, "n": 2}
"""Caps on values that only make a valid request slow (a long generation, a long poll)."""
UNREACHED = {"POST /v1/fine_tuning/jobs/{job_id}/fit/updates"}
"""Operations no generated request succeeds on: an update is a safetensors body (test_fuzz mangles real ones)."""
HELLO = [{"role": "user", "content": "Hello"}]
EXPLICIT = {"POST /v1/chat/completions": [
                {"model": "llama", "messages": HELLO, "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 2},
                {"model": "llama", "messages": HELLO, "max_tokens": 4, "stream": True, "logprobs": True,
                 "stream_options": {"include_usage": True}}],
            "POST /v1/completions": [
                {"model": "llama", "prompt": "Hello", "max_tokens": 4, "logprobs": 2},
                {"model": "llama", "prompt": "Hello", "max_tokens": 4, "stream": True, "logprobs": 1,
                 "stream_options": {"include_usage": True}}],
            "POST /v1/files": [{"file": jsonl(CHAT), "purpose": "fine-tune"}],
            "POST /v1/fine_tuning/jobs": [{"model": "llama", "training_file": "CHAT", "suffix": "s",
                                           "hyperparameters": {"n_epochs": 1}, "metadata": {"k": "v"}}]}
"""Bodies sent besides the generated ones, so that every operation answers a success (a streamed
one too, its events validated one by one) however the generated ones fare ("CHAT": the chat file)."""


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir):
    data = tmp_path_factory.mktemp("openapi-live") / "data"
    key = add_user(data, "schema")
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--backend", "inline", "--max-upload-mb", "0.25").start()
    me = srv.client(key)
    chat, spare = upload(me, CHAT).id, upload(me, CHAT[:2]).id
    done = wait_job(me, me.fine_tuning.jobs.create(model="llama", training_file=chat,
                                                   hyperparameters={"n_epochs": 1}).id)
    assert done.status == "succeeded", done
    client_fit = [me.fine_tuning.jobs.create(model="llama", training_file=chat,
                                             extra_body={"colaft": {"fit": "client"}}).id for _ in range(3)]
    for job_id in client_fit:
        wait_job(me, job_id, 60, until=("running",))
    checkpoint = me.fine_tuning.jobs.checkpoints.list(done.id).data[0].fine_tuned_model_checkpoint
    srv.key = key
    srv.targets = {"training_file": chat, "job_id": [done.id, client_fit[0]], "file_id": [chat, done.result_files[0]],
                   "POST job_id": [client_fit[1]], "DELETE file_id": [spare],
                   "model_id": [done.fine_tuned_model, "llama"], "DELETE model_id": [checkpoint],
                   # paused by the first generated request that succeeds, resumed likewise
                   "POST /v1/fine_tuning/jobs/{job_id}/pause job_id": [client_fit[2]],
                   "POST /v1/fine_tuning/jobs/{job_id}/resume job_id": [client_fit[2]],
                   "body": {"model": ["llama", done.fine_tuned_model], "training_file": [chat],
                            "purpose": ["fine-tune"], "file": [jsonl(CHAT)], "colaft": [{}],
                            "method": [{"type": "supervised"}], "prompt": ["Hello"],
                            "messages": [[{"role": "user", "content": "Hello"}]]}}
    yield srv
    srv.stop()


def _send(live, case, what: str, failures: list, answers: Counter) -> None:
    """Send `case` with the key and run every check on its answer; a failure is added to `failures`."""
    headers = {"Authorization": f"Bearer {live.key}"}
    label = case.operation.label
    response = case.call(base_url=live.url, headers=headers, timeout=60)
    answers[label, response.status_code] += 1
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (AssertionError, BaseExceptionGroup) as e:
        failures.append(f"{label} ({what}): {response.status_code} {response.text[:300]}\n{e}")
    if label == "POST /v1/fine_tuning/jobs" and response.status_code == 200:
        with live.http(live.key) as h:  # keep the engine free
            h.post(f"/v1/fine_tuning/jobs/{response.json()['id']}/cancel")


def _check(live, operation, mode, path_ids, failures: list, answers: Counter) -> None:
    """Send EXAMPLES[mode] generated cases of one operation (`path_ids`: real ids, or None)."""
    strategy = with_real_values(operation.as_strategy(mode, path_parameters=path_ids), live.targets["body"], SLOW)

    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        _send(live, case, mode.value, failures, answers)

    try:
        check()
    except Unsatisfiable:  # no schema-violating value exists (a free string id, no parameters)
        assert mode == GenerationMode.NEGATIVE, operation.label


def test_every_answer_conforms_to_the_schema(live):
    """Every operation, schema-valid and schema-violating requests, generated and real ids: each
    answer's status, content type, headers and body are as /openapi.json declares, and a request
    that succeeds with the key is refused (401) without it or with a wrong one."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    failures, answers = [], Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        variants = [None]
        for name in ("job_id", "file_id", "model_id"):
            if "{" + name + "}" in operation.path:
                ids = live.targets.get(f"{operation.label} {name}") or live.targets.get(
                    f"{operation.method.upper()} {name}", live.targets[name])
                variants += [{name: i} for i in ids]
        for mode in EXAMPLES:
            for path_ids in variants:
                _check(live, operation, mode, path_ids, failures, answers)
        for body in EXPLICIT.get(operation.label, []):
            body = {k: live.targets["training_file"] if v == "CHAT" else v for k, v in body.items()}
            media = "multipart/form-data" if "file" in body else "application/json"
            _send(live, operation.Case(body=body, media_type=media), "explicit", failures, answers)

    assert not failures, f"{len(failures)} answers off the schema:\n\n" + "\n\n".join(failures[:10])
    succeeded = {label for (label, status) in answers if 200 <= status < 300}
    unreached = {label for label, _ in answers} - succeeded - UNREACHED
    assert not unreached, (unreached, answers)
