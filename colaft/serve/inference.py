"""Inference on the base model and its fine-tuned adapters, batched across adapters.

    requests (from the API) -> the engine's thread, between training steps
      -> grouped by mode and sampling settings -> one left-padded batch per group, each row
         routed to its job's adapters (None: the base model alone) -> generate / classify
      -> each request's future gets its text, finish reason and token counts

Runs on the engine's thread, on its model host (colaft.serve.host), because the ColaModel's
mode and routing are shared state.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

log = logging.getLogger("colaft.serve")


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
    future: Future | None = None


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def serve_requests(host, requests: list[Request], load: Callable[[str], None]) -> None:
    """Answer `requests` (setting their futures), one batch per (mode, sampling) group, on `host`
    (a ModelHost); `load(job_id)` makes sure a finished job's adapters are in its ColaModel."""
    groups: dict[tuple, list[Request]] = {}
    for r in requests:
        groups.setdefault((r.mode, r.temperature, r.top_p, r.seed), []).append(r)
    for (mode, *_), group in groups.items():
        try:
            for r in group:
                if r.user is not None:
                    load(r.user)
            host.set_mode(mode)
            answers = _classify(host, group) if host.task_name == "sc" else _generate(host, group)
        except Exception as e:  # answer every request of the group; the engine goes on
            log.exception("%s: inference failed", host.id)
            for r in group:
                r.future.set_exception(e)
            continue
        for r, a in zip(group, answers):
            r.future.set_result(a)


def _prompt_ids(host, r: Request) -> list[int]:
    tok = host.task.tokenizer
    if r.messages is not None:
        text = host.task.prompt(r.messages)
    else:
        text = r.prompt
    return tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]


@torch.no_grad()
def _generate(host, group: list[Request]) -> list[Answer]:
    tok = host.task.tokenizer
    prompts = [_prompt_ids(host, r) for r in group]
    batch = tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")  # (B, T)
    first = group[0]
    sample = first.temperature > 0
    config = GenerationConfig(max_new_tokens=max(r.max_tokens for r in group), do_sample=sample,
                              temperature=first.temperature if sample else None,
                              top_p=first.top_p if sample else None, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    if first.seed is not None:
        torch.manual_seed(first.seed)
    model, routing = host.model([r.user for r in group])
    model.eval()
    out = model.generate(**batch, generation_config=config, **routing)  # (B, T + new)
    answers = []
    for r, ids, prompt in zip(group, out[:, batch["input_ids"].shape[1]:].tolist(), prompts):
        ids = ids[:r.max_tokens]
        finish = "length"
        if tok.eos_token_id in ids:
            ids, finish = ids[:ids.index(tok.eos_token_id)], "stop"
        text = tok.decode(ids, skip_special_tokens=True)
        for stop in r.stops:
            if stop and stop in text:
                text, finish = text[:text.index(stop)], "stop"
        answers.append(Answer(text, finish, len(prompt), len(ids)))
    return answers


@torch.no_grad()
def _classify(host, group: list[Request]) -> list[Answer]:
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
