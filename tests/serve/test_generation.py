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


def _until_done(engine: Engine, *futures) -> int:
    turns = 0
    while not all(f.done() for f in futures):
        engine._serve()
        turns += 1
    return turns


def test_a_streamed_request_gets_each_turns_tokens_as_they_come(engine):
    """A sink gets each turn's new text while the request is in flight; joined, the deltas are the
    answer (text and logprobs), and the last one carries the finish reason."""
    deltas = []
    future = engine.infer(Request(None, "personal", prompt="who are you", max_tokens=40, logprobs=2,
                                  sink=deltas.append))
    engine._serve()
    assert deltas and not future.done()  # the first tokens came before the answer
    first = len(deltas)
    _until_done(engine, future)
    assert len(deltas) > first
    answer = future.result()
    assert "".join(d.text for d in deltas) == answer.text == _alone(engine, "who are you", 40)
    assert [t for d in deltas for t in d.logprobs] == answer.choices[0].logprobs
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]


def test_a_cancelled_request_leaves_the_batch_at_the_next_turn(engine):
    gone = engine.infer(Request(None, "personal", prompt="who are you", max_tokens=60, n=3))
    stays = engine.infer(Request(None, "personal", prompt="hello there", max_tokens=30))
    engine._serve()
    assert engine.generation.active == 4
    gone_request = engine.generation.batches[0].rows[0].request
    gone_request.cancelled.set()  # what the route does when its client goes away
    engine._serve()
    assert gone.cancelled() and engine.generation.active == 1  # the slots are free
    _until_done(engine, stays)
    assert stays.result().text == _alone(engine, "hello there", 30)
    assert engine.generation.active == 0


def test_a_requests_n_rows_are_admitted_together_within_the_batch_cap(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    engine = Engine("llama", str(tiny_llama_dir), "clm", db, Settings(data_dir=data, max_inference_batch=4))
    try:
        with pytest.raises(TooLong) as refused:
            engine.generation.check(Request(None, "personal", prompt="hi", n=5))
        assert refused.value.param == "n"
        three = engine.infer(Request(None, "personal", prompt="who are you", max_tokens=20, n=3))
        two = engine.infer(Request(None, "personal", prompt="hello", max_tokens=20, n=2))
        engine._serve()
        assert engine.generation.active == 3 and engine.generation.held is not None  # two waits for room
        _until_done(engine, three)
        assert not two.done()
        _until_done(engine, two)
        answer = three.result()
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert {c.text for c in answer.choices} == {_alone(engine, "who are you", 20)}  # greedy: all equal
        assert answer.completion_tokens == 60 and len(two.result().choices) == 2
    finally:
        engine._shutdown()
        db.close()
