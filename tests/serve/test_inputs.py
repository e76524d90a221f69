"""Untrusted input: every malformed or out-of-range value is a 4xx naming its field, with no side
effect; none is a 500, none stalls the server."""
from __future__ import annotations

import json

from serve_helpers import CHAT, upload, wait_job


def _job(h, body: str):
    return h.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})


def test_job_values_out_of_range_are_400_naming_them_and_create_nothing(server, alice):
    f = upload(alice, CHAT).id
    with server.http(server.keys["alice"]) as h:
        jobs_before = h.get("/v1/fine_tuning/jobs").json()["data"]
        base = f'{{"model": "llama", "training_file": "{f}", '
        for body, param in [(base + '"colaft": {"alpha": 1e999}}', "colaft.alpha"),  # JSON's inf
                            (base + '"colaft": {"alpha": NaN}}', "colaft.alpha"),
                            (base + '"colaft": {"alpha": 1e300}}', "colaft.alpha"),
                            (base + '"hyperparameters": {"learning_rate_multiplier": 1e-320}}',
                             "hyperparameters.learning_rate_multiplier"),  # the rate rounds to 0
                            (base + '"hyperparameters": {"learning_rate_multiplier": 1e-40}}',
                             "hyperparameters.learning_rate_multiplier"),  # subnormal in float32
                            (base + '"colaft": {"targets": "self_attn.(q"}}', "colaft.targets"),
                            # catastrophic for a backtracking matcher: 2**31 ways to split each name
                            (base + '"colaft": {"targets": "([a-z._0-9]+)+!"}}', "colaft.targets")]:
            r = _job(h, body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and param.split(".")[-1] in error["message"], (body, error)
        r = _job(h, base + '"colaft": {"targets": "self_attn.(q"}}')
        assert "not a valid regex" in r.json()["error"]["message"]
        assert h.get("/v1/fine_tuning/jobs").json()["data"] == jobs_before


def test_deeply_nested_json_is_refused(server):
    with server.http(server.keys["alice"]) as h:
        for depth in (33, 100_000):  # one past the limit; deeper than Python's recursion limit
            line = '{"text": ' + "[" * depth + "]" * depth + ', "label": "x"}\n'
            r = h.post("/v1/files", files={"file": ("deep.jsonl", line.encode())}, data={"purpose": "fine-tune"})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "file" and "line 1: JSON nested deeper than 32 levels" in error["message"]
        for depth in (40, 300, 100_000):  # past the limit; parsed at full depth before; past Python's stack
            nested = "[" * depth + "]" * depth
            for path, body in [("/v1/fine_tuning/jobs",
                                 f'{{"model": "llama", "training_file": "x", "metadata": {nested}}}'),
                               ("/v1/chat/completions", '{"model": "llama", "messages": [{"role": "user", '
                                                        f'"content": "hi", "name": {nested}}}]}}')]:
                r = h.post(path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert (error["param"], error["code"]) == ("body", "too_deep"), error
        r = h.post("/v1/chat/completions", json={"model": "llama", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "[[[[" * 5 + "{{{{" * 4}]}]})
        assert r.status_code == 200, r.text  # brackets inside strings are text, not nesting (36 > 32 of them,
        # and the prompt within the tiny model's prompt cap)


def test_sampling_values_are_checked_or_handled(server):
    chat = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with server.http(server.keys["alice"]) as h:
        for body, param in [({**chat, "seed": 2**64}, "seed"),
                            ({**chat, "seed": -2**63 - 1}, "seed"),
                            ({**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                             "messages.0.content")]:
            r = h.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, r.text
        assert "part 0's text is not a string" in r.json()["error"]["message"]
        r = h.post("/v1/chat/completions", content=json.dumps({**chat, "temperature": 1}).replace("1}", "NaN}"),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
        r = h.post("/v1/completions", json={"model": "llama", "prompt": "hi", "seed": 2**64 - 1, "max_tokens": 2})
        assert r.status_code == 200, r.text
        # too cold to sample (logits / 1e-300 overflow): answered as greedy, like temperature 0
        greedy = h.post("/v1/chat/completions", json={**chat, "temperature": 0}).json()
        cold = h.post("/v1/chat/completions", json={**chat, "temperature": 1e-300, "seed": 3})
        assert cold.status_code == 200, cold.text
        assert cold.json()["choices"][0]["message"] == greedy["choices"][0]["message"]
        parts = {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                    {"type": "image_url", "image_url": {}}]}]}
        assert h.post("/v1/chat/completions", json=parts).json()["choices"][0]["message"] == \
            greedy["choices"][0]["message"]


def test_a_job_with_buffered_packets_checkpoints(server, alice):
    """interval 3 and a checkpoint every 4 steps: a checkpoint holds a buffered step's packets. Rows
    of one length: no padding, so the packets of sites fed by one input (q, v) share their x."""
    f = upload(alice, [{"prompt": "the same question", "completion": "the same answer"}] * 8).id
    for mode in ("personal", "collaborative"):
        job = alice.fine_tuning.jobs.create(model="llama", training_file=f, hyperparameters={"n_epochs": 4},
                                            extra_body={"colaft": {"interval": 3, "mode": mode}})
        job = wait_job(alice, job.id)
        assert job.status == "succeeded", (mode, job.error)


def test_a_non_finite_client_update_is_refused_and_the_job_goes_on(server, alice):
    from colaft.io.tensors import state_from_bytes, state_to_bytes
    f = upload(alice, CHAT).id
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f, extra_body={"colaft": {"fit": "client"}})
    wait_job(alice, job.id, 60, until=("running",))
    with server.http(server.keys["alice"]) as h:
        fit = f"/v1/fine_tuning/jobs/{job.id}/fit"
        state, meta = state_from_bytes(h.get(fit + "/state").content)
        r = h.get(fit + "/packets", params={"after": meta["seq"], "wait": 30})
        seq = json.loads(r.headers["X-Colaft-Messages"])[0][0]
        site = next(iter(state["adapters"]))
        key = next(iter(state["adapters"][site]))
        state["adapters"][site][key][..., 0] = float("nan")
        state["version"] += 1
        r = h.post(fit + "/updates", content=state_to_bytes(state, {"version": state["version"], "seq": seq}))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "non_finite_update" and f"adapters.{site}.{key}" in error["message"]
        again, _ = state_from_bytes(h.get(fit + "/state").content)
        assert again["version"] == state["version"] - 1 and again["adapters"][site][key].isfinite().all()
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "running"
    alice.fine_tuning.jobs.cancel(job.id)
