"""The adapters' owners: one user's trainable adapters, optimizer, scheduler and interval.

An Owner is the cheap side of ColA. It receives the packets of its user, buffers them for
`interval` server steps, fits its adapters (colaft.fitting) and answers with an Update: the new
weights and a version. It holds no reference to the server, so it runs wherever a backend
puts it (in the server's process, in a worker process, in a Ray actor) and pickles as is.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as typed_dataclass
from torch import nn
from transformers import get_scheduler

from colaft.fitting import fit
from colaft.packets import Packet

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@typed_dataclass(config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))
class FitConfig:
    """How an owner trains its adapters; each user may have its own."""

    optimizer: str | Callable = "adamw"
    """"adamw" | "adam" | "sgd", or a torch optimizer class `cls(params, lr=, weight_decay=, **kwargs)`."""
    lr: Annotated[float, Field(gt=0)] = 3e-4
    """Learning rate (the peak one with a schedule)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """Weight decay of the optimizer."""
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of the optimizer (betas, momentum, ...)."""
    scheduler: str | Callable = "constant"
    """A transformers scheduler name ("constant", "linear", "cosine", ...) or `f(optimizer) -> LRScheduler`;
    stepped once per optimizer step."""
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Warm-up share of the optimizer steps (needs total_steps)."""
    total_steps: Annotated[int, Field(gt=0)] | None = None
    """Server steps planned for this user, for schedules that decay."""
    interval: Annotated[int, Field(ge=1)] = 1
    """Server steps per fit (ColA's I): the dL/dh of I steps are averaged and fitted once."""
    fit_steps: Annotated[int, Field(ge=1)] = 1
    """Optimizer steps per fit on the same packets (1 = backprop-exact)."""
    device: str | None = None
    """Where the owner's adapters train (None: where the server's adapters are)."""
    dtype: str = "float32"
    """Precision of the owner's adapters: float32 | bfloat16 | float16 | float64."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not callable(self.optimizer) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; built in: {', '.join(OPTIMIZERS)} "
                             "(or pass a class)")
        fits_planned = self.total_steps is not None
        if not callable(self.scheduler) and not fits_planned and (self.scheduler != "constant" or self.warmup_ratio):
            raise ValueError(f"scheduler {self.scheduler!r} with warm-up needs total_steps")

    def replace(self, **changes) -> FitConfig:
        return dataclasses.replace(self, **changes)


def optimizer_and_schedule(params: list[nn.Parameter], config: FitConfig):
    """The optimizer of `params` and its learning-rate schedule, as `config` sets them; the
    schedule counts optimizer steps: fit_steps per fit, one fit every `interval` server steps."""
    opt = config.optimizer if callable(config.optimizer) else OPTIMIZERS[config.optimizer]
    optimizer = opt(params, lr=config.lr, weight_decay=config.weight_decay, **config.optimizer_kwargs)
    if callable(config.scheduler):
        return optimizer, config.scheduler(optimizer)
    fits = math.ceil(config.total_steps / config.interval) * config.fit_steps if config.total_steps else None
    warmup = round(config.warmup_ratio * (fits or 0))
    return optimizer, get_scheduler(config.scheduler, optimizer, num_warmup_steps=warmup,
                                    num_training_steps=fits)


@dataclass
class Update:
    """An owner's answer to a fit: new weights (None when the fit was skipped) and their version."""

    user: str
    version: int  # fits this owner has run, skipped ones included
    states: dict[str, dict[str, torch.Tensor]] | None  # site name -> adapter state_dict; None: skipped
    rows: int = 0  # rows fitted
    lr: float = 0.0  # the learning rate the owner's next fit uses
    snapshot: dict | None = None  # the owner's whole state after the fit, for recovery (see Owner.snapshots)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (self.states or {}).values() for t in s.values())


class Owner:
    """One user's side: trainable copies of its adapters, optimizer, scheduler, packet buffer.

    Args:
        user: the user id.
        adapters: site name -> the server's adapter (copied; the copies train).
        config: FitConfig.
        snapshots: attach the owner's whole state to every Update, so that a lost worker
            can be replaced without losing or repeating an update.
    """

    def __init__(self, user: str, adapters: Mapping[str, nn.Module], config: FitConfig, snapshots: bool = False):
        self.user, self.config, self.snapshots = user, config, snapshots
        self.adapters = {name: self._copy(a, config) for name, a in adapters.items()}
        self.optimizer, self.scheduler = optimizer_and_schedule(
            [p for a in self.adapters.values() for p in a.parameters()], config)
        self.pending: list[Packet] = []
        self.pending_steps = 0
        self.version = 0

    @staticmethod
    def _copy(adapter: nn.Module, config: FitConfig) -> nn.Module:
        device = config.device or next(adapter.parameters()).device
        return copy.deepcopy(adapter).to(device, DTYPES[config.dtype]).requires_grad_(True)

    @property
    def lr(self) -> float:
        """The learning rate the next fit uses."""
        return self.optimizer.param_groups[0]["lr"]

    def push(self, packets: list[Packet]) -> Update | None:
        """Buffer one server step's packets; fit when `interval` steps are buffered."""
        self.pending += packets
        self.pending_steps += 1
        return self.flush() if self.pending_steps >= self.config.interval else None

    def flush(self) -> Update | None:
        """Fit on the buffered steps (also a partial interval); None when nothing is buffered."""
        if not self.pending_steps:
            return None
        result = fit(self.adapters, self.optimizer, self.pending, self.config.fit_steps, self.scheduler,
                     grad_scale=1.0 / self.pending_steps)
        self.pending, self.pending_steps = [], 0
        self.version += 1
        states = None if result.skipped else {name: {k: v.detach().clone() for k, v in a.state_dict().items()}
                                              for name, a in self.adapters.items()}
        return Update(self.user, self.version, states, result.rows, self.lr, self.state() if self.snapshots else None)

    # ------------------------------------------------------------- pickling (owners sent to workers)
    def __getstate__(self) -> dict:
        # Rebuilt on arrival rather than pickled attribute by attribute: a torch LR scheduler
        # wraps optimizer.step, which pickling drops (torch then warns in every worker).
        return {"user": self.user, "adapters": self.adapters, "config": self.config, "snapshots": self.snapshots,
                "state": self.state()}

    def __setstate__(self, d: dict) -> None:
        self.__init__(d["user"], d["adapters"], d["config"], d["snapshots"])
        self.load_state(d["state"])

    # ------------------------------------------------------------- whole state (snapshots, checkpoints)
    def state(self) -> dict:
        """Everything that determines the owner's future: adapters, optimizer, scheduler, buffer, version."""
        return copy.deepcopy({
            "adapters": {name: a.state_dict() for name, a in self.adapters.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "pending": self.pending, "pending_steps": self.pending_steps, "version": self.version})

    def load_state(self, state: Mapping) -> None:
        if state["pending_steps"] >= self.config.interval:
            raise ValueError(f"user {self.user!r}: the state holds {state['pending_steps']} pending server steps, "
                             f"but this owner fits every {self.config.interval}")
        for name, a in self.adapters.items():
            a.load_state_dict(state["adapters"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pending = list(state["pending"])
        self.pending_steps = state["pending_steps"]
        self.version = state["version"]
