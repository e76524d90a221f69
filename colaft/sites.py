"""Sites: the modules that get an adapter, and the thin wrapper that runs it there.

A site replaces its module's `forward` (an instance attribute, removed on detach) with
    h = f(x) + g(dropout(x))      unmerged: the adapter runs, parameters frozen, input not detached
    h = f(x; W + delta_W)         merged: W is never written; W + delta_W is made per call or, with no grad, per version
While the server records, each call appends (site, x, the edge of h) so that the server can take
dL/dh and emit the packet (x, dL/dh). The base weights are never modified by a site.

An embedding that scales its own output (`embed_scale`: BART's and mBART's scaled word
embeddings, Gemma 3's) scales the adapter's output too, as PEFT's LoRA does:
h = s * E(x) + s * g(x), merged s * E(x; W + delta_W); so dL/dg = s * dL/dh is what the
packet carries.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import re2
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from transformers.pytorch_utils import Conv1D

from colaft.adapters import SiteSpec, is_mergeable
from colaft.adapters.merging import MergeCache
from colaft.routing import Route, routed_delta

SUPPORTED = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)
LINEAR_KINDS = (nn.Linear, Conv1D)


def _pair(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def site_spec(module: nn.Module) -> SiteSpec:
    """Describe a supported module for the adapter factories."""
    if isinstance(module, nn.Linear):
        return SiteSpec("linear", module.in_features, module.out_features)
    if isinstance(module, Conv1D):  # GPT-2: weight stored (in, out)
        return SiteSpec("linear", module.weight.shape[0], module.nf)
    if isinstance(module, nn.Conv2d):
        return SiteSpec("conv2d", module.in_channels, module.out_channels, _pair(module.kernel_size),
                        _pair(module.stride),
                        module.padding if isinstance(module.padding, str) else _pair(module.padding),
                        _pair(module.dilation), module.groups, padding_mode=module.padding_mode)
    if isinstance(module, nn.Embedding):
        return SiteSpec("embedding", module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
    raise ValueError(f"{type(module).__name__} is not a supported site kind "
                     f"({', '.join(k.__name__ for k in SUPPORTED)})")


# ---------------------------------------------------------------- selection (PEFT conventions)

def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def select_sites(model: nn.Module, target_modules: list[str] | str, heads: list[str]) -> tuple[list[str], list[str]]:
    """Names of the target sites and of the task-head sites of `model`.

    A list matches a module name exactly or as a dotted suffix (every key must match
    something); a string is a regex full-match; "all-linear" takes every linear layer
    except the output head. Heads are taken when present. Raises ValueError listing the
    candidates when nothing matches, and on a pattern that is not a valid regex.

    Patterns run on RE2, which has no backtracking: the service matches its users' patterns
    here, and a pattern like `(a+)+$` must cost linear time, not seconds of the server's CPU.
    RE2 has no lookaround and no backreferences; module names do not need them.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]
    modules = dict(model.named_modules())
    # a head is a linear module named like a head, or inside a container so named
    head_names = [n for n in candidates if isinstance(modules[n], LINEAR_KINDS)
                  and any(f".{h}." in f".{n}." for h in heads)]
    if target_modules == "all-linear":
        out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [n for n in candidates if isinstance(modules[n], LINEAR_KINDS) and modules[n] is not out_head]
    elif isinstance(target_modules, str):
        pattern = _pattern(target_modules)
        targets = [n for n in candidates if pattern.fullmatch(n)]
    else:
        targets = []
        missing = [key for key in target_modules if not any(_matches(n, key) for n in candidates)]
        if missing:  # every key must match something; name them all at once
            others = f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
            raise ValueError(_no_match(f"target {missing[0]!r} matches no module{others}", candidates, modules,
                                       missing))
        for key in target_modules:
            targets += [n for n in candidates if _matches(n, key) and n not in targets]
    only_heads = targets and all(n in head_names for n in targets)
    targets = [n for n in targets if n not in head_names]
    if only_heads:
        raise ValueError(f"target_modules {target_modules!r} match only task heads ({', '.join(head_names)}), "
                         "which get a linear adapter anyway; name the layers to adapt")
    if not targets:
        raise ValueError(_no_match(f"target_modules {target_modules!r} match no module", candidates, modules,
                                   [target_modules] if isinstance(target_modules, str) else []))
    return targets, head_names


def _pattern(pattern: str):
    """`pattern` compiled by RE2 (linear time; see select_sites), or a ValueError saying why not."""
    options = re2.Options()
    options.log_errors = False  # a bad pattern is the caller's error, not a line in the server's log
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"target_modules {pattern!r} is not a valid regex (RE2 syntax): {reason}") from None


def _no_match(what: str, candidates: list[str], modules: dict, keys: list[str]) -> str:
    """One short line: what failed, then the closest module names (else the names there are)."""
    other = [f"{n} ({type(m).__name__})" for n, m in modules.items()
             if n and n not in candidates and any(_matches(n, k) for k in keys)]
    hint = f"; it names unsupported modules: {', '.join(other[:3])}" if other else ""
    # the short names are what a user types (PEFT-style suffixes): list each once
    names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in candidates))
    close = []
    for key in keys:
        parts = key.count(".") + 1  # a dotted key is compared with dotted suffixes as long
        pool = list(dict.fromkeys(".".join(n.split(".")[-parts:]) for n in candidates))
        starts = [n for n in pool if key and n.lower().startswith(key.lower())]
        close += starts[:3] + difflib.get_close_matches(key, pool, n=3, cutoff=0.6)
    if close := list(dict.fromkeys(close))[:6]:
        return f"{what}{hint}; closest: {', '.join(close)}"
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"{what}{hint}; modules by name: {shown or 'none'}"


# ---------------------------------------------------------------- the wrapper at a site

@dataclass
class Call:
    """One call of a site during a recorded forward."""
    site: Site
    x: torch.Tensor  # the adapter's input (after dropout), detached
    edge: GradientEdge | None  # where h entered the graph: dL/dh even if the model later modifies h in place
    route: Route | None  # the rows' users; None: every row is the site's only user's


class _Root(torch.autograd.Function):
    """Make a site output that nothing upstream needs a gradient for a node of the graph.

    A leaf would do for autograd.grad, but the model may modify the output in place (an
    in-place ReLU after a convolution), which autograd forbids on a leaf; marking the tensor
    dirty gives it a grad_fn without copying it.
    """

    @staticmethod
    def forward(ctx, h, anchor):
        ctx.mark_dirty(h)
        return h

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Site(nn.Module):
    """An adapted module: holds the server's frozen copy of every user's adapter there.

    A forward routes rows by `route` (set by ColaModel for a mixed-user batch): a batch of
    one user takes the single-adapter path (merged or not); a mixed batch runs each row
    through its own user's adapter (personal), or, when `combine` holds weights per user,
    every row sees the weighted mean of the users' mergeable deltas (collaborative).
    """

    def __init__(self, name: str, module: nn.Module, dropout: float, merged: bool, is_head: bool = False):
        super().__init__()
        self.name = name
        self.is_head = is_head
        self.__dict__["target"] = module  # not a submodule: it already belongs to the model
        self.spec = site_spec(module)
        self.transposed = isinstance(module, Conv1D)  # GPT-2: y = x @ W + b with W stored (in, out)
        self.adapters = nn.ModuleDict()  # user key -> frozen adapter
        self.keys: dict[str, str] = {}  # user id -> key in `adapters` (ids may hold dots, keys may not)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and self.spec.kind != "embedding" else nn.Identity()
        self.merged = merged
        self.route: Route | None = None
        self.combine: dict[str, float] | None = None  # collaborative: user -> weight of its delta
        self.recorder: list[Call] | None = None
        self.merges = MergeCache()  # W + delta_W of the merged forward, while no adapter changes
        self._base_forward = module.forward
        self._had_own_forward = "forward" in module.__dict__
        module.forward = self.run

    # ------------------------------------------------------------- users
    def add(self, user: str, adapter: nn.Module) -> None:
        key = f"u{len(self.keys)}_{re.sub(r'[^0-9A-Za-z_]', '_', user)}"
        while key in self.adapters:
            key += "_"
        self.adapters[key] = adapter.requires_grad_(False)
        self.keys[user] = key

    def remove(self, user: str) -> None:
        del self.adapters[self.keys.pop(user)]
        self.merges.clear()  # free a weight-sized result now, not at the next forward

    def _apply(self, fn, recurse=True):
        self.merges.clear()  # .to(), .half(): a kept result would have the old device or dtype
        return super()._apply(fn, recurse)

    def get(self, user: str) -> nn.Module | None:
        key = self.keys.get(user)
        return None if key is None else self.adapters[key]

    @property
    def users(self) -> list[str]:
        return list(self.keys)

    def by_user(self) -> dict[str, nn.Module]:
        return {u: self.adapters[k] for u, k in self.keys.items()}

    @property
    def adapter(self) -> nn.Module:
        """The adapter of the site's only user (the single-user API)."""
        if len(self.keys) != 1:
            raise ValueError(f"site {self.name} has adapters of {len(self.keys)} users: use site.get(user)")
        return next(iter(self.adapters.values()))

    def solo_user(self, route: Route | None) -> str | None:
        """The one user whose adapter every row uses; None for a mixed batch."""
        if route is not None:
            return route.single
        if len(self.keys) == 1:
            return next(iter(self.keys))
        if not self.keys:
            return None
        raise ValueError(f"site {self.name} has adapters of {len(self.keys)} users: "
                         "pass users=[...] (one per row) to say whose adapter each row uses")

    # ------------------------------------------------------------- forward
    def scaled(self, t: torch.Tensor) -> torch.Tensor:
        """`t` times the embedding's own output scale, if it has one (see the module docstring)."""
        s = getattr(self.target, "embed_scale", None) if self.spec.kind == "embedding" else None
        if s is None or (isinstance(s, (int, float)) and s == 1):
            return t
        return t * (s.to(t.device, t.dtype) if isinstance(s, torch.Tensor) else s)  # t may be a host copy

    def _merged_forward(self, x: torch.Tensor, adapters: list[nn.Module],
                        coefs: list[float] | None = None) -> torch.Tensor:
        """f(x; W + delta_W): delta_W of the one adapter in `adapters`, or sum_u coefs[u] delta_W_u."""
        m = self.target
        transposed = self.transposed
        weight, db = self.merges.merged(m.weight, adapters, coefs, transposed)  # formed once per adapter version
        if isinstance(m, nn.Embedding):  # no bias
            return self.scaled(F.embedding(x, weight, m.padding_idx, m.max_norm, m.norm_type,
                                            m.scale_grad_by_freq, m.sparse))
        bias = m.bias if db is None else (db if m.bias is None else m.bias + db)
        if transposed:
            return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        if isinstance(m, nn.Linear):
            return F.linear(x, weight, bias)
        return m._conv_forward(x, weight, bias)  # nn.Conv2d

    def _combined_forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        """Collaborative: W + the weighted mean of the users' delta_W; other adapters stay personal."""
        adapters = self.by_user()
        mergeable = {u: a for u, a in adapters.items() if is_mergeable(a)}
        weights = {u: self.combine.get(u, 1.0) for u in mergeable}
        total = sum(weights.values())
        if total > 0:  # lowrank users' deltas in one product per site (adapters/merging.py)
            h = self._merged_forward(x, list(mergeable.values()), [w / total for w in weights.values()])
        else:
            h = self._base_forward(x)
        personal = {u: a for u, a in adapters.items() if u not in mergeable}
        if personal:
            delta = routed_delta(personal, x, route or Route([next(iter(personal))] * x.shape[0]))
            h = h if delta is None else h + self.scaled(delta)
        return h

    def run(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route.expanded(x.shape[0]) if self.route is not None else None
        if self.combine is not None and len(self.keys) > 1:
            x_in, h = x, self._combined_forward(x, route)
        elif (user := self.solo_user(route)) is not None or route is None:
            adapter = self.get(user) if user is not None else None
            if adapter is None:  # this user has no adapter here
                return self._base_forward(x)
            if self.merged:
                x_in, h = x, self._merged_forward(x, [adapter])
            else:
                x_in = self.dropout(x)
                h = self._base_forward(x) + self.scaled(adapter(x_in))
        else:  # mixed batch, personal: each row through its own user's adapter
            x_in = self.dropout(x)
            delta = routed_delta(self.by_user(), x_in, route)
            if delta is None:
                return self._base_forward(x)
            h = self._base_forward(x) + self.scaled(delta)
        if self.recorder is not None:
            if not h.requires_grad and torch.is_grad_enabled():  # first site: nothing upstream needs a gradient
                h = _Root.apply(h.detach(), torch.ones((), requires_grad=True))
            edge = get_gradient_edge(h) if h.requires_grad else None  # None: recorded without grad
            self.recorder.append(Call(self, x_in.detach(), edge, route))  # not h: keep no output alive
        return h

    # ------------------------------------------------------------- packets
    def token_shape(self, x: torch.Tensor) -> tuple[int, ...] | None:
        """The leading (token) shape of an input `x` of this site, (B, T) for text; None for images."""
        if self.spec.kind == "conv2d":
            return None
        return tuple(x.shape) if self.spec.kind == "embedding" else tuple(x.shape[:-1])

    def detach_from_model(self) -> None:
        """Give the module its own forward back."""
        if self._had_own_forward:
            self.target.forward = self._base_forward
        else:
            del self.target.forward

    def merge_into_base(self) -> None:
        """Fold delta_W into the base weight in place (merge_and_unload)."""
        m = self.target
        dw, db = self.adapter.delta_weight()
        with torch.no_grad():
            m.weight += dw.T if self.transposed else dw
            if db is not None:
                if m.bias is None:
                    m.bias = nn.Parameter(db.detach().clone(), requires_grad=False)
                else:
                    m.bias += db
