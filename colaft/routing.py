"""Mixed-user batches: which row belongs to which user, and adapters applied per row.

A Route is built once per forward from the batch's per-row user ids (a Python list, so no
device sync is needed to group rows). At every site the rows' users are grouped by adapter
type and each group runs in one batched call (`grouped_forward`): low-rank adapters gather
each row's A and B and use batched matrix products (the BGMV idea of Punica and S-LoRA);
other types run once per user on that user's contiguous segment of rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Route:
    """Per-row users of one batch."""

    users: list[str]  # (B,) the user of every row
    order: list[str] = field(init=False)  # distinct users, in order of first appearance
    index: list[int] = field(init=False)  # (B,) position of each row's user in `order`
    _cache: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.order = list(dict.fromkeys(self.users))
        position = {u: i for i, u in enumerate(self.order)}
        self.index = [position[u] for u in self.users]

    @property
    def single(self) -> str | None:
        """The user of every row, when there is only one."""
        return self.order[0] if len(self.order) == 1 else None

    def expanded(self, rows: int) -> Route:
        """The route of a batch whose rows were repeated (beam search, several samples per prompt)."""
        if rows == len(self.users):
            return self
        if rows % len(self.users):
            raise ValueError(f"a site saw {rows} rows, but {len(self.users)} users were given (one per row)")
        key = ("expanded", rows)
        if key not in self._cache:
            k = rows // len(self.users)
            self._cache[key] = Route([u for u in self.users for _ in range(k)])
        return self._cache[key]

    def rows_of(self, users: Sequence[str], device) -> torch.Tensor:
        """(n,) indices of the rows that belong to `users`, in row order (cached per device)."""
        key = (tuple(users), str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.host_rows(users), device=device)
        return self._cache[key]

    def host_rows(self, users: Sequence[str]) -> list[int]:
        """The same indices as a list, on the host (cached)."""
        key = ("host", tuple(users))
        if key not in self._cache:
            wanted = set(users)
            self._cache[key] = [i for i, u in enumerate(self.users) if u in wanted]
        return self._cache[key]



def per_row(users: str | Sequence[str | None] | None, rows: int | None) -> list[str | None] | None:
    """One user id per row of a batch of `rows` rows: `users` is one per row, or one (a str) for all.

    A list of another length is refused, never broadcast: `["alice"]` for 8 rows is a mistake
    that would otherwise train or answer every row as alice.
    """
    if users is None:
        return None
    if isinstance(users, str):
        if rows is None:
            raise ValueError(f"users={users!r} names one user for every row, but the batch's rows are unknown")
        return [users] * rows
    users = list(users)
    if rows is not None and len(users) != rows:
        hint = f", or users={users[0]!r} (a string) for every row" if len(set(users)) == 1 else ""
        raise ValueError(f"users holds {len(users)} id(s) for a batch of {rows} rows: give one per row{hint}")
    return users


def segment_forward(adapters: Sequence[nn.Module], x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Default grouped forward: each adapter once on its users' rows, as one contiguous segment.

    Args:
        adapters: one adapter per user of the group.
        x: (n, ...) the group's rows.
        index: (n,) which adapter each row uses.
    Returns:
        (n, ...) the adapters' outputs, in row order.
    """
    perm = sorted(range(len(index)), key=index.__getitem__)  # stable: rows of one user keep their order
    counts = [0] * len(adapters)
    for i in index:
        counts[i] += 1
    segments = x.index_select(0, torch.tensor(perm, device=x.device)).split(counts)
    parts = [a(seg) for a, seg in zip(adapters, segments) if len(seg)]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return out.index_select(0, torch.tensor(inverse, device=x.device))  # back to row order


def grouped_forward(adapters: Sequence[nn.Module], x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """Run `adapters[index[i]]` on row i, batched when the adapter type knows how (`grouped`)."""
    grouped = getattr(type(adapters[0]), "grouped", None)
    if len(set(index)) == 1:
        return adapters[index[0]](x)
    if grouped is not None:
        out = grouped(adapters, x, index)
        if out is not None:  # the type may decline a case (an unusual padding mode)
            return out
    return segment_forward(adapters, x, index)


def routed_delta(adapters: dict[str, nn.Module], x: torch.Tensor, route: Route) -> torch.Tensor | None:
    """Each row's own user's adapter output; zero for rows whose user has no adapter at this site.

    Users are grouped by adapter type; each group is one `grouped_forward` call.
    Returns None when no row's user has an adapter here.
    """
    here = [u for u in route.order if u in adapters]
    if not here:
        return None
    groups: dict[type, list[str]] = {}
    for u in here:
        groups.setdefault(type(adapters[u]), []).append(u)
    if len(groups) == 1 and len(here) == len(route.order):  # every row in one call, no scatter
        users = next(iter(groups.values()))
        position = {u: i for i, u in enumerate(users)}
        return grouped_forward([adapters[u] for u in users], x, [position[u] for u in route.users])
    out = None
    for users in groups.values():
        rows = route.rows_of(users, x.device)
        position = {u: i for i, u in enumerate(users)}
        index = [position[u] for u in route.users if u in position]
        y = grouped_forward([adapters[u] for u in users], x.index_select(0, rows), index)
        if out is None:
            out = y.new_zeros((x.shape[0], *y.shape[1:]))
        out = out.index_copy(0, rows, y)  # out of place: autograd reaches each group's x
    return out
