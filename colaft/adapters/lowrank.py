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

    @staticmethod
    def grouped(adapters: list["LowRankLinear"], x: torch.Tensor, index: list[int]) -> torch.Tensor | None:
        """Row i through adapters[index[i]] in two batched products (BGMV: gather each row's A and B).

        Ranks may differ: A and B are zero-padded to the largest rank, which adds exact zeros.
        """
        idx = torch.tensor(index, device=x.device)
        a, b = _stack([m.lora_A.weight for m in adapters], [m.lora_B.weight for m in adapters])
        scale = torch.tensor([m.scale for m in adapters], device=x.device, dtype=x.dtype)[idx]  # (n,)
        a_rows, b_rows = a[idx], b[idx]  # (n, r, d_in, ...), (n, d_out, r, ...)
        if a.dim() == 3:  # linear: x (n, ..., d_in)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, T, d_in)
            y = torch.bmm(torch.bmm(x3, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))  # (n, T, d_out)
            return (y * scale[:, None, None]).view(*x.shape[:-1], -1)
        conv = adapters[0].lora_A
        if conv.padding_mode != "zeros":
            return None
        n = x.shape[0]  # conv2d: one grouped convolution, a group per row
        z = F.conv2d(x.reshape(1, -1, *x.shape[2:]), a_rows.flatten(0, 1), None, conv.stride, conv.padding,
                     conv.dilation, groups=n)  # (1, n*r, H', W')
        y = F.conv2d(z, b_rows.flatten(0, 1), groups=n).view(n, -1, *z.shape[2:])  # (n, d_out, H', W')
        return y * scale[:, None, None, None]


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

    @staticmethod
    def grouped(adapters: list["LowRankEmbedding"], ids: torch.Tensor, index: list[int]) -> torch.Tensor:
        """Row i through adapters[index[i]]: one lookup in the stacked tables, one batched product."""
        idx = torch.tensor(index, device=ids.device)
        a, b = _stack([m.lora_embedding_A for m in adapters], [m.lora_embedding_B for m in adapters])
        num = a.shape[-1]
        table = a.transpose(1, 2).reshape(-1, a.shape[1])  # (U * num, r): user u's rows at u * num
        after_a = F.embedding(ids + (idx * num).view(-1, *[1] * (ids.dim() - 1)), table)  # (n, ..., r)
        scale = torch.tensor([m.scale for m in adapters], device=ids.device, dtype=after_a.dtype)[idx]
        flat = after_a.reshape(ids.shape[0], -1, a.shape[1])  # (n, T, r)
        y = torch.bmm(flat, b[idx].transpose(1, 2)) * scale[:, None, None]  # (n, T, dim)
        return y.view(*ids.shape, -1)


def _stack(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the users' A (r, in, ...) and B (out, r, ...), zero-padding every rank to the largest."""
    rank = max(a.shape[0] for a in a_list)
    a = torch.stack([F.pad(t, [0, 0] * (t.dim() - 1) + [0, rank - t.shape[0]]) for t in a_list])
    b = torch.stack([F.pad(t, [0, 0] * (t.dim() - 2) + [0, rank - t.shape[1]]) for t in b_list])
    return a, b  # (U, r, in, ...), (U, out, r, ...)


@register_adapter("lowrank")
def build(spec: SiteSpec, config) -> nn.Module:
    if spec.kind == "embedding":
        return LowRankEmbedding(spec, config.rank, config.alpha)
    return LowRankLinear(spec, config.rank, config.alpha)
