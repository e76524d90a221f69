"""The server step: forward, loss, and backward to the hidden representations only.

    batch (rows tagged with user)
      -> server: forward with adapters (merged or routed) -> loss -> backward to hidden only
      -> packets: per (user, site): x rows, dL/dh rows   [padding tokens dropped]
      -> backend: fit(adapter, packets) on a worker      [GL squared-loss step]
      -> updates: per (user, site): new weights, version
      -> server applies updates -> next batch

The server holds no trainable parameter: the base is frozen and its adapters are frozen
copies. `torch.autograd.grad` takes dL/dh at the site outputs directly, so no parameter
`.grad` is ever populated and no parameter-gradient kernel runs. The backward still goes
through each adapter's Jacobian with respect to its input (or through W + delta_W when
merged), which is what makes dL/dh exact at earlier sites (ColA, Diao et al. 2024, §3).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from colaft.model import ColaModel
from colaft.packets import Packet

LossFn = Callable[[object, Mapping], torch.Tensor]


def server_step(model: ColaModel, batch: Mapping, loss_fn: LossFn | None = None) -> tuple[torch.Tensor, list[Packet]]:
    """Run one server step on `batch`.

    Args:
        model: the adapted model.
        batch: keyword arguments of the model's forward, labels included.
        loss_fn: `loss_fn(output, batch) -> loss` for models that do not return `.loss`.
    Returns:
        the (detached) loss and one packet per site call that the loss depends on.
    """
    with model.recording() as calls:
        output = model.model(**batch)
        loss = output.loss if loss_fn is None else loss_fn(output, batch)
    del output  # the logits are not needed past the loss: free them before the backward
    if loss is None:
        raise ValueError("the model returned no loss: pass labels in the batch or give a loss_fn")
    if not calls or not loss.requires_grad:
        raise RuntimeError("the loss depends on no adapted site")
    blind = sorted({c.site.name for c in calls if c.edge is None})
    if blind:  # their graph is gone: dL/dh cannot be taken there
        raise RuntimeError(f"sites ran without autograd: {', '.join(blind)}. Reentrant activation checkpointing "
                           "does this; use the non-reentrant kind (use_reentrant=False)")
    # by graph edge, not by tensor: a tensor modified in place afterwards would give dL/d(modified)
    grads = list(torch.autograd.grad(loss, [c.edge for c in calls], allow_unused=True))
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        mask = None  # no padding to drop: the packets are flat views, not copies
    packets = []
    for i, c in enumerate(calls):
        g, grads[i] = grads[i], None  # with padding, each full dL/dh is freed once its rows are copied
        if g is not None:
            packets.append(Packet(c.site.name, *c.site.rows(c.x, g, mask)))
    return loss.detach(), packets
