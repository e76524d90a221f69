"""Wire types between the server and the adapter owners, and their safetensors form.

A packet is what the server emits per (site, call): the adapter's input rows x and the
gradient dL/dh at the site's output, padding positions already dropped.

Sites that read the same tensor (q, k and v read one hidden state; gate and up another)
share one `x`: their packets hold the very same tensor object, cut once by the server, sent
once by every transport (the process backend's shared memory, Ray's arrays, the safetensors
form below) and arriving as one object again, from which the owner fits every such site.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

TRANSFER_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}
"""The choices of --transfer-dtype: what packets are cast to for transport (None: left as the
server made them, float32: exact). The fit itself keeps its own dtype."""


@dataclass
class Packet:
    site: str
    x: torch.Tensor  # (N, d_in) | (N,) token ids | (B, C, H, W); possibly shared with other sites' packets
    grad: torch.Tensor  # (N, d_out) | (B, C', H', W')
    user: str = "default"  # whose adapter at `site` these rows train

    def to(self, device=None, dtype: torch.dtype | None = None) -> Packet:
        """Moved (and floating tensors cast, for a cheaper transfer) copy; token ids stay integers."""
        return Packet(self.site, _moved(self.x, device, dtype), self.grad.to(device, dtype), self.user)

    @property
    def nbytes(self) -> int:
        """This packet's own bytes, x counted whole (see `packets_nbytes` for a shared x)."""
        return _nbytes(self.x) + _nbytes(self.grad)

    def is_finite(self) -> bool:
        return all_finite([self])


def _moved(t: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensor_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they view the same memory the same way (same values).

    While both are alive no other tensor can hold that memory, so within one server step (whose
    calls keep every recorded input alive) equal keys mean the same input.
    """
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def distinct(tensors) -> list[torch.Tensor]:
    """`tensors` with each tensor that views the same memory as an earlier one left out."""
    seen, out = set(), []
    for t in tensors:
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def packets_nbytes(packets: list[Packet]) -> int:
    """The bytes the packets cost on the wire: every dL/dh, and each shared x once."""
    return sum(map(_nbytes, distinct(p.x for p in packets))) + sum(_nbytes(p.grad) for p in packets)


def cast_packets(packets: list[Packet], dtype: torch.dtype | None = None, device=None) -> list[Packet]:
    """`Packet.to` for a list, a shared x moved or cast once and still shared by its packets."""
    if dtype is None and device is None:
        return list(packets)
    moved: dict[tuple, torch.Tensor] = {}
    out = []
    for p in packets:
        key = tensor_key(p.x)
        if key not in moved:
            moved[key] = _moved(p.x, device, dtype)
        out.append(Packet(p.site, moved[key], p.grad.to(device, dtype), p.user))
    return out


def all_finite(packets: list[Packet]) -> bool:
    """No NaN/Inf in any x or dL/dh; one reduction, so a GPU server waits once, not per packet."""
    tensors = [t for t in distinct(p.x for p in packets) if t.is_floating_point()]
    tensors += [p.grad for p in packets if p.grad.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def packets_to_bytes(packets: list[Packet]) -> bytes:
    """Serialise packets with safetensors (order kept in the metadata).

    A shared x is stored once, under the first packet that holds it ("i.x"); the metadata's
    "inputs" names, per packet, the packet whose x it reads (written only when some x is
    shared, so unshared packets keep the form they always had). Safetensors refuses tensors
    whose memory overlaps, so such a tensor is copied; disjoint views of one storage (a user's
    packets in the server's block) are written as they are.
    """
    tensors, order, first = {}, [], {}
    inputs = []
    stored: dict[int, list[tuple[int, int]]] = {}  # storage -> the byte ranges written from it
    for i, p in enumerate(packets):
        owner = first.setdefault(tensor_key(p.x), i)
        inputs.append(owner)
        for name, t in ((f"{i}.x", p.x), (f"{i}.grad", p.grad)):
            if name.endswith(".x") and owner != i:
                continue
            t = t.contiguous()
            start, end = t.data_ptr(), t.data_ptr() + _nbytes(t)
            ranges = stored.setdefault(t.untyped_storage().data_ptr(), [])
            if any(a < end and start < b for a, b in ranges):
                t = t.clone()
            else:
                ranges.append((start, end))
            tensors[name] = t
        order.append([p.site, p.user])
    metadata = {"packets": json.dumps(order)}
    if inputs != list(range(len(packets))):
        metadata["inputs"] = json.dumps(inputs)
    return st_save(tensors, metadata=metadata)


def packets_from_bytes(data: bytes) -> list[Packet]:
    """The packets of `packets_to_bytes`; packets that shared an x share one tensor again."""
    tensors = st_load(data)
    # the metadata sits in the JSON header: 8 bytes of little-endian length, then the JSON
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_len])["__metadata__"]
    order = json.loads(metadata["packets"])
    inputs = json.loads(metadata["inputs"]) if "inputs" in metadata else range(len(order))
    if len(inputs) != len(order) or any(not 0 <= j <= i or inputs[j] != j for i, j in enumerate(inputs)):
        raise ValueError("packets: 'inputs' must name, per packet, itself or an earlier packet that holds its x")
    return [Packet(site, tensors[f"{j}.x"], tensors[f"{i}.grad"], user)
            for i, ((site, user), j) in enumerate(zip(order, inputs))]
