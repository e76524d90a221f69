"""`linear`: g(x) = x @ delta_W^T (+ delta_b), full rank, zero init so the model starts unchanged.

Also the adapter of task heads (with bias): a frozen head plus a trained delta is the same
as training the head, while the server keeps no trainable parameter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colaft.adapters.base import SiteSpec, register_adapter


class FullDelta(nn.Module):
    def __init__(self, spec: SiteSpec, bias: bool):
        super().__init__()
        self.spec = spec
        if spec.kind == "linear":
            shape = (spec.out_features, spec.in_features)
        elif spec.kind == "conv2d":
            shape = (spec.out_features, spec.in_features // spec.groups, *spec.kernel_size)
            # non-zero padding modes pad explicitly, as nn.Conv2d does (its own arithmetic, on "meta")
            self._pad = nn.Conv2d(spec.in_features, spec.out_features, spec.kernel_size, spec.stride, spec.padding,
                                  spec.dilation, spec.groups, padding_mode=spec.padding_mode,
                                  device="meta")._reversed_padding_repeated_twice
        else:  # embedding
            shape = (spec.in_features, spec.out_features)
        self.weight = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(spec.out_features)) if bias and spec.kind != "embedding" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        if s.kind == "conv2d":
            if s.padding_mode != "zeros":
                x = F.pad(x, self._pad, mode=s.padding_mode)
                return F.conv2d(x, self.weight, self.bias, s.stride, 0, s.dilation, s.groups)
            return F.conv2d(x, self.weight, self.bias, s.stride, s.padding, s.dilation, s.groups)
        return F.embedding(x, self.weight, s.padding_idx)

    def delta_weight(self):
        return self.weight, self.bias


@register_adapter("linear")
def build(spec: SiteSpec, config) -> nn.Module:
    return FullDelta(spec, bias=config.bias)
