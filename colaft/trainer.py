"""Trainer: server step, then the fit of the adapters' owner, then the update.

With interval I the packets of I server steps are buffered and fitted once, their dL/dh
averaged (so I behaves like gradient accumulation over I batches). With I = 1, one fit
step and synchronous updates, the adapters follow ordinary backprop exactly.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import get_scheduler

from colaft.fit import fit
from colaft.model import ColaModel
from colaft.packets import Packet
from colaft.server import LossFn, server_step

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
}


def make_optimizer(spec: str | Callable, params, lr: float, weight_decay: float, **kwargs) -> torch.optim.Optimizer:
    """An optimizer by name, or `spec(params, lr=..., weight_decay=..., **kwargs)` for any torch optimizer."""
    if callable(spec):
        return spec(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if spec not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec!r}; built in: {', '.join(OPTIMIZERS)} (or pass a class)")
    return OPTIMIZERS[spec](params, lr=lr, weight_decay=weight_decay, **kwargs)


class Trainer:
    """Trains the adapters of a ColaModel with Gradient Learning.

    Args:
        model: the ColaModel (the server side).
        optimizer: "adamw" | "adam" | "sgd" or a torch optimizer class.
        lr, weight_decay: optimizer settings; `optimizer_kwargs` passes the rest.
        scheduler: a transformers scheduler name ("constant", "linear", "cosine", ...) or a
            callable `scheduler(optimizer) -> LRScheduler`; stepped once per optimizer step.
        warmup_ratio: warm-up share of the optimizer steps (needs total_steps).
        total_steps: server steps planned, for schedules that decay.
        interval: server steps per fit (ColA's I).
        fit_steps: optimizer steps per fit on the same packets (1 = backprop-exact).
        loss_fn: `loss_fn(output, batch)` for models that return no `.loss`.
        fit_device, fit_dtype: where and in what precision the owner's adapters train.
    """

    def __init__(self, model: ColaModel, optimizer: str | Callable = "adamw", lr: float = 3e-4,
                 weight_decay: float = 0.0, scheduler: str | Callable = "constant", warmup_ratio: float = 0.0,
                 total_steps: int | None = None, interval: int = 1, fit_steps: int = 1,
                 loss_fn: LossFn | None = None, fit_device: str | torch.device | None = None,
                 fit_dtype: torch.dtype = torch.float32, optimizer_kwargs: Mapping | None = None):
        if interval < 1 or fit_steps < 1:
            raise ValueError("interval and fit_steps must be >= 1")
        self.model, self.interval, self.fit_steps, self.loss_fn = model, interval, fit_steps, loss_fn
        device = fit_device or next(model.model.parameters()).device
        # The owner's trainable copies; the server keeps frozen ones and receives updates.
        self.adapters = nn.ModuleDict({k: copy.deepcopy(s.adapter).to(device, fit_dtype).requires_grad_(True)
                                       for k, s in model.sites.items()})
        self.optimizer = make_optimizer(optimizer, self.adapters.parameters(), lr, weight_decay,
                                        **(optimizer_kwargs or {}))
        self.scheduler = self._make_scheduler(scheduler, warmup_ratio, total_steps)
        self._pending: list[Packet] = []
        self._pending_steps = 0
        self.stats = {"steps": 0, "version": 0, "skipped_fits": 0, "packet_bytes": 0}

    def _make_scheduler(self, scheduler, warmup_ratio: float, total_steps: int | None):
        if callable(scheduler):
            return scheduler(self.optimizer)
        fits = math.ceil(total_steps / self.interval) * self.fit_steps if total_steps else None
        if fits is None and (scheduler not in ("constant",) or warmup_ratio):
            raise ValueError(f"scheduler {scheduler!r} with warm-up needs total_steps")
        return get_scheduler(scheduler, self.optimizer, num_warmup_steps=round(warmup_ratio * (fits or 0)),
                             num_training_steps=fits)

    @property
    def lr(self) -> float:
        """The learning rate the next fit uses."""
        return self.optimizer.param_groups[0]["lr"]

    @property
    def owner_adapters(self) -> dict[str, nn.Module]:
        return {s.name: self.adapters[k] for k, s in self.model.sites.items()}

    def step(self, batch: Mapping) -> float:
        """One server step on `batch`; fits and updates the server every `interval` steps."""
        self.model.train()
        loss, packets = server_step(self.model, batch, self.loss_fn)
        self.stats["steps"] += 1
        self.stats["packet_bytes"] = sum(p.nbytes for p in packets)
        self._pending += packets
        self._pending_steps += 1
        if self._pending_steps >= self.interval:
            self.flush()
        return loss.item()

    def flush(self) -> None:
        """Fit on the buffered packets (also a partial interval) and update the server.

        Call it once after the last step when `interval` does not divide the step count.
        """
        if not self._pending_steps:
            return
        result = fit(self.owner_adapters, self.optimizer, self._pending, self.fit_steps, self.scheduler,
                     grad_scale=1.0 / self._pending_steps)
        self._pending, self._pending_steps = [], 0
        if result.skipped:
            self.stats["skipped_fits"] += 1
            return
        self.model.load_adapter_state({name: a.state_dict() for name, a in self.owner_adapters.items()})
        self.stats["version"] += 1

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory) -> None:
        """Adapters, optimizer, scheduler, RNG and pending packets: resuming is bit-exact."""
        from colaft import checkpoint
        checkpoint.save_trainer(self, directory)

    def load_checkpoint(self, directory) -> None:
        from colaft import checkpoint
        checkpoint.load_trainer(self, directory)
