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
             -> rows done (eos, a stop string, max_tokens: colaft.serve.output) leave the batch;
                a request's future gets its answer when its last row is done
             -> each streamed row's new text goes to its request's sink, once per turn
             rows of a request whose client went away (`cancelled`) leave at the next turn
    then the training step, then the next turn: a long completion holds the thread for one
    chunk, never for its whole length, and never stops training either.

Why continuous batching rather than a fair queue of per-request slices: at this model scale a
decode step costs about the same for 1 row as for 32 (weights read once, Python and kernel
launch overhead per layer), so rows that share the forward cost each other little: a short
completion beside a long one takes about its time alone. Slices in turn would give every
request the thread for its slice, so a short one would wait one slice of every other request
per token of its own (twice its time alone beside one long one, more beside several).

A request with n choices is n rows of one prompt, admitted together (they count n against
max_inference_batch). Row i samples with its own generator, seeded by `seed` for row 0 and
by a value derived from `seed` and i for the others: choice 0 is the answer the same request
with n=1 gets, and the others differ from it.

Only the mode splits rows (personal or collaborative: the ColaModel's state, not a row's);
rows of different adapters and sampling settings share a batch. Greedy rows take the argmax
of their logits, as `generate` does: a row's tokens are those it gets alone (to round-off,
as with any batch). Sampling is HF's (temperature, top-k 50, top-p) with each request's own
generator, seeded by its `seed`: reproducible whoever shares its batch, and untouched by the
training between chunks.
"""
from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from colaft.serve.inference import Answer, Choice, Delta, ModelGone, Request, TooLong, classify, prompt_ids
from colaft.serve.output import Output
from colaft.serve.settings import Settings

log = logging.getLogger("colaft.serve")

TOP_K = 50
"""HF generate's default top-k when sampling (what the service sampled with before)."""
_GOLDEN = 0x9E3779B97F4A7C15  # spreads the seeds of a request's rows over torch's 64-bit range


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
class Ask:
    """A request in flight: its choices as its rows finish; answered when the last one does."""

    request: Request
    prompt: int  # its prompt's tokens
    choices: list[Choice | None] = field(default_factory=list)

    def finish(self, choice: Choice) -> None:
        self.choices[choice.index] = choice
        future = self.request.future
        if all(c is not None for c in self.choices) and not future.done():
            future.set_result(Answer(self.choices, self.prompt))


@dataclass
class Row:
    """One choice of a request being generated."""

    ask: Ask
    generator: torch.Generator | None  # sampling rows
    output: Output

    @property
    def request(self) -> Request:
        return self.ask.request


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
        self.host, self.decode_steps, self.max_rows = host, settings.decode_steps, settings.max_inference_batch
        self.caps = Caps.of(context_length(host.base.config), settings.max_prompt_tokens,
                            settings.max_completion_tokens)
        self.batches: list[Batch] = []
        self.held: Request | None = None  # taken from the queue, waiting for room for its n rows

    def check(self, r: Request) -> None:
        """What can be checked of a request before it is queued (its max_tokens, n): TooLong past the caps."""
        if r.n > self.max_rows:
            raise TooLong(f"n is too large: {r.n}; this server generates at most {self.max_rows} rows at once",
                          "n", "invalid_value")
        if self.host.task_name != "sc":
            self.caps.check_max_tokens(r)

    def take(self, requests: queue.SimpleQueue) -> list[Request]:
        """The queued requests whose rows fit beside those in flight (max_inference_batch rows in
        all); the first that does not fit waits, and nothing after it is taken before it."""
        taken, room = [], self.max_rows - self.active
        while room > 0:
            try:
                r = self.held or requests.get_nowait()
            except queue.Empty:
                break
            self.held = None
            if r.cancelled.is_set():
                r.future.cancel()
                continue
            if r.n > room and (taken or self.active):
                self.held = r
                break
            taken.append(r)
            room -= r.n
        return taken

    @property
    def active(self) -> int:
        """Rows in flight."""
        return sum(len(b.rows) for b in self.batches)

    @property
    def busy(self) -> bool:
        """Rows in flight, or a request waiting for room: the engine turns again at once."""
        return bool(self.active or self.held)

    def users(self) -> set[str]:
        """The jobs whose adapters rows in flight use (not to be unloaded)."""
        return {r.request.user for b in self.batches for r in b.rows if r.request.user is not None}

    def add(self, requests: list[Request], load: Callable[[str], None]) -> None:
        """Admit `requests`; `load(job_id)` makes sure a finished job's adapters are in the ColaModel."""
        rows: dict[str, list[tuple[Request, list[int]]]] = {}
        for r in requests:
            try:
                ids = None
                if self.host.task_name != "sc":
                    ids = prompt_ids(self.host, r)
                    self.caps.check(r, len(ids))
                if r.user is not None:
                    load(r.user)
            except Exception as e:  # TooLong, a model deleted meanwhile, or adapters that could not load
                if not isinstance(e, TooLong | ModelGone):  # this request alone fails
                    log.exception("%s: inference failed", self.host.id)
                r.future.set_exception(e)
                continue
            rows.setdefault(r.mode, []).append((r, ids))
        for mode, group in rows.items():
            requests = [r for r, _ in group]
            if self.host.task_name == "sc":
                self._run(mode, requests, self._classify, requests)
            else:
                self._run(mode, requests, self._prefill, mode, group)

    def advance(self) -> None:
        """Every batch takes up to `decode_steps` tokens; rows done answer and leave; streamed rows
        send what they gained; rows whose request was cancelled leave first."""
        for batch in list(self.batches):
            self._drop_cancelled(batch)
            ok = True
            for _ in range(self.decode_steps):
                if not batch.rows:
                    break
                ok = self._run(batch.mode, [r.request for r in batch.rows], self._step, batch)
                if not ok:  # every row's request has the error
                    break
            if ok:
                for row in batch.rows:
                    self._send(row)
            if not ok or not batch.rows:
                self.batches.remove(batch)

    def close(self, error: Exception) -> None:
        requests = [row.request for batch in self.batches for row in batch.rows] + [self.held] * bool(self.held)
        for r in requests:
            if not r.future.done():
                r.future.set_exception(error)
        self.batches, self.held = [], None

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
            if r.sink is not None:
                for c in a.choices:
                    r.sink(Delta(c.index, c.text, None, c.finish_reason))
            r.future.set_result(a)

    def _drop_cancelled(self, batch: Batch) -> None:
        """Rows of requests whose client went away leave the batch (their slots free for others)."""
        keep = [i for i, row in enumerate(batch.rows) if not row.request.cancelled.is_set()]
        if len(keep) == len(batch.rows):
            return
        for row in batch.rows:
            if row.request.cancelled.is_set():
                row.request.future.cancel()
        if keep:
            batch.keep(keep)
        else:
            batch.rows = []

    def _send(self, row: Row) -> None:
        """A streamed row's new text (and its finish once done) to its request's sink."""
        if row.request.sink is not None and not row.request.cancelled.is_set():
            delta = row.output.delta()
            if delta is not None:
                row.request.sink(delta)

    @torch.no_grad()
    def _prefill(self, mode: str, group: list[tuple[Request, list[int]]]) -> None:
        tok = self.host.task.tokenizer
        rows, prompts = [], []
        for r, ids in group:
            ask = Ask(r, len(ids), [None] * r.n)
            rows += [Row(ask, _generator(r, i), Output(tok, r, i)) for i in range(r.n)]
            prompts += [ids] * r.n
        batch = tok.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        new = Batch(mode, rows, DynamicCache(), batch["attention_mask"])
        self._forward(new, batch["input_ids"])
        same = [b for b in self.batches if b.mode == mode and b.mergeable()]
        if same and new.rows and new.mergeable():
            same[0].join(new)
        elif new.rows:
            self.batches.append(new)

    @torch.no_grad()
    def _step(self, batch: Batch) -> None:
        tokens = torch.tensor([[r.output.ids[-1]] for r in batch.rows])
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
        for i, row in enumerate(batch.rows):
            token = _pick(logits[i:i + 1], row)
            row.output.add(token, logits[i].log_softmax(-1) if row.request.logprobs is not None else None)
        keep = [i for i, row in enumerate(batch.rows) if not row.output.done]
        for row in batch.rows:
            if row.output.done:
                self._send(row)
                row.ask.finish(row.output.choice())
        if not keep:
            batch.rows = []  # the batch goes (advance, _prefill), its cache with it
        elif len(keep) < len(batch.rows):
            batch.keep(keep)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _generator(r: Request, index: int) -> torch.Generator | None:
    """Row `index`'s generator: seeded by the request's seed (row 0), or by one derived from it."""
    if r.temperature <= 0:
        return None
    generator = torch.Generator()
    if r.seed is None:
        generator.seed()
    else:
        generator.manual_seed(r.seed if index == 0 else (r.seed + index * _GOLDEN) % 2**64)
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
