"""Completions generated a few tokens at a time, interleaved across requests: token-level
continuous batching, on the engine's thread between training steps.

    each turn of the engine (colaft.serve.scheduler):
      admit  new requests (at most max_inference_batch rows in flight): prompt tokenised and
             checked against the caps (TooLong: a 400 naming the param), adapters loaded;
             a classification model answers at once (one forward)
             -> the new rows of each mode: one left-padded prefill -> their first token
             -> they join their mode's batch: its KV cache and mask left-padded to one length
      advance every batch `decode_steps` steps: one forward of all its rows per token, each
             row on its job's adapters (per-row routing) and with its own sampling
             -> rows done (eos, max_tokens) leave the batch; their futures get their answers
    then the training step, then the next turn: a long completion holds the thread for one
    chunk, never for its whole length, and never stops training either.

Why continuous batching rather than a fair queue of per-request slices: at this model scale a
decode step costs about the same for 1 row as for 32 (weights read once, Python and kernel
launch overhead per layer), so rows that share the forward cost each other little: a short
completion beside a long one takes about its time alone. Slices in turn would give every
request the thread for its slice, so a short one would wait one slice of every other request
per token of its own (twice its time alone beside one long one, more beside several).

Only the mode splits rows (personal or collaborative: the ColaModel's state, not a row's);
rows of different adapters and sampling settings share a batch. Greedy rows take the argmax
of their logits, as `generate` does: a row's tokens are those it gets alone (to round-off,
as with any batch). Sampling is HF's (temperature, top-k 50, top-p) with each request's own
generator, seeded by its `seed`: reproducible whoever shares its batch, and untouched by the
training between chunks.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from colaft.serve.inference import Request, TooLong, answer_of, classify, prompt_ids
from colaft.serve.settings import Settings

log = logging.getLogger("colaft.serve")

TOP_K = 50
"""HF generate's default top-k when sampling (what the service sampled with before)."""


def context_length(config) -> int | None:
    """Positions the model can attend to (None: not stated by its config)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class Caps:
    """How long a completion may be on one base model."""

    context: int | None  # the model's context (None: unknown, no joint limit)
    prompt: int  # prompt tokens
    completion: int  # max_tokens

    @classmethod
    def of(cls, context: int | None, prompt: int | None, completion: int | None) -> Caps:
        """The caps asked for (None: the defaults), within the model's `context`: completions up to
        half of it (4096 at most), prompts up to the rest."""
        if context is None:
            return cls(None, prompt or 4096, completion or 4096)
        completion = min(completion or min(4096, context // 2), context - 1)
        return cls(context, min(prompt or context - completion, context - 1), completion)

    def check(self, r: Request, prompt: int) -> None:
        """Refuse a request past the caps (TooLong, naming the param); a max_tokens the client did
        not set is cut to the completion cap and to what the context leaves after the prompt."""
        if prompt > self.prompt:
            raise TooLong(f"The prompt has {prompt} tokens; this model takes at most {self.prompt} "
                          "(colaft serve --max-prompt-tokens)", r.prompt_param, "context_length_exceeded")
        room = self.context - prompt if self.context is not None else r.max_tokens
        if r.max_tokens_param is None:
            r.max_tokens = max(1, min(r.max_tokens, self.completion, room))
            return
        self.check_max_tokens(r)
        if r.max_tokens > room:
            raise TooLong(f"{r.max_tokens_param} is too large: the prompt's {prompt} tokens and {r.max_tokens} "
                          f"completion tokens are past this model's context of {self.context} tokens",
                          r.max_tokens_param, "context_length_exceeded")

    def check_max_tokens(self, r: Request) -> None:
        """Refuse a max_tokens the client set past the completion cap (before the prompt is counted)."""
        if r.max_tokens_param is not None and r.max_tokens > self.completion:
            raise TooLong(f"{r.max_tokens_param} is too large: {r.max_tokens}; this model answers with at most "
                          f"{self.completion} tokens (colaft serve --max-completion-tokens)",
                          r.max_tokens_param, "invalid_value")


@dataclass
class Row:
    """One request being generated."""

    request: Request
    prompt: int  # its prompt's tokens
    generator: torch.Generator | None  # sampling rows
    out: list[int]

    def done(self, eos: int | None) -> bool:
        return len(self.out) >= self.request.max_tokens or (eos is not None and self.out[-1] == eos)


class Batch:
    """Rows of one mode decoding together: their KV cache (left-padded), mask and next tokens."""

    def __init__(self, mode: str, rows: list[Row], cache: DynamicCache, mask: torch.Tensor):
        self.mode, self.rows, self.cache, self.mask = mode, rows, cache, mask  # mask: (B, T) of the cache

    def mergeable(self) -> bool:
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, other: Batch) -> None:
        """`other`'s rows join this batch: both caches left-padded to the longer one, then stacked."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)  # (B, heads, T, dim)
                setattr(mine, name, torch.cat([F.pad(a, (0, 0, length - a.shape[2], 0)),
                                               F.pad(b, (0, 0, length - b.shape[2], 0))]))
        self.mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in (self.mask, other.mask)])
        self.rows += other.rows

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay; columns that are padding in every row left go."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).int().argmax())
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self.rows = [self.rows[i] for i in rows]


class Generation:
    """The completions in flight on one model host (colaft.serve.host.ModelHost)."""

    def __init__(self, host, settings: Settings):
        self.host, self.decode_steps = host, settings.decode_steps
        self.caps = Caps.of(context_length(host.base.config), settings.max_prompt_tokens,
                            settings.max_completion_tokens)
        self.batches: list[Batch] = []

    def check(self, r: Request) -> None:
        """What can be checked of a request before it is queued (its max_tokens): TooLong past the caps."""
        if self.host.task_name != "sc":
            self.caps.check_max_tokens(r)

    @property
    def active(self) -> int:
        """Rows in flight."""
        return sum(len(b.rows) for b in self.batches)

    def users(self) -> set[str]:
        """The jobs whose adapters rows in flight use (not to be unloaded)."""
        return {r.request.user for b in self.batches for r in b.rows if r.request.user is not None}

    def add(self, requests: list[Request], load: Callable[[str], None]) -> None:
        """Admit `requests`; `load(job_id)` makes sure a finished job's adapters are in the ColaModel."""
        tok = self.host.task.tokenizer
        rows: dict[str, list[tuple[Request, list[int]]]] = {}
        for r in requests:
            try:
                ids = None
                if self.host.task_name != "sc":
                    ids = prompt_ids(self.host, r)
                    self.caps.check(r, len(ids))
                if r.user is not None:
                    load(r.user)
            except Exception as e:  # TooLong, or adapters that could not load: this request alone fails
                if not isinstance(e, TooLong):
                    log.exception("%s: inference failed", self.host.id)
                r.future.set_exception(e)
                continue
            rows.setdefault(r.mode, []).append((r, ids))
        for mode, group in rows.items():
            requests = [r for r, _ in group]
            if self.host.task_name == "sc":
                self._run(mode, requests, self._classify, requests)
            else:
                self._run(mode, requests, self._prefill, mode, group, tok)

    def advance(self) -> None:
        """Every batch takes up to `decode_steps` tokens; rows done answer and leave."""
        for batch in list(self.batches):
            for _ in range(self.decode_steps):
                if not self._run(batch.mode, [r.request for r in batch.rows], self._step, batch):
                    self.batches.remove(batch)
                    break
                if not batch.rows:
                    self.batches.remove(batch)
                    break

    def close(self, error: Exception) -> None:
        for batch in self.batches:
            for row in batch.rows:
                row.request.future.set_exception(error)
        self.batches = []

    # ------------------------------------------------------------- inside
    def _run(self, mode: str, requests: list[Request], work: Callable, *args) -> bool:
        """`work(*args)` in `mode`; if it fails, every one of `requests` gets the error (the engine goes on)."""
        try:
            self.host.set_mode(mode)
            work(*args)
            return True
        except Exception as e:
            log.exception("%s: inference failed", self.host.id)
            for r in requests:
                if not r.future.done():
                    r.future.set_exception(e)
            return False

    def _classify(self, requests: list[Request]) -> None:
        for r, a in zip(requests, classify(self.host, requests)):
            r.future.set_result(a)

    @torch.no_grad()
    def _prefill(self, mode: str, group: list[tuple[Request, list[int]]], tok) -> None:
        batch = tok.pad({"input_ids": [ids for _, ids in group]}, padding_side="left", return_tensors="pt")
        rows = [Row(r, len(ids), _generator(r), []) for r, ids in group]
        new = Batch(mode, rows, DynamicCache(), batch["attention_mask"])
        self._forward(new, batch["input_ids"])
        same = [b for b in self.batches if b.mode == mode and b.mergeable()]
        if same and new.rows and new.mergeable():
            same[0].join(new)
        elif new.rows:
            self.batches.append(new)

    @torch.no_grad()
    def _step(self, batch: Batch) -> None:
        tokens = torch.tensor([[r.out[-1]] for r in batch.rows])
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        self._forward(batch, tokens)

    def _forward(self, batch: Batch, input_ids: torch.Tensor) -> None:
        """Feed `input_ids` (B, n) to the batch's rows (their mask already covers them), take
        each row's next token, answer and drop the rows done."""
        model, routing = self.host.model([r.request.user for r in batch.rows])
        model.eval()
        device = _device(model)
        mask = batch.mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        logits = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions,
                       past_key_values=batch.cache, use_cache=True, **routing).logits[:, -1].float()  # (B, V)
        eos = self.host.task.tokenizer.eos_token_id
        for i, row in enumerate(batch.rows):
            row.out.append(_pick(logits[i:i + 1], row))
        keep = [i for i, row in enumerate(batch.rows) if not row.done(eos)]
        for row in batch.rows:
            if row.done(eos):
                row.request.future.set_result(answer_of(self.host.task.tokenizer, row.request, row.out, row.prompt))
        if not keep:
            batch.rows = []  # the batch goes (advance, _prefill), its cache with it
        elif len(keep) < len(batch.rows):
            batch.keep(keep)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generator(r: Request) -> torch.Generator | None:
    if r.temperature <= 0:
        return None
    generator = torch.Generator()
    if r.seed is None:
        generator.seed()
    else:
        generator.manual_seed(r.seed)
    return generator


def _pick(logits: torch.Tensor, row: Row) -> int:
    """The row's next token from its logits (1, V): the argmax, or a sample as HF's generate draws it."""
    r = row.request
    if row.generator is None:
        return int(logits.argmax(-1))
    scores = TemperatureLogitsWarper(r.temperature)(None, logits)
    scores = TopKLogitsWarper(TOP_K)(None, scores)
    if r.top_p < 1.0:
        scores = TopPLogitsWarper(r.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=row.generator))
