"""Pickling with the tensors set aside, so that a transport can move their bytes its own way.

    dumps(obj, place): every distinct tensor goes to `place(tensor) -> descriptor`; the pickle
                       holds the descriptors (a few dozen bytes each)
    loads(data, rebuild): every descriptor comes back through `rebuild(descriptor) -> tensor`

Used by the process backend (bytes into shared memory) and the ray backend (numpy arrays,
which Ray ships without pickling them). A tensor met twice loads as one object (persistent
ids bypass pickle's memo, so this keeps identity itself): an optimizer's parameters are still
its modules' parameters after the trip.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Callable

import torch
from torch import nn


def plain(t: torch.Tensor) -> bool:
    """A dense tensor whose bytes and strides say it all (others are pickled as torch does)."""
    return (type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided and t.device.type != "meta"
            and not t.is_quantized and not t.is_nested and not t.is_conj() and not t.is_neg())


class _Pickler(pickle.Pickler):
    def __init__(self, file, place: Callable[[torch.Tensor], tuple]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.place = place
        self.index: dict[int, int] = {}  # id(tensor) -> its number
        self.keep: list[torch.Tensor] = []  # keeps those ids unique while pickling

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor) or not plain(obj):
            return None  # pickled as usual
        seen = self.index.get(id(obj))
        if seen is not None:
            return ("same", seen)
        self.index[id(obj)] = len(self.keep)
        self.keep.append(obj)
        return ("new", self.place(obj), obj.requires_grad, isinstance(obj, nn.Parameter))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, rebuild: Callable[[tuple], torch.Tensor]):
        super().__init__(file)
        self.rebuild = rebuild
        self.tensors: list[torch.Tensor] = []

    def persistent_load(self, pid):
        if pid[0] == "same":
            return self.tensors[pid[1]]
        _, descriptor, requires_grad, is_param = pid
        t = self.rebuild(descriptor)
        t = nn.Parameter(t, requires_grad) if is_param else t.requires_grad_(requires_grad)
        self.tensors.append(t)
        return t


def dumps(obj, place: Callable[[torch.Tensor], tuple]) -> bytes:
    file = io.BytesIO()
    _Pickler(file, place).dump(obj)
    return file.getvalue()


def loads(data: bytes, rebuild: Callable[[tuple], torch.Tensor]):
    return _Unpickler(io.BytesIO(data), rebuild).load()
