"""The shapes of the answers of /v1/chat/completions and /v1/completions, whole or as stream
chunks, as OpenAI's API and the `openai` package's types have them (ChatCompletion,
ChatCompletionChunk, Completion).

Logprobs: chat's content tokens ({token, logprob, bytes, top_logprobs}); the completions'
legacy form ({tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}), whose
top_logprobs hold the sampled token besides the k most likely, and whose text offsets count
from the prompt's start, as OpenAI's do.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from colaft.serve.inference import Answer, Choice, Delta, TokenLogprob


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [{**_token(t), "top_logprobs": [_token(a) for a in t.top]} for t in logprobs],
            "refusal": None}


def _token(t: TokenLogprob) -> dict:
    return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}


def legacy_logprobs(logprobs: list[TokenLogprob] | None, offset: int) -> dict | None:
    """The completions' form; `offset`: characters of the prompt and of the text before these tokens."""
    if logprobs is None:
        return None
    offsets = []
    for t in logprobs:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in logprobs], "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{**{a.token: a.logprob for a in t.top}, t.token: t.logprob} for t in logprobs],
            "text_offset": offsets}


@dataclass
class Shape:
    """One request's answer: `chat` (chat.completion) or not (text_completion)."""

    chat: bool
    model: str
    fingerprint: str  # system_fingerprint: the software and base model that answer
    prompt_chars: int = 0  # a completion's prompt, where its legacy text offsets start
    include_usage: bool = False  # a stream's usage chunk, and usage null on the others
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict[int, int] = field(default_factory=dict)  # a streamed completion's choices: their tokens' offset

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def _head(self, object: str) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, answer: Answer) -> dict:
        choices = [self._choice(c) for c in answer.choices]
        object = "chat.completion" if self.chat else "text_completion"
        return {**self._head(object), "choices": choices, "usage": usage(answer)}

    def _choice(self, c: Choice) -> dict:
        if self.chat:
            return {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "finish_reason": c.finish_reason, "logprobs": chat_logprobs(c.logprobs)}
        return {"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                "logprobs": legacy_logprobs(c.logprobs, self.prompt_chars)}

    # ------------------------------------------------------------- streams
    def chunks(self, delta: Delta, first: bool) -> list[str]:
        """The SSE events of a choice's delta (`first`: the choice's first, which opens a chat's
        message with its role). A chat's finish is an event of its own, with an empty delta."""
        if not self.chat:
            offset = self._offsets.get(delta.index, self.prompt_chars)
            self._offsets[delta.index] = offset + sum(len(t.token) for t in delta.logprobs or [])
            return [self._event({"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason,
                                 "logprobs": legacy_logprobs(delta.logprobs, offset)})]
        events = []
        if first or delta.text or delta.logprobs:
            message = {"role": "assistant", "content": delta.text, "refusal": None} if first \
                else {"content": delta.text}
            events.append(self._event({"index": delta.index, "delta": message, "finish_reason": None,
                                       "logprobs": chat_logprobs(delta.logprobs)}))
        if delta.finish_reason is not None:
            events.append(self._event({"index": delta.index, "delta": {}, "finish_reason": delta.finish_reason,
                                       "logprobs": None}))
        return events

    def usage_chunk(self, answer: Answer) -> str:
        return self._event(None, usage(answer))

    def _event(self, choice: dict | None, usage: dict | None = None) -> str:
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [choice] if choice is not None else []}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
