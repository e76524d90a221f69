"""The text of one choice as its tokens come: decoded incrementally, cut exactly at a stop string,
streamed only where it can no longer change.

    each generated token -> Output.add: an eos ends it (finish "stop", not counted); else the
        token is counted, its logprobs taken, and the text grows by what the token completes
        -> the first stop string in the text: the text is cut right before it, finish "stop"
           (the token that completed it is the last one counted)
        -> max_tokens counted: finish "length"
    a stream -> Output.delta: the text not sent yet, less what may still turn out to begin a
        stop string (or be the first bytes of a character): a client never gets text that the
        answer does not hold

Decoding is incremental (the offsets of vLLM's detokenizer): each token decodes a short window
of the ids before it, not the whole text, so a row's cost per token does not grow with its
length; a token that ends in the middle of a character (U+FFFD) waits for the next.
"""
from __future__ import annotations

import re

import torch

from colaft.serve.inference import Choice, Delta, Request, TokenLogprob

_PARTIAL = "\ufffd"


class Output:
    """One choice (row) of a request: its token ids, text, logprobs and what a stream was sent."""

    def __init__(self, tok, request: Request, index: int):
        self.tok, self.request, self.index = tok, request, index
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        self.text = ""
        self.finish: str | None = None
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of `text`
        self._sent_text = self._sent_logprobs = 0  # what a stream got
        self._stops = [s for s in request.stops if s]

    @property
    def done(self) -> bool:
        return self.finish is not None

    def add(self, token: int, logprobs: torch.Tensor | None) -> None:
        """The row's next token; `logprobs` (V,): the model's log-softmax at its place (when asked)."""
        tok = self.tok
        if token == tok.eos_token_id:
            before = len(self.text)
            self._flush()
            if self._stops:
                self._cut(before)
            self.finish = "stop"
            return
        self.ids.append(token)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(_token_logprob(tok, token, logprobs, self.request.logprobs))
        before = len(self.text)
        self._grow(final=False)
        if self._stops and self._cut(before):
            return
        if len(self.ids) >= self.request.max_tokens:
            self._flush()
            if not (self._stops and self._cut(before)):
                self.finish = "length"

    def choice(self) -> Choice:
        return Choice(self.index, self.text, self.finish or "length", len(self.ids), self.logprobs)

    def delta(self) -> Delta | None:
        """What a stream has not been sent yet (None: nothing); once done, all of it and the finish."""
        end = len(self.text) if self.done else len(self.text) - self._held()
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs[self._sent_logprobs:]
            self._sent_logprobs = len(self.logprobs)
        text = self.text[self._sent_text:end] if end > self._sent_text else ""
        self._sent_text = max(self._sent_text, end)
        if not text and not logprobs and not self.done:
            return None
        return Delta(self.index, text, logprobs, self.finish)

    # ------------------------------------------------------------- inside
    def _grow(self, final: bool) -> None:
        """The text gains what ids[_read:] complete (all of it, even a partial character, when `final`)."""
        decode = self.tok.decode
        known = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        new = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(new) > len(known) and (final or not new.endswith(_PARTIAL)):
            self.text += new[len(known):]
            self._prefix, self._read = self._read, len(self.ids)

    def _flush(self) -> None:
        if self._read < len(self.ids):
            self._grow(final=True)

    def _cut(self, before: int) -> bool:
        """Cut the text at the first stop string (searched where the text just grew): True if one is there."""
        longest = max(len(s) for s in self._stops)
        start = max(0, before - longest + 1)
        found = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        if not found:
            return False
        self.text, self.finish = self.text[:min(found)], "stop"
        return True

    def _held(self) -> int:
        """Characters at the text's end a stream must not send yet: the longest suffix that begins a stop string."""
        text, held = self.text, 0
        for stop in self._stops:
            i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
            while i != -1 and len(text) - i > held:  # the earliest match is the longest
                if stop.startswith(text[i:]):
                    held = len(text) - i
                    break
                i = text.find(stop[0], i + 1)
        return held


def _token_logprob(tok, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
    alternatives = []
    if top:
        values, ids = logprobs.topk(top)
        alternatives = [TokenLogprob(tok.decode([int(i)]), float(v), token_bytes(tok, int(i)))
                        for v, i in zip(values, ids)]
    return TokenLogprob(tok.decode([token]), float(logprobs[token]), token_bytes(tok, token), alternatives)


def token_bytes(tok, token: int) -> list[int]:
    """A token's bytes: its text's, unless it holds a part of a character; then read from its
    piece, a byte-level BPE's (GPT-2's byte alphabet) or a byte-fallback one ("<0xE2>")."""
    text = tok.decode([token])
    if _PARTIAL not in text:
        return list(text.encode())
    piece = tok.convert_ids_to_tokens(token)
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        return [int(piece[3:5], 16)]
    if all(c in _BYTE_OF for c in piece):
        return [_BYTE_OF[c] for c in piece]
    return list(text.encode())


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte in a piece."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()
