"""Inference requests and answers: what the API queues on an engine and what comes back.

    requests (from the API) -> the engine's thread, between training steps
      -> colaft.serve.decode: generated a few tokens per turn, interleaved across requests,
         each row routed to its job's adapters (None: the base model alone); a
         classification model answers at once (`classify`)
      -> each request's future gets its text, finish reason and token counts, or TooLong

Runs on the engine's thread, on its model host (colaft.serve.host), because the ColaModel's
mode and routing are shared state.
"""
from __future__ import annotations

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
    future: Future | None = None

    @property
    def prompt_param(self) -> str:
        return "prompt" if self.messages is None else "messages"


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class TooLong(ValueError):
    """A request past the caps (a prompt or max_tokens too long): the API answers 400 naming `param`."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


def prompt_ids(host, r: Request) -> list[int]:
    tok = host.task.tokenizer
    if r.messages is not None:
        text = host.task.prompt(r.messages)
    else:
        text = r.prompt
    return tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]


def answer_of(tok, r: Request, ids: list[int], prompt_tokens: int) -> Answer:
    """The answer of generated token `ids`: cut at eos (finish "stop"), then at the first stop string."""
    ids = ids[:r.max_tokens]
    finish = "length"
    if tok.eos_token_id in ids:
        ids, finish = ids[:ids.index(tok.eos_token_id)], "stop"
    text = tok.decode(ids, skip_special_tokens=True)
    for stop in r.stops:
        if stop and stop in text:
            text, finish = text[:text.index(stop)], "stop"
    return Answer(text, finish, prompt_tokens, len(ids))


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
        answers.append(Answer(str(label), "stop", int(batch["attention_mask"][i].sum()), 1))
    return answers


def _last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]
