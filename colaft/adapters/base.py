"""The adapter registry: a string key -> a factory `(SiteSpec, ColaConfig) -> nn.Module`.

An adapter g is any nn.Module whose forward maps a site's input x to a delta on the
site's output: h = f(x) + g(x). A mergeable adapter also has `delta_weight()` returning
(delta_W, delta_b or None) in the site's canonical layout (see SiteSpec), so the server can
run on W + delta_W instead; one without a bias delta may also offer
`merged_weight(W, transposed) -> W + delta_W` to form the sum in one fused kernel (lowrank
does: addmm), and its type a staticmethod `merged_sum(adapters, coefs, W, transposed)` ->
W + sum_u coefs[u] delta_W_u in one product, or None to decline (collaborative mode; see
`adapters/merging.py`). Adding an adapter type means one new file that calls
`register_adapter`; a user can register any nn.Module class the same way.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class SiteSpec:
    """What an adapter needs to know about the module it adapts.

    Canonical weight layouts: linear (out, in); conv2d (out, in, kh, kw); embedding
    (num_embeddings, dim) - GPT-2's Conv1D is presented as linear (the site transposes).
    """

    kind: str  # "linear" | "conv2d" | "embedding"
    in_features: int  # in_features | in_channels | num_embeddings
    out_features: int  # out_features | out_channels | embedding_dim
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    padding_idx: int | None = None
    padding_mode: str = "zeros"  # conv2d: adapters pad as the site does, so that W + delta_W is exact


@runtime_checkable
class Mergeable(Protocol):
    def delta_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...


AdapterFactory = Callable[[SiteSpec, Any], nn.Module]  # (spec, ColaConfig) -> adapter
ADAPTERS: dict[str, AdapterFactory] = {}


def register_adapter(name: str, factory: AdapterFactory | None = None):
    """Register an adapter type; usable as `register_adapter("x", Cls)` or as a decorator."""

    def add(f: AdapterFactory) -> AdapterFactory:
        ADAPTERS[name] = f
        return f

    return add(factory) if factory is not None else add


def build_adapter(name: str, spec: SiteSpec, config) -> nn.Module:
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; registered: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](spec, config)


def is_mergeable(adapter: nn.Module) -> bool:
    return isinstance(adapter, Mergeable)


def unsupported(name: str, spec: SiteSpec) -> ValueError:
    return ValueError(f"adapter {name!r} does not support {spec.kind} sites")
