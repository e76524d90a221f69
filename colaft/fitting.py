"""Gradient Learning: fit adapters to the server's dL/dh by a squared loss (pure, no I/O).

The fit minimises  0.5 * || g(x; w) - stopgrad(g(x; w_0) - dL/dh) ||^2  (sum reduction).
Its gradient at w_0 is (dg/dw)^T dL/dh: one optimizer step equals one backprop step
(ColA, Diao et al. 2024, §3.2). We never form the target: the residual is computed as
    r_k = dL/dh + (g(x; w_k) - g(x; w_0)),
which is exactly dL/dh at the first step (so the first step is g(x).backward(dL/dh)); the
literal g - (g - dL/dh) cancels catastrophically when |g| >> |dL/dh|. More than one fit step
on the same packets is functional gradient descent towards the fixed target.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from colaft.packets import Packet, all_finite, tensor_key


@dataclass
class FitResult:
    skipped: bool  # a packet held NaN/Inf: nothing was changed
    rows: int = 0  # rows fitted (tokens, samples)


def fit(adapters: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer, packets: Sequence[Packet],
        steps: int = 1, scheduler=None, grad_scale: float = 1.0) -> FitResult:
    """Fit `adapters` (site name -> module) on `packets` with `steps` optimizer steps.

    Args:
        grad_scale: multiplies every dL/dh (1/I to average the I server steps of an interval).
    Returns:
        FitResult; when any packet is not finite the fit is skipped and nothing changes.
    """
    if not all_finite(packets):
        return FitResult(skipped=True)
    inputs, grads, g0 = [], [], []
    moved: dict[tuple, torch.Tensor] = {}  # a shared x (q, k, v: one input) is moved and cast once
    for p in packets:
        first = next(adapters[p.site].parameters())
        key = (tensor_key(p.x), first.device, first.dtype)
        if key not in moved:
            x = p.x.to(first.device)
            moved[key] = x.to(first.dtype) if x.is_floating_point() else x
        inputs.append(moved[key])
        g = p.grad.to(first.device, first.dtype)
        grads.append(g if grad_scale == 1.0 else g * grad_scale)
    for k in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for i, p in enumerate(packets):
            y = adapters[p.site](inputs[i])
            if k == 0:
                g0.append(y.detach())
                r = grads[i]
            else:
                r = grads[i] + (y.detach() - g0[i])
            y.backward(r)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return FitResult(skipped=False, rows=sum(len(x) for x in inputs))
