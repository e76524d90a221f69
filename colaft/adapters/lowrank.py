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
from torch.autograd.function import once_differentiable

from colaft.adapters.base import SiteSpec, register_adapter, unsupported


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
    def merged_sum(adapters: list[LowRankLinear], coefs: list[float], weight: torch.Tensor,
                   transposed: bool) -> torch.Tensor | None:
        """W + sum_u c_u scale_u B_u A_u as one product: [B_1 .. B_K] (out, R) times [c_1 s_1 A_1; ..] (R, in).

        One weight-sized pass whatever the number of users (forming each B_u A_u and summing
        takes three per user); ranks may differ (R = sum of the ranks). None for conv2d.
        """
        if adapters[0].lora_A.weight.dim() != 2:
            return None
        a, b = _concatenated([m.lora_A.weight for m in adapters], [m.lora_B.weight for m in adapters],
                             [c * m.scale for m, c in zip(adapters, coefs)])
        return torch.addmm(weight, a.T, b.T) if transposed else torch.addmm(weight, b, a)

    @staticmethod
    def grouped(adapters: list[LowRankLinear], x: torch.Tensor, index: list[int]) -> torch.Tensor | None:
        """Row i through adapters[index[i]] in two batched products (BGMV: gather each row's A and B).

        Ranks may differ: A and B are zero-padded to the largest rank, which adds exact zeros.
        """
        a_list, b_list = [m.lora_A.weight for m in adapters], [m.lora_B.weight for m in adapters]
        scales = [m.scale for m in adapters]
        if a_list[0].dim() == 2:  # linear: x (n, ..., d_in)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, T, d_in)
            if any(w.requires_grad for w in a_list + b_list):  # trainable adapters: plain autograd
                y = _bgmv(x3, *_gather(a_list, b_list, index), _row_scale(scales, index, x3))
            else:  # the server's frozen adapters
                y = _FrozenBGMV.apply(x3, index, scales, *a_list, *b_list)
            return y.view(*x.shape[:-1], -1)  # (n, ..., d_out)
        conv = adapters[0].lora_A
        if conv.padding_mode != "zeros":
            return None
        n = x.shape[0]  # conv2d: one grouped convolution, a group per row
        a_rows, b_rows = _gather(a_list, b_list, index)  # (n, r, d_in, kh, kw), (n, d_out, r, 1, 1)
        z = F.conv2d(x.reshape(1, -1, *x.shape[2:]), a_rows.flatten(0, 1), None, conv.stride, conv.padding,
                     conv.dilation, groups=n)  # (1, n*r, H', W')
        y = F.conv2d(z, b_rows.flatten(0, 1), groups=n).view(n, -1, *z.shape[2:])  # (n, d_out, H', W')
        scale = _row_scale(scales, index, y)
        return y * (scale if isinstance(scale, float) else scale[:, None, None, None])


def _concatenated(a_list, b_list, coefs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_1 A_1; ..; c_K A_K) stacked by rows (R, in) and (B_1 .. B_K) side by side (out, R)."""
    return torch.cat([a * c for a, c in zip(a_list, coefs)]), torch.cat(b_list, dim=1)


def _gather(a_list, b_list, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's A and B, (n, r, d_in, ...) and (n, d_out, r, ...); ranks zero-padded to the largest.

    One copy of n adapters (stacking the users first and indexing would copy twice).
    """
    rank = max(a.shape[0] for a in a_list)
    if any(a.shape[0] != rank for a in a_list):
        a_list, b_list = _padded(a_list, b_list, rank)
    return torch.stack([a_list[i] for i in index]), torch.stack([b_list[i] for i in index])


def _row_scale(scales: list[float], index: list[int], like: torch.Tensor) -> float | torch.Tensor:
    """Each row's scale: one float when the users agree (the usual case), else a (n,) tensor."""
    if len(set(scales)) == 1:
        return scales[0]
    return torch.tensor([scales[i] for i in index], device=like.device, dtype=like.dtype)


def _bgmv(x3: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, scale) -> torch.Tensor:
    """(n, T, d_in) -> (n, T, d_out): scale_i * x_i A_i^T B_i^T for every row i.

    The scale multiplies the (n, T, r) product, r wide, not the (n, T, d_out) output: the same
    product in exact arithmetic at a fraction of the memory traffic (bitwise the same when the
    scale is a power of two, as alpha = 2r makes it)."""
    z = torch.bmm(x3, a_rows.transpose(1, 2))  # (n, T, r)
    z = z * (scale if isinstance(scale, float) else scale[:, None, None])
    return torch.bmm(z, b_rows.transpose(1, 2))  # (n, T, d_out)


class _FrozenBGMV(torch.autograd.Function):
    """`_bgmv` for frozen adapters, differentiable in x only, keeping no copy of the adapters.

    Autograd on `_bgmv` would keep the gathered A and B of every row for the backward: n
    copies of the users' adapters at every site (n = rows), alive from the forward to the
    backward. This keeps references to the users' own weights and gathers again in the
    backward, which then runs the same products autograd would: dx = (dy s) B_i A_i.
    """

    @staticmethod
    def forward(ctx, x3, index, scales, *weights):
        k = len(weights) // 2
        ctx.index, ctx.scales = index, scales
        ctx.save_for_backward(*weights)  # the users' parameters themselves: no copy
        return _bgmv(x3, *_gather(weights[:k], weights[k:], index), _row_scale(scales, index, x3))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weights = ctx.saved_tensors
        k = len(weights) // 2
        a_rows, b_rows = (t.to(grad.dtype) for t in _gather(weights[:k], weights[k:], ctx.index))  # autocast
        scale = _row_scale(ctx.scales, ctx.index, grad)
        z = torch.bmm(grad, b_rows)  # (n, T, r): scaled here, r wide (see _bgmv)
        z = z * (scale if isinstance(scale, float) else scale[:, None, None])
        return torch.bmm(z, a_rows), None, None, *([None] * len(weights))


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
    def merged_sum(adapters: list[LowRankEmbedding], coefs: list[float], weight: torch.Tensor,
                   transposed: bool) -> torch.Tensor:
        """W + sum_u c_u scale_u (B_u A_u)^T as one product (see LowRankLinear.merged_sum); W is (num, dim)."""
        a, b = _concatenated([m.lora_embedding_A for m in adapters], [m.lora_embedding_B for m in adapters],
                             [c * m.scale for m, c in zip(adapters, coefs)])
        return torch.addmm(weight, a.T, b.T)  # (num, R) (R, dim)

    @staticmethod
    def grouped(adapters: list[LowRankEmbedding], ids: torch.Tensor, index: list[int]) -> torch.Tensor:
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
    if any(a.shape[0] != rank for a in a_list):
        a_list, b_list = _padded(a_list, b_list, rank)
    return torch.stack(a_list), torch.stack(b_list)  # (U, r, in, ...), (U, out, r, ...)


def _padded(a_list, b_list, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A (r, in, ...) and B (out, r, ...) with zero rows / columns up to `rank` (exact zeros in B A)."""
    a_list = [t if t.shape[0] == rank else F.pad(t, [0, 0] * (t.dim() - 1) + [0, rank - t.shape[0]]) for t in a_list]
    b_list = [t if t.shape[1] == rank else F.pad(t, [0, 0] * (t.dim() - 2) + [0, rank - t.shape[1]]) for t in b_list]
    return a_list, b_list


@register_adapter("lowrank")
def build(spec: SiteSpec, config) -> nn.Module:
    if spec.kind == "embedding":
        return LowRankEmbedding(spec, config.rank, config.alpha)
    return LowRankLinear(spec, config.rank, config.alpha)
