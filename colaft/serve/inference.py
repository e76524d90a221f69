"""Inference requests and answers: what the API queues on an engine and what comes back.

    requests (from the API) -> the engine's thread, between training steps
      -> colaft.serve.decode: generated a few tokens per turn, interleaved across requests,
         each row routed to its job's adapters (None: the base model alone); a
         classification model answers at once (`classify`)
      -> each request's future gets its choices (text, finish reason, tokens, logprobs) and
         its prompt's tokens, or TooLong; a streamed request's `sink` gets each choice's new
         text as the engine produces it (a Delta per choice per engine turn)

Runs on the engine's thread, on its model host (colaft.serve.host), because the ColaModel's
mode and routing are shared state.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


@dataclass
class Request:
    """One completion: a chat conversation (`messages`) or a raw `prompt`."""

    user: str | None  # the job whose adapters answer; None: the base model
    mode: str  # the job's mode ("personal" for the base model)
    messages: list[dict] | None = None
    prompt: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    max_tokens_param: str | None = "max_tokens"  # the body's field that set max_tokens (errors name it);
    # None: the client set none, max_tokens is a default (cut to the caps, never refused)
    n: int = 1  # choices: rows of the same prompt
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k most likely alternatives
    sink: Callable[[Delta], None] | None = None  # a streamed request: called on the engine's thread
    cancelled: threading.Event = field(default_factory=threading.Event)  # set: its rows leave (client gone)
    future: Future | None = None

    @property
    def prompt_param(self) -> str:
        return "prompt" if self.messages is None else "messages"


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its logits, before
    temperature, top-k and top-p), and the `top` most likely tokens at its place."""

    token: str
    logprob: float
    bytes: list[int]  # the token's own bytes (a part of a character decodes to U+FFFD in `token`)
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int  # completion tokens: up to the one that completed a stop string; an eos is not counted
    logprobs: list[TokenLogprob] | None = None  # one per counted token (None: not asked for)


@dataclass
class Delta:
    """What one choice adds to a stream: its new text and tokens' logprobs, and its finish reason
    once it is done (None before)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclass
class Answer:
    choices: list[Choice]
    prompt_tokens: int  # counted once, however many choices

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


class TooLong(ValueError):
    """A request past the caps (a prompt or max_tokens too long): the API answers 400 naming `param`."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


class ModelGone(LookupError):
    """The request's model was deleted after the request found it (it answers 404, as a model that
    does not exist)."""


def prompt_ids(host, r: Request) -> list[int]:
    tok = host.task.tokenizer
    if r.messages is not None:
        text = host.task.prompt(r.messages)
    else:
        text = r.prompt
    return tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]


@torch.no_grad()
def classify(host, group: list[Request]) -> list[Answer]:
    """A classification model answers with the label it predicts (the job's labels, as text)."""
    tok = host.task.tokenizer
    texts = [r.prompt if r.messages is None else _last_user_text(r.messages) for r in group]
    batch = tok(texts, truncation=True, max_length=512, padding=True, return_tensors="pt")
    model, routing = host.model([r.user for r in group])
    model.eval()
    logits = model(**batch, **routing).logits  # (B, num_labels)
    answers = []
    for i, r in enumerate(group):
        labels = host.labels[r.user] if r.user is not None else list(range(logits.shape[1]))
        label = labels[int(logits[i, :len(labels)].argmax())]
        answers.append(Answer([Choice(k, str(label), "stop", 1) for k in range(r.n)],
                              int(batch["attention_mask"][i].sum())))
    return answers


def _last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]
