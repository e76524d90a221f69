"""From one server step's recorded site calls to its packets, each user's rows in one block.

    calls (x, dL/dh per site call; rows tagged with users)
      -> kept_rows: the token rows that go (padding with zero dL/dh is dropped)
      -> cut: per (call, user) the rows to copy, or the call's own tensors when nothing is cut
      -> packets: every user's cut rows copied into one allocation of its own; packets view it

Why one block per user rather than a tensor per packet: with many users a step cuts thousands
of small tensors (32 users x 38 sites x 2 on MiniLM at 16 tokens: 24 KiB each). The allocator
serves those from its heap and keeps the memory once they are freed (measured: 30-36 MiB
above the live tensors at 32 users); a user's block is large enough to be mapped and
unmapped whole. It suits the transports too: a user's packets travel in one message, whose
shared memory copies the block once, and Ray ships each tensor's own bytes. A block holds one
user's rows only, so no transport ever carries another user's rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from colaft.packets import Packet, tensor_key
from colaft.sites import Call

_ALIGN = 64  # bytes: every tensor in a block starts aligned, so any dtype can view its region


@dataclass
class Kept:
    """The token rows of one call that go into its packets (the server decides which)."""
    mask: torch.Tensor  # (B, T) bool: True where the row is kept
    counts: list[int]  # (B,) kept rows per batch row, on the host: index without a device sync


class _Rows:
    """Rows `index` (dim 0) of `source`, to be copied into `user`'s block at `offset`."""
    __slots__ = ("user", "source", "index", "shape", "nbytes", "offset", "out")

    def __init__(self, user: str, source: torch.Tensor, index: torch.Tensor, n: int):
        self.user, self.source, self.index = user, source, index  # source (N, ...): tokens flattened, or images
        self.shape = (n, *source.shape[1:])  # n: the index's length, known on the host
        self.nbytes = math.prod(self.shape) * source.element_size()
        self.offset = 0
        self.out: torch.Tensor | None = None  # the copy: a view of the block, once made


def _compact(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it views a small part of a larger storage (a pooler's first token of
    (B, T, d)): a transport that moves storages would otherwise send all of it."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


def cut(call: Call, grad: torch.Tensor, keep: Kept | None, memo: dict) -> list[tuple[str, object, object]]:
    """(user, x, dL/dg) for every user with an adapter at the call's site: each user's own rows only.

    Each x and dL/dg is the call's own tensor (one user, every row kept: a flat view, no copy) or
    the `_Rows` to copy. `memo` is one server step's: calls whose x is the same tensor (q, k and
    v read one hidden state) and that keep the same rows (the same `keep` object) get the very
    same x rows, cut once, which every transport then sends once; token indices are made once
    per (route, user, rows kept, tokens per row).
    """
    site, route = call.site, call.route
    kind = site.spec.kind
    grad = site.scaled(grad)  # dL/dg: h = f(x) + s * g(x) at a scaled embedding
    x = call.x
    if kind != "conv2d":  # (B*T, d) | (B*T,) token ids; images stay (B, C, H, W)
        x = x.reshape(-1) if kind == "embedding" else x.reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
    base = (tensor_key(call.x), kind, None if keep is None else id(keep), id(route))
    user = site.solo_user(route) if route is None or route.single is not None else None
    if user is not None:
        users = [user] if user in site.keys else []
    else:
        users = [u for u in route.order if u in site.keys]
    per_row = 1 if kind == "conv2d" else len(x) // call.x.shape[0]  # tokens per batch row
    out = []
    for u in users:
        index, n = _index(memo, call, u if user is None else None, keep, per_row, grad.device)
        key = base + (u,)
        if key not in memo:
            memo[key] = _compact(x) if index is None else _Rows(u, x, index, n)
        out.append((u, memo[key], _compact(grad) if index is None else _Rows(u, grad, index, n)))
    return out


def _index(memo: dict, call: Call, user: str | None, keep: Kept | None, per_row: int,
           device) -> tuple[torch.Tensor | None, int]:
    """(the flat rows of `user` (None: of every batch row) that go, their number); None: all, uncut."""
    key = ("index", id(call.route), user, None if keep is None else id(keep), per_row, str(device))
    if key not in memo:
        memo[key] = _flat_rows(memo, call.route, user, keep, per_row, device)
    return memo[key]


def _flat_rows(memo: dict, route, user: str | None, keep: Kept | None, per_row: int, device):
    rows = None if user is None else route.host_rows([user])  # batch rows, on the host
    if keep is not None:
        n = sum(keep.counts) if rows is None else sum(keep.counts[i] for i in rows)
        if n < (keep.mask.numel() if rows is None else len(rows) * per_row):
            mask = keep.mask.to(device)
            if rows is not None:
                mask = mask & _mine(memo, route, user, device)[:, None]
            # the count is known on the host, so finding the rows does not wait for the device
            return torch.nonzero_static(mask.reshape(-1), size=n).squeeze(1), n
    if rows is None:
        return None, 0
    batch_rows = route.rows_of([user], device)  # (n_u,)
    return (batch_rows[:, None] * per_row + torch.arange(per_row, device=device)).reshape(-1), len(rows) * per_row


def _mine(memo: dict, route, user: str, device) -> torch.Tensor:
    """(B,) bool: the batch rows of `user`."""
    key = ("mine", id(route), user, str(device))
    if key not in memo:
        memo[key] = torch.zeros(len(route.users), dtype=torch.bool, device=device)
        memo[key][route.rows_of([user], device)] = True
    return memo[key]


def packets(calls: list[Call | None], grads: list[torch.Tensor | None], keep: list[Kept | None]) -> list[Packet]:
    """Every call's packets, each call's x and dL/dh let go as soon as its packets are made.

    Every user's rows are laid out first (sizes are known without copying), one block per
    user is allocated, then the calls are copied in order: the step holds the copies of the
    calls done and the originals of those to come, not both in full; a shared input is let go
    with the last call that reads it. `calls` and `grads` are emptied (the caller must hold no
    other reference for the memory to go).
    """
    memo: dict = {}
    cuts = [(c.site.name, cut(c, g, k, memo)) if g is not None else None for c, g, k in zip(calls, grads, keep)]
    memo.clear()
    _allocate([r for _, parts in filter(None, cuts) for _, x, g in parts for r in (x, g) if isinstance(r, _Rows)])
    out = []
    for i, pair in enumerate(cuts):
        calls[i] = grads[i] = cuts[i] = None
        if pair is not None:
            name, parts = pair
            out += [Packet(name, _copied(x), _copied(g), user) for user, x, g in parts]
        del pair
    return out


def _allocate(rows: list[_Rows]) -> None:
    """One block per (user, device), each `_Rows` given its place in it (nothing copied yet)."""
    sizes: dict[tuple, int] = {}
    distinct = list({id(r): r for r in rows}.values())
    for r in distinct:
        where = (r.user, r.source.device)
        r.offset = sizes.get(where, 0)
        sizes[where] = r.offset + (r.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    blocks = {where: torch.empty(n, dtype=torch.uint8, device=where[1]) for where, n in sizes.items()}
    typed: dict[tuple, torch.Tensor] = {}  # (user, device, dtype) -> the block as that dtype
    for r in distinct:
        where = (r.user, r.source.device, r.source.dtype)
        if where not in typed:
            typed[where] = blocks[where[:2]].view(r.source.dtype)  # whole: every size is a multiple of 64
        r.out = typed[where].as_strided(r.shape, _contiguous_strides(r.shape), r.offset // r.source.element_size())


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _copied(part) -> torch.Tensor:
    """The packet's tensor: the call's own, or its rows copied into the user's block (once)."""
    if not isinstance(part, _Rows):
        return part
    if part.source is not None:
        torch.index_select(part.source, 0, part.index, out=part.out)
        part.source = part.index = None  # the original may go
    return part.out


def kept_rows(calls: list[Call], grads: list[torch.Tensor | None],
              padding: dict[tuple[int, ...], torch.Tensor]) -> list[Kept | None]:
    """Which token rows of each call go into the packets (None: all of them).

    A row is dropped when the batch marks its position (the server's padding masks, at the
    shape of the site's tokens) AND its dL/dh is exactly zero. The shape alone cannot say whose
    mask it is: in an encoder-decoder the decoder's (B, T_dec) rows have the encoder mask's shape
    whenever T_dec == T_enc, and their dL/dh is not zero where the encoder is padded. A dropped
    row with zero dL/dh adds exactly nothing to the fit's gradient, so dropping stays exact
    whatever the model does with its masks. All calls' counts come back in one transfer, so
    a GPU server waits once, not once per site.

    Calls that read the same input (q, k, v) and keep the same rows get one Kept object, so
    that their packets share one x (`cut`); each call still keeps exactly its own rows.
    """
    keep: list[Kept | None] = [None] * len(calls)
    if not padding:
        return keep  # no padding anywhere: every packet is a flat view of x and dL/dh
    masks: dict[int, torch.Tensor] = {}
    for i, (c, g) in enumerate(zip(calls, grads)):
        pad = padding.get(c.site.token_shape(c.x)) if g is not None else None
        if pad is not None:
            nonzero = g.ne(0).flatten(pad.dim()).any(-1)  # (B, T): dL/dh has a non-zero entry
            masks[i] = nonzero | ~pad.to(g.device)
    if masks:
        first: dict[tuple, int] = {}  # input -> the first call reading it
        pairs = [(i, lead) for i in masks if (lead := first.setdefault(tensor_key(calls[i].x), i)) != i]
        same_rows = [(masks[i] == masks[lead]).all().reshape(1) for i, lead in pairs]  # (1,) each
        counts = torch.cat([m.sum(-1) for m in masks.values()] + same_rows).tolist()  # (calls * B + pairs,): one sync
        for j, (i, m) in enumerate(masks.items()):
            rows = counts[j * m.shape[0]:(j + 1) * m.shape[0]]
            if sum(rows) < m.numel():
                keep[i] = Kept(m, rows)
        same = counts[len(counts) - len(pairs):]
        for (i, lead), equal in zip(pairs, same):
            if equal:
                keep[i] = keep[lead]
    return keep
