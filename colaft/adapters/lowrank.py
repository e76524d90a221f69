"""`lowrank`: g(x) = scale * B(A(x)), rank r, scale = alpha / r - PEFT's LoRA.

Parameter names and inits follow PEFT (lora_A kaiming-uniform, lora_B zeros; for embeddings
lora_embedding_A zeros, lora_embedding_B normal) so PEFT adapters import and export 1:1.
Dropout on x is applied by the site, before the adapter, as PEFT does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from colaft.adapters import SiteSpec, register_adapter, unsupported


class LowRankLinear(nn.Module):
    def __init__(self, spec: SiteSpec, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        if spec.kind == "linear":
            self.lora_A = nn.Linear(spec.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, spec.out_features, bias=False)
        else:  # conv2d: A carries the kernel, B is 1x1 (PEFT's LoRA Conv2d)
            if spec.groups != 1:
                raise unsupported("lowrank", spec)
            self.lora_A = nn.Conv2d(spec.in_features, rank, spec.kernel_size, spec.stride, spec.padding,
                                    spec.dilation, bias=False, padding_mode=spec.padding_mode)
            self.lora_B = nn.Conv2d(rank, spec.out_features, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scale

    def delta_weight(self):
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dim() == 2:
            return (b @ a) * self.scale, None  # (out, in)
        # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scale, None

    def merged_weight(self, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """W + scale * B @ A in one fused kernel (the server's merged forward, every step)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dim() != 2:
            return weight + self.delta_weight()[0]
        if transposed:  # Conv1D stores W as (in, out)
            return torch.addmm(weight, a.T, b.T, alpha=self.scale)
        return torch.addmm(weight, b, a, alpha=self.scale)


class LowRankEmbedding(nn.Module):
    def __init__(self, spec: SiteSpec, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.padding_idx = spec.padding_idx
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, spec.in_features))  # (r, num)
        self.lora_embedding_B = nn.Parameter(torch.randn(spec.out_features, rank))  # (dim, r)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.T, self.padding_idx)  # (..., r)
        return (after_a @ self.lora_embedding_B.T) * self.scale  # (..., dim)

    def delta_weight(self):
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scale, None  # (num, dim)


@register_adapter("lowrank")
def build(spec: SiteSpec, config) -> nn.Module:
    if spec.kind == "embedding":
        return LowRankEmbedding(spec, config.rank, config.alpha)
    return LowRankLinear(spec, config.rank, config.alpha)
