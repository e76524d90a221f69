"""Chat and completions as OpenAI answers them, through the real server and the `openai` package:
streams (server-sent events, `[DONE]`, usage in a last chunk when asked), n choices, logprobs
(the model's own, checked against the tiny model's logits), stop strings cut exactly, seeds,
usage, and a 400 naming each option colaft does not honour.
"""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from openai.types import Completion
from openai.types.chat import ChatCompletion
from serve_helpers import add_user, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from colaft.serve.api import Service, create_app
from colaft.serve.db import Database
from colaft.serve.decode import Generation
from colaft.serve.scheduler import Engine
from colaft.serve.settings import Settings

CHAT = [{"role": "user", "content": "who are you"}]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """The tiny Llama and its tokenizer, here: what the server's logprobs and counts must equal."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def _prompt_ids(tok, messages=None, prompt=None) -> list[int]:
    text = prompt if messages is None else tok.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """The model's greedy tokens after `ids` (no cache: every step from scratch) and its log-softmax at each."""
    ids, out, logprobs = list(ids), [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logprobs.append(logits.log_softmax(-1))
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, logprobs


def test_a_streamed_chat_is_the_greedy_answer_chunk_by_chunk(alice):
    whole = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=30)
    chunks = list(alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=30, stream=True,
                                                stream_options={"include_usage": True}))
    assert len(chunks) >= 4  # role, text over several engine turns, finish, usage
    *choices, last = chunks
    assert choices[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in choices][-1] == whole.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in choices)
    assert last.choices == [] and last.usage == whole.usage
    assert whole.usage.completion_tokens == 30


def test_a_streamed_completion_ends_with_done(server, alice):
    whole = alice.completions.create(model="llama", prompt="hello there", max_tokens=20)
    chunks = list(alice.completions.create(model="llama", prompt="hello there", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    with server.http(server.keys["alice"]) as h, h.stream("POST", "/v1/completions", json={
            "model": "llama", "prompt": "hello there", "max_tokens": 20, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = Completion.model_validate_json(lines[-2][len("data: "):])
    assert last.choices == [] and last.usage == whole.usage


def test_n_choices(alice):
    one = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=10)
    three = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=10, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}  # greedy: all equal
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt is counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = dict(model="llama", messages=CHAT, max_tokens=10, temperature=1.0, seed=11)
    single = alice.chat.completions.create(**sampled)
    many = alice.chat.completions.create(**sampled, n=3)
    texts = [c.message.content for c in many.choices]
    assert texts[0] == single.choices[0].message.content and len(set(texts)) == 3  # each its own sample
    chunks = list(alice.chat.completions.create(**sampled, n=3, stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert streamed == texts


def test_a_seed_reproduces_a_sampled_answer(alice):
    sampled = dict(model="llama", prompt="who are you", max_tokens=12, temperature=1.0, top_p=0.9, seed=2024)
    first, again = (alice.completions.create(**sampled).choices[0].text for _ in range(2))
    assert first == again
    assert "".join(c.choices[0].text for c in alice.completions.create(**sampled, stream=True)) == first
    assert alice.completions.create(**sampled, n=2).choices[0].text == first


def test_chat_logprobs_are_the_models(server, alice, reference):
    model, tok = reference
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/chat/completions", json={"model": "llama", "messages": CHAT, "max_tokens": 8,
                                                  "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    answer = ChatCompletion.model_validate(r.json())  # the openai package's type, validated
    content = answer.choices[0].logprobs.content
    prompt = _prompt_ids(tok, CHAT)
    tokens, logprobs = _greedy(model, prompt, 8)
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(content) == 8
    for entry, token, lp in zip(content, tokens, logprobs):
        assert entry.token == tok.decode([token])
        assert entry.logprob == pytest.approx(float(lp[token]), abs=1e-5)
        top = lp.topk(3)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([int(i)]) for i in top.indices]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert bytes(b for entry in content for b in entry.bytes).decode(errors="replace") == \
        answer.choices[0].message.content  # each token's own bytes, a part of a character too
    chunks = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=8, logprobs=True,
                                           top_logprobs=3, stream=True)
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == content


def test_completion_logprobs_have_the_legacy_shape(server, reference):
    model, tok = reference
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/completions", json={"model": "llama", "prompt": "hello there", "max_tokens": 6,
                                             "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = Completion.model_validate(r.json()).choices[0]
    lp = choice.logprobs
    tokens, logprobs = _greedy(model, _prompt_ids(tok, prompt="hello there"), 6)
    assert lp.tokens == [tok.decode([t]) for t in tokens]
    assert lp.token_logprobs == pytest.approx([float(p[t]) for p, t in zip(logprobs, tokens)], abs=1e-5)
    assert all(len(top) in (2, 3) and top[token] == logprob  # the 2 most likely, and the sampled one
               for top, token, logprob in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    assert lp.text_offset[0] == len("hello there")  # offsets from the prompt's start, as OpenAI's
    assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:])] == [len(t) for t in lp.tokens[:-1]]


def test_stop_strings_cut_exactly_and_end_early(alice):
    asked = dict(model="llama", prompt="who are you", max_tokens=40, logprobs=0)
    full = alice.completions.create(**asked).choices[0]
    text, tokens = full.text, full.logprobs.tokens
    # a short piece of the text, first seen well inside it, to stop at
    start = next(i for i in range(4, len(text) - 3) if text[i:i + 2].isprintable() and
                 text.index(text[i:i + 2]) == i and "\ufffd" not in text[i:i + 2])
    stop = text[start:start + 2]
    later = text[start + 2:start + 5]
    expected_tokens = next(k for k in range(1, len(tokens) + 1) if stop in "".join(tokens[:k]))
    for stops in (stop, [later, stop]):  # the first to appear wins, whatever its place in the list
        cut = alice.completions.create(**asked, stop=stops)
        assert cut.choices[0].text == text[:start] and cut.choices[0].finish_reason == "stop"
        # usage: the tokens generated up to and including the one that completed the stop string
        assert cut.usage.completion_tokens == expected_tokens < 40
        streamed = list(alice.completions.create(**asked, stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == text[:start]
        assert streamed[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"parallel_tool_calls": True}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # not streamed
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"n": 33}, "n"),  # past the server's rows in flight
    ("/v1/chat/completions", {"no_such_option": 1}, "no_such_option"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"presence_penalty": -1}, "presence_penalty"),
    ("/v1/completions", {"stream": True, "no_such_option": 1}, "no_such_option"),
])
def test_options_colaft_does_not_honour_are_a_400_naming_them(server, path, extra, param):
    body = {"model": "llama", "max_tokens": 2, **({"messages": CHAT} if "chat" in path else {"prompt": "hi"})}
    with server.http(server.keys["alice"]) as h:
        r = h.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error


def test_neutral_values_of_unhonoured_options_are_accepted(alice):
    """What OpenAI does without an option (null, a zero penalty, a text response format) asks for nothing."""
    plain = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=4)
    same = alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=4, response_format={"type": "text"},
                                         frequency_penalty=0, presence_penalty=0, logit_bias={}, store=False,
                                         metadata={"a": "b"}, user="u", extra_body={"tools": None})
    assert same.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        alice.chat.completions.create(model="llama", messages=CHAT, max_tokens=4,
                                      response_format={"type": "json_object"})
    assert e.value.param == "response_format"


def test_a_client_that_goes_away_mid_stream_frees_its_rows(tmp_path, tiny_llama_dir, monkeypatch):
    """The app in this process (uvicorn on loopback), its engine slowed to 50 ms a token: a client
    that closes its stream after the first chunk cancels the request, whose rows leave the batch
    long before its 64 tokens would have been generated."""
    data = tmp_path / "data"
    key = add_user(data, "carol")
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    settings = Settings(data_dir=data, decode_steps=1)
    engine = Engine("llama", str(tiny_llama_dir), "clm", db, settings)
    step = Generation._step

    def slow_step(self, batch):
        time.sleep(0.05)
        step(self, batch)
    monkeypatch.setattr(Generation, "_step", slow_step)
    requests = []
    infer = engine.infer
    monkeypatch.setattr(engine, "infer", lambda r: requests.append(r) or infer(r))
    server = uvicorn.Server(uvicorn.Config(create_app(Service(settings, db, {"llama": engine}, 2**20, 0)),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started and engine.ready.is_set(), 60)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as h:
            with h.stream("POST", "/v1/completions", json={"model": "llama", "prompt": "who are you",
                                                           "max_tokens": 64, "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first chunk, then the client goes
            started = time.monotonic()
            wait_for(lambda: requests[0].future.cancelled(), 2.0, every=0.01)
            wait_for(lambda: engine.generation.active == 0, 2.0, every=0.01)  # at the engine's next turn
            assert time.monotonic() - started < 2.0  # its 64 tokens would take 3.2 s
            assert h.post("/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 2}
                          ).status_code == 200  # and the server goes on
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()
        db.close()
