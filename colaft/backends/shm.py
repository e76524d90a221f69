"""Tensors between local processes through reusable shared-memory buffers.

    sender: pickle(obj) with every tensor left out -> its storage copied into one shared buffer
    receiver: unpickle -> each tensor copied out of the buffer -> "release": the buffer is free again

torch.multiprocessing shares each tensor by moving its storage into fresh shared memory and
handing over a file descriptor per storage. Measured on a 2-core VM: fresh shared memory
costs its page faults on every message (114 MiB: 170-200 ms, against 20 ms to copy into an
already mapped buffer), and every descriptor is one more round trip (300 small tensors:
~0.5 ms each). A message here costs one copy into a buffer that is reused once the receiver
has copied its tensors out, and a buffer's descriptor crosses once, the first time it is used.

The receiver copies out (rather than keep views of the buffer) so that a buffer is free as
soon as the message is read, whatever the receiver keeps: an owner holds its packets for a
whole interval, the server keeps snapshots.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from colaft.backends import wire

_ALIGN = 64  # bytes; every storage starts aligned, so any dtype can view its region


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Packed:
    """An object on its way: the pickle, and where its tensors are."""

    payload: bytes  # the pickle; tensors are references into the buffer
    buffer: int | None = None  # the sender's buffer holding the tensors (None: no tensor)
    shared: torch.Tensor | None = None  # that buffer itself, the first time the receiver sees it
    forget: list[int] = field(default_factory=list)  # buffers the sender has dropped: unmap them
    nbytes: int = 0  # tensor bytes copied


class _Storages:
    """Where each storage of one message goes in the buffer; tensors sharing a storage share its bytes."""

    def __init__(self):
        self.storages: list[tuple[int, torch.UntypedStorage]] = []  # (offset in the buffer, storage)
        self.offsets: dict[tuple, int] = {}
        self.size = 0

    def place(self, t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), str(storage.device))
        offset = self.offsets.get(key)
        if offset is None:
            offset = self.offsets[key] = self.size
            self.storages.append((offset, storage))
            self.size += _aligned(storage.nbytes())
        return offset, storage.nbytes(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset()


class _Regions:
    """The receiving side of one message: each storage copied out of the buffer once."""

    def __init__(self, buffer: torch.Tensor | None):
        self.buffer = buffer
        self.regions: dict[int, torch.Tensor] = {}  # offset -> this process's copy of the storage

    def rebuild(self, descriptor: tuple) -> torch.Tensor:
        offset, nbytes, dtype, size, stride, storage_offset = descriptor
        region = self.regions.get(offset)
        if region is None:
            region = self.regions[offset] = self.buffer[offset:offset + nbytes].clone()  # (nbytes,) uint8
        return region.view(dtype).as_strided(size, stride, storage_offset)


class Outgoing:
    """The sending side of one link: shared buffers it owns, reused once the receiver releases them.

    `pack` and `release` may run on different threads (a sender thread packs, the thread that
    reads the receiver's messages releases).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.buffers: dict[int, torch.Tensor] = {}  # id -> (capacity,) uint8 in shared memory
        self.free: set[int] = set()
        self.known: set[int] = set()  # buffers the receiver has mapped
        self.dropped: list[int] = []  # to tell the receiver with the next message
        self._next = 0

    def pack(self, obj) -> Packed:
        """Pickle `obj`, its tensors (on any device) copied into a free shared buffer."""
        where = _Storages()
        payload = wire.dumps(obj, where.place)
        with self._lock:
            k = self._take(where.size) if where.storages else None  # may drop outgrown buffers
            packed = Packed(payload, forget=self.dropped)
            self.dropped = []
        if k is None:
            return packed
        buffer = self.buffers[k]
        for offset, storage in where.storages:
            source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)  # (nbytes,)
            buffer[offset:offset + storage.nbytes()].copy_(source)
        packed.buffer, packed.nbytes = k, where.size
        with self._lock:
            if k not in self.known:
                packed.shared = buffer
                self.known.add(k)
        return packed

    def release(self, k: int) -> None:
        """The receiver has read buffer k: it may be reused."""
        with self._lock:
            if k in self.buffers:
                self.free.add(k)

    def _take(self, size: int) -> int:
        fitting = [k for k in self.free if self.buffers[k].numel() >= size]
        if fitting:
            k = min(fitting, key=lambda k: self.buffers[k].numel())
            self.free.discard(k)
            return k
        for k in [k for k in self.free if self.buffers[k].numel() < size]:  # outgrown: free the memory
            del self.buffers[k]
            self.free.discard(k)
            if k in self.known:
                self.known.discard(k)
                self.dropped.append(k)
        k, self._next = self._next, self._next + 1
        # a little headroom: the next batch may have a few more tokens
        self.buffers[k] = torch.empty(_aligned(size + size // 8), dtype=torch.uint8).share_memory_()
        return k


class Incoming:
    """The receiving side of one link: the sender's buffers, mapped here."""

    def __init__(self):
        self.buffers: dict[int, torch.Tensor] = {}

    def unpack(self, packed: Packed):
        """The object, every tensor a private copy: the buffer may be released right after."""
        for k in packed.forget:
            self.buffers.pop(k, None)
        if packed.shared is not None:
            self.buffers[packed.buffer] = packed.shared
        buffer = self.buffers[packed.buffer] if packed.buffer is not None else None
        return wire.loads(packed.payload, _Regions(buffer).rebuild)
