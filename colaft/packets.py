"""Wire types between the server and the adapter owners, and their safetensors form.

A packet is what the server emits per (site, call): the adapter's input rows x and the
gradient dL/dh at the site's output, padding positions already dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


@dataclass
class Packet:
    site: str
    x: torch.Tensor  # (N, d_in) | (N,) token ids | (B, C, H, W)
    grad: torch.Tensor  # (N, d_out) | (B, C', H', W')
    user: str = "default"  # whose adapter at `site` these rows train

    def to(self, device=None, dtype: torch.dtype | None = None) -> Packet:
        """Moved (and floating tensors cast, for a cheaper transfer) copy; token ids stay integers."""
        x = self.x.to(device, dtype) if dtype is not None and self.x.is_floating_point() else self.x.to(device)
        return Packet(self.site, x, self.grad.to(device, dtype), self.user)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.grad.numel() * self.grad.element_size()

    def is_finite(self) -> bool:
        return all_finite([self])


def all_finite(packets: list[Packet]) -> bool:
    """No NaN/Inf in any x or dL/dh; one reduction, so a GPU server waits once, not per packet."""
    tensors = [t for p in packets for t in (p.x, p.grad) if t.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def packets_to_bytes(packets: list[Packet]) -> bytes:
    """Serialise packets with safetensors (order kept in the metadata).

    Sites fed by one input (q, k and v projections) record the same `x` tensor; safetensors
    refuses tensors that share memory, so a tensor whose storage is already stored is copied.
    """
    tensors, order, storages = {}, [], set()
    for i, p in enumerate(packets):
        for name, t in ((f"{i}.x", p.x), (f"{i}.grad", p.grad)):
            t = t.contiguous()
            storage = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if storage in storages else t
            storages.add(storage)
        order.append([p.site, p.user])
    return st_save(tensors, metadata={"packets": json.dumps(order)})


def packets_from_bytes(data: bytes) -> list[Packet]:
    tensors = st_load(data)
    # the metadata sits in the JSON header: 8 bytes of little-endian length, then the JSON
    header_len = int.from_bytes(data[:8], "little")
    order = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["packets"])
    return [Packet(site, tensors[f"{i}.x"], tensors[f"{i}.grad"], user) for i, (site, user) in enumerate(order)]
