"""Completions interleaved across requests (colaft.serve.decode) and capped (400 naming the param).

The engine's turns are driven by hand (`Engine._serve`, what its thread does between training
steps), so the tests assert on progress, never on timings: a short completion that arrives
while a long one is in flight is answered while the long one is still unfinished, and every
greedy answer is the one the request gets alone from `generate`.
"""
from __future__ import annotations

import pytest
import torch

from colaft.serve.db import Database
from colaft.serve.inference import Request, TooLong
from colaft.serve.scheduler import Engine
from colaft.serve.settings import Settings


@pytest.fixture
def engine(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    engine = Engine("llama", str(tiny_llama_dir), "clm", db, Settings(data_dir=data, max_prompt_tokens=100))
    yield engine
    engine._shutdown()
    db.close()


def _alone(engine: Engine, prompt: str, max_tokens: int) -> str:
    """What `generate` answers to the prompt alone (greedy), as the service answered before."""
    tok = engine.host.task.tokenizer
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = engine.host.base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


def test_a_short_completion_is_answered_while_a_long_one_runs(engine):
    long = engine.infer(Request(None, "personal", prompt="who are you", max_tokens=60))
    engine._serve()  # one turn: the long completion starts, and is not done
    assert not long.done()
    short = engine.infer(Request(None, "personal", prompt="hello there", max_tokens=3))
    turns = 0
    while not short.done():
        engine._serve()
        turns += 1
    assert turns == 1 and not long.done()  # answered at the next turn, the long one still running
    assert short.result().completion_tokens == 3
    while not long.done():
        engine._serve()
    assert long.result().completion_tokens == 60 and long.result().finish_reason == "length"
    assert engine.generation.active == 0


def test_interleaved_greedy_answers_equal_generating_alone(engine, caplog):
    """Requests that join and leave a batch at different turns (different prompt lengths, so the
    batch is left-padded and trimmed as they come and go) answer as `generate` does alone; a
    seeded sampled one answers the same beside others as alone."""
    asks = [("who are you", 50), ("what is the capital of the moon and why", 20), ("hi", 5), ("tell me", 1)]
    futures = []
    for prompt, n in asks:
        futures.append(engine.infer(Request(None, "personal", prompt=prompt, max_tokens=n)))
        engine._serve()
    sampled = engine.infer(Request(None, "personal", prompt="hello", max_tokens=8, temperature=1.0, seed=7))
    assert not futures[0].done()  # the first one was still in flight when the others joined
    while not all(f.done() for f in futures + [sampled]):
        engine._serve()
    assert [f.result().text for f in futures] == [_alone(engine, p, n) for p, n in asks]
    assert [f.result().completion_tokens for f in futures] == [50, 20, 5, 1]
    again = engine.infer(Request(None, "personal", prompt="hello", max_tokens=8, temperature=1.0, seed=7))
    while not again.done():
        engine._serve()
    assert again.result().text == sampled.result().text
    assert "inference failed" not in caplog.text  # rows joined and left the batch without a fault


def test_prompt_and_max_tokens_past_the_caps_fail_naming_the_param(engine):
    tok = engine.host.task.tokenizer
    assert engine.generation.caps.completion == 64  # half the tiny model's context of 128
    long_text = " ".join(["who are you"] * 60)
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) > 100
    fits = " ".join(["who are you"] * 12)
    prompt = len(tok(fits, add_special_tokens=False)["input_ids"])
    assert 64 < prompt <= 100
    cases = [(Request(None, "personal", prompt=long_text, max_tokens=1), "prompt"),
             (Request(None, "personal", messages=[{"role": "user", "content": long_text}], max_tokens=1), "messages"),
             (Request(None, "personal", prompt="hi", max_tokens=65), "max_tokens"),
             (Request(None, "personal", prompt="hi", max_tokens=65, max_tokens_param="max_completion_tokens"),
              "max_completion_tokens"),
             (Request(None, "personal", prompt=fits, max_tokens=128 - prompt + 1), "max_tokens")]  # past the context
    futures = [engine.infer(r) for r, _ in cases]
    ok = engine.infer(Request(None, "personal", prompt=fits, max_tokens=128 - prompt))
    unset = engine.infer(Request(None, "personal", prompt=fits, max_tokens=500, max_tokens_param=None))
    while not (ok.done() and unset.done()):
        engine._serve()
    assert unset.result().completion_tokens <= 128 - prompt  # a default max_tokens is cut, never refused
    for future, (_, param) in zip(futures, cases):
        error = future.exception(timeout=0)
        assert isinstance(error, TooLong) and error.param == param, (param, error)
    assert ok.result().completion_tokens == 128 - prompt


def test_the_api_answers_400_past_the_caps(server):
    with server.http(server.keys["alice"]) as h:
        long_text = " ".join(["who are you"] * 60)
        for path, body, param, code in [
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}]}, "messages",
                 "context_length_exceeded"),
                ("/v1/completions", {"prompt": long_text}, "prompt", "context_length_exceeded"),
                ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, "max_tokens", "invalid_value"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "max_completion_tokens": 1000}, "max_completion_tokens", "invalid_value")]:
            r = h.post(path, json={"model": "llama", **body})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
        r = h.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 64})
        assert r.status_code == 200, r.text
        # no max_tokens: the route's default (128 for a chat) is cut to the cap, not refused
        r = h.post("/v1/chat/completions", json={"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 64
