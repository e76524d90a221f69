"""Property-based fuzzing of every operation of `colaft serve` from its own OpenAPI schema
(schemathesis): whatever a client with a valid key sends, no answer is a 5xx.

One live server (tiny Llama "llama", tiny BERT "bert") holds real objects for the fuzzer to aim
at: the caller's files, a succeeded job (its fine-tuned model, adapter, checkpoints, results
file), a client-fit job waiting for its client, and another user's file and job. Each operation
is fuzzed with schema-valid and schema-violating requests (schemathesis' positive and negative
modes), with generated path ids and with each real one, and with real values (model names, file
ids, a purpose) mixed into generated bodies, so requests get past the first 404/400 and reach
the code behind it. Only `not_a_server_error` is checked: whether the schema describes every
answer truthfully is another matter. Hypothesis runs derandomized, so a run is reproducible.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schema_cases import PAIRS, with_real_values
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serve_helpers import CHAT, REVIEWS, Server, add_user, jsonl, upload, wait_job

from colaft.io.tensors import state_from_bytes, state_to_bytes

EXAMPLES = 10
"""Examples per operation, generation mode and path id (BODY_EXAMPLES for an operation with a body):
the whole module stays under about two minutes on two cores."""
BODY_EXAMPLES = 40
REACHED = ["POST /v1/files", "POST /v1/fine_tuning/jobs", "POST /v1/chat/completions", "POST /v1/completions",
           "GET /v1/fine_tuning/jobs/{job_id}/fit/packets"]
"""Operations some fuzzed request of which must succeed: the real values get requests past the first checks."""
SLOW = {"max_tokens": 16, "max_completion_tokens": 16, "wait": 0.1}
"""Caps on values that only make a valid request slow (a long generation, a long poll): their
range checks are tested elsewhere; here they would spend the test's time waiting."""

CSV = b"text,label\n" + b"".join(f"{r['text']},{r['label']}\n".encode() for r in REVIEWS)
UPLOADS = [jsonl(CHAT), CSV, b'{"text": ' + b"[" * 40 + b"]" * 40 + b', "label": "x"}\n', b"\xff\xfe\x00",
           b"", b"[1, 2]\n", b'{"messages": "hi"}\n', b'{"prompt": 1, "completion": null}\n',
           b'{"text": 1e999, "label": NaN}\n', b"text,label\n\"unclosed,x\n"]
"""File contents mixed into generated uploads: valid chat and CSV data, and malformed ones."""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    data = tmp_path_factory.mktemp("fuzz") / "data"
    keys = {name: add_user(data, name) for name in ("fuzz", "other")}
    srv = Server(data, [f"llama={tiny_llama_dir}", f"bert={tiny_bert_dir}"], "--backend", "inline",
                 "--max-upload-mb", "0.25", "--checkpoint-every", "2").start()
    srv.keys = keys
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def targets(fuzz_server):
    """Real ids and values to mix into the generated requests."""
    me, other = (fuzz_server.client(fuzz_server.keys[u]) for u in ("fuzz", "other"))
    chat, reviews = upload(me, CHAT).id, upload(me, REVIEWS).id
    done = wait_job(me, me.fine_tuning.jobs.create(model="llama", training_file=chat,
                                                   hyperparameters={"n_epochs": 1}).id)
    assert done.status == "succeeded", done
    client = me.fine_tuning.jobs.create(model="llama", training_file=chat, extra_body={"colaft": {"fit": "client"}})
    wait_job(me, client.id, 60, until=("running",))
    theirs = upload(other, CHAT).id
    other_job = other.fine_tuning.jobs.create(model="bert", training_file=upload(other, REVIEWS).id).id
    files = [chat, reviews, done.result_files[0], theirs]
    return {"job_id": [done.id, client.id, other_job], "file_id": files,
            # a file a job uses (deleting it is refused) and jobs already over: the fuzzer cannot take
            # away what the other operations aim at
            "DELETE file_id": [chat], "POST job_id": [done.id, other_job],
            "body": {"model": ["llama", "bert", done.fine_tuned_model, f"ft:bert:{done.id}"],
                     "training_file": files, "validation_file": files, "purpose": ["fine-tune"],
                     "file": UPLOADS,
                     # a job's options that pass: a generated adapter name or device rarely does
                     "colaft": [{}, {"adapter": "linear"}], "method": [{"type": "supervised"}],
                     # a base model and a file it trains on, together: drawn apart, they rarely match
                     PAIRS: [{"model": "llama", "training_file": chat}, {"model": "bert", "training_file": reviews}]}}


def _path_ids(operation, targets) -> list[dict]:
    """None (generated ids), then each real id of the operation's path parameter."""
    variants = [None]
    for name in ("job_id", "file_id"):
        if "{" + name + "}" in operation.path:
            ids = targets.get(f"{operation.method.upper()} {name}", targets[name])
            variants += [{name: i} for i in ids]
    return variants


def _fuzz(server, key: str, operation, mode, path_ids, values: dict, examples: int, failures: list,
          answers: Counter) -> None:
    """Send `examples` cases of one operation in one generation mode; a 5xx is added to `failures`."""
    headers = {"Authorization": f"Bearer {key}"}
    strategy = with_real_values(operation.as_strategy(mode, path_parameters=path_ids), values, SLOW)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(base_url=server.url, headers=headers, timeout=60)
        answers[operation.label, response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=headers)
        except (AssertionError, BaseExceptionGroup) as e:  # every 5xx is collected and reported at the end
            failures.append(f"{operation.label} ({mode.value}): {response.status_code} {response.text[:200]}\n"
                            f"{type(e).__name__}\n{case.as_curl_command(headers={'Authorization': 'Bearer KEY'})}")
        if operation.label == "POST /v1/fine_tuning/jobs" and response.status_code == 200:
            with server.http(key) as h:  # keep the quota and the engine free
                h.post(f"/v1/fine_tuning/jobs/{response.json()['id']}/cancel")

    try:
        fuzz()
    except Unsatisfiable:  # no schema-violating value exists (a free string id, no parameters)
        assert mode == GenerationMode.NEGATIVE, operation.label


def test_no_input_is_a_server_error(fuzz_server, targets):
    """Every operation, schema-valid and schema-violating, generated and real ids: no answer is a 5xx."""
    key = fuzz_server.keys["fuzz"]
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    failures, answers = [], Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = BODY_EXAMPLES if operation.body else EXAMPLES
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for path_ids in _path_ids(operation, targets):
                _fuzz(fuzz_server, key, operation, mode, path_ids, targets["body"], examples, failures, answers)

    assert sum(answers.values()) > 500
    assert not [label for label in REACHED if not answers[label, 200]], answers
    assert not failures, f"{len(failures)} 5xx answers:\n\n" + "\n\n".join(failures[:20])
    with fuzz_server.http(key) as h:  # and the server still serves
        assert h.get("/health").json()["ready"]
        assert h.get(f"/v1/fine_tuning/jobs/{targets['job_id'][1]}").json()["status"] == "running"


WEIRD = [float("inf"), float("nan"), -1, 2**70, "1", "x", [1], {}, None, True, 1.5]
"""JSON values a client-fit update's version and seq may hold instead of the number the server expects."""


def test_no_update_body_is_a_server_error(fuzz_server, targets):
    """POST .../fit/updates takes a body the schema cannot describe (safetensors): fuzzed from the
    job's real state, with its numbers, tensors and bytes mangled, it is refused with a 4xx."""
    job = targets["job_id"][1]
    path = f"/v1/fine_tuning/jobs/{job}/fit/updates"
    with fuzz_server.http(fuzz_server.keys["fuzz"]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{job}/fit/state")
        assert r.status_code == 200, r.text
        state, meta = state_from_bytes(r.content)
        r = h.get(f"/v1/fine_tuning/jobs/{job}/fit/packets", params={"after": meta["seq"], "wait": 10})
        assert r.status_code == 200, r.text
        seq = json.loads(r.headers["x-colaft-messages"])[0][0]
        version = state["version"] + 1
        site, shapes = next(iter(state["adapters"].items()))
        name = next(iter(shapes))

        @st.composite
        def bodies(draw):
            new = {**state, "version": draw(st.sampled_from([version, *WEIRD])), "adapters": dict(state["adapters"])}
            tensor = shapes[name]
            new["adapters"][site] = {**shapes, name: draw(st.sampled_from([
                tensor, tensor[:0], tensor.to(torch.int64), tensor.double(), tensor.unsqueeze(0),
                torch.full_like(tensor, float("nan"))]))}
            if draw(st.booleans()):
                new["optimizer"] = draw(st.sampled_from([None, [], {"state": 1}, "x"]))
            up = {"version": draw(st.sampled_from([version, *WEIRD])), "seq": draw(st.sampled_from([seq, *WEIRD]))}
            body = state_to_bytes(new, up)
            cut = draw(st.sampled_from([None, 0, 8, 100]))
            return body if cut is None else body[:cut] + draw(st.binary(max_size=16))

        failures = []

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies())
        def fuzz(body):
            with fuzz_server.http(fuzz_server.keys["fuzz"]) as fresh:  # an early answer closes its connection
                r = fresh.post(path, content=body)
            if r.status_code >= 500:
                failures.append(r.text)
            assert r.status_code < 500 or failures

        fuzz()
        assert not failures, failures[:5]
