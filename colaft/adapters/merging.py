"""W + delta_W for a site's merged forward: one adapter's, or a weighted sum of several, and a cache.

`merged` forms W + sum_u c_u delta_W_u (and sum_u c_u delta_b_u) in the layout of W. An
adapter type may offer `merged_sum(adapters, coefs, weight, transposed)` (a staticmethod, like
`grouped` for routing) that adds its adapters' weighted deltas to W in one fused product, or
declines with None; every other mergeable adapter adds its `delta_weight()`. With one adapter
and no coefficients it is `merged_weight` where the type has it (lowrank: one addmm).

`MergeCache` keeps the last result while nothing it came from changed, so that a server
whose adapters do not change every step (an update interval > 1, evaluation, generation)
forms it once per adapter version. See `MergeCache` for what counts as a change and why it
keeps a result only once it was needed twice.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn


def merged(weight: torch.Tensor, adapters: Sequence[nn.Module], coefs: Sequence[float] | None,
           transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W + sum_u coefs[u] delta_W_u, sum_u coefs[u] delta_b_u or None); `coefs` None: one adapter, weight 1.

    `transposed`: W is stored (in, out) (GPT-2's Conv1D), the adapters' deltas (out, in).
    """
    if coefs is None:
        (adapter,) = adapters
        if hasattr(adapter, "merged_weight"):  # W + delta_W in one kernel (no bias delta)
            return adapter.merged_weight(weight, transposed), None
        coefs = [1.0]
    groups: dict[type, list[int]] = {}
    for i, a in enumerate(adapters):
        groups.setdefault(type(a), []).append(i)
    dw = db = None
    for kind, members in groups.items():
        fused = getattr(kind, "merged_sum", None)
        if fused is not None:
            out = fused([adapters[i] for i in members], [coefs[i] for i in members], weight, transposed)
            if out is not None:  # the type may decline a case (a conv2d site)
                weight = out
                continue
        for i in members:
            w, b = adapters[i].delta_weight()
            dw = w * coefs[i] if dw is None else dw + w * coefs[i]
            if b is not None:
                db = b * coefs[i] if db is None else db + b * coefs[i]
    if dw is not None:
        weight = weight + (dw.T if transposed else dw)
    return weight, db


def _signature(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """What identifies the tensors' current values; None when it cannot be known (do not cache).

    `_version` counts in-place writes (`copy_`, `load_state_dict`, `+=`); the data pointer,
    dtype and device catch a tensor whose data was swapped (`p.data = ...`, `module.to()`),
    which leaves the version as it was. An inference tensor has no version counter, and a
    tensor that requires grad would put the result in a graph.
    """
    sig = []
    for t in tensors:
        if t.requires_grad or t.is_inference():
            return None
        sig.append((id(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape))
    return tuple(sig)


class MergeCache:
    """One site's last W + delta_W, kept while W, every adapter tensor and the coefficients stay the same.

    A key holds the signature of every tensor the result came from, the coefficients, and the
    modes that change what the same product returns (autocast and its dtype, inference mode:
    an inference tensor cannot be saved for a later backward). Ids are compared only while
    weak references show the same tensors alive, so a new tensor at a freed one's id is no match.

    A result is kept when the same key comes a second time in a row with autograd off
    (evaluation, generation, the service's completions): a one-off forward then pins nothing,
    and the third forward on is free. With autograd on (a training step) nothing is kept
    unless `under_grad`, which the Trainer sets while every user fits every 2 or more steps
    (interval > 1), and then it is kept at once: the step's graph holds it anyway, and the
    interval's next steps reuse it. With one fit per step every adapter changes every step, so
    it would never be reused and would cost one weight-sized tensor per site between steps
    (BENCHMARKS.md, "What the server step costs beyond the floor").
    A result kept with autograd off is still reused by a training step of the same version.
    `computed` and `hits` count products formed and results reused.
    """

    def __init__(self, under_grad: bool = False):
        self.under_grad = under_grad  # keep results in training steps too (set by the Trainer: intervals > 1)
        self.seen: tuple | None = None  # the key last computed, with weak references to its tensors
        self.kept: tuple | None = None  # (key, weak references, (weight, bias delta)) once reused
        self.computed = 0
        self.hits = 0

    def __getstate__(self) -> dict:  # a copied or pickled site starts empty: weak references do not travel
        return {"under_grad": self.under_grad}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def clear(self) -> None:
        self.seen = self.kept = None

    def merged(self, weight: torch.Tensor, adapters: Sequence[nn.Module], coefs: Sequence[float] | None,
               transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`merged(...)`, reused while nothing it depends on changed."""
        tensors = [weight] + [t for a in adapters for t in (*a.parameters(), *a.buffers())]
        sig = _signature(tensors)
        if sig is None:
            self.clear()
            self.computed += 1
            return merged(weight, adapters, coefs, transposed)
        device = weight.device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
        key = (sig, None if coefs is None else tuple(coefs), transposed, autocast, torch.is_inference_mode_enabled())
        if self.kept is not None and _same(self.kept, key):
            self.hits += 1
            return self.kept[2]
        self.computed += 1
        out = merged(weight, adapters, coefs, transposed)
        entry = (key, [weakref.ref(t) for t in tensors])
        if torch.is_grad_enabled() and not self.under_grad:
            self.kept = self.seen = None
        elif torch.is_grad_enabled() or (self.seen is not None and _same(self.seen, key)):
            # in training with under_grad the step's graph holds the result anyway: keep it now
            self.kept, self.seen = (*entry, out), None
        else:
            self.kept, self.seen = None, entry
        return out


def _same(entry: tuple, key: tuple) -> bool:
    return entry[0] == key and all(r() is not None for r in entry[1])
