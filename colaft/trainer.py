"""Trainer: server step, then the owners' fits (on a backend), then the updates.

    batch (rows tagged with users) -> server_step -> packets per (user, site)
      -> pipeline.push per user -> backend -> Owner.fit -> Update (weights, version)
      -> pipeline applies each version once; waits while a user is more than S fits behind

With interval I an owner buffers the packets of I server steps and fits once, their dL/dh
averaged (I behaves like gradient accumulation over I batches). With I = 1, one fit step
and S = 0, the adapters follow ordinary backprop exactly, on every backend.

TrainerLike names what a training loop uses of a trainer; `train_steps` is that loop, shared
by the command line's runs and the benchmarks, for ColA's Trainer and the backprop baselines.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from colaft.backends import Backend, WorkerError, make_backend
from colaft.config import ColaConfig
from colaft.io import state as state_io
from colaft.model import ColaModel
from colaft.packets import cast_packets, packets_nbytes
from colaft.pipeline import Pipeline
from colaft.server import LossFn, server_step
from colaft.users import DTYPES, FitConfig, Owner, Update

__all__ = ["Step", "Trainer", "TrainerLike", "epochs", "train_steps"]


def _dtype_name(dtype: torch.dtype) -> str:
    """FitConfig's name of a torch dtype ("float32", ...); a ValueError for one owners cannot train in."""
    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    if name is None:
        raise ValueError(f"fit_dtype {dtype}: use one of {', '.join(DTYPES)}")
    return name


@runtime_checkable
class TrainerLike(Protocol):
    """What the training loop, the runs and the tasks' evaluations use of a trainer.

    Trainer (ColA) and colaft.app.baselines.BackpropTrainer (autograd) implement it, so that
    both are driven, logged and evaluated alike.
    """

    model: nn.Module
    """The model being trained, called as the tasks evaluate it: `model(**batch, users=...)`."""
    stats: dict
    """Running figures; every trainer keeps "steps", "version" (updates applied),
    "skipped_fits" (fits left out for non-finite gradients) and "packet_bytes" (the last step)."""
    last_user_losses: dict[str, float]
    """Each user's loss in the last step (batches with users), for per-user logs."""

    @property
    def lr(self) -> float:
        """The learning rate the next step's update uses."""

    def step(self, batch: Mapping, users: Sequence[str] | None = None) -> float:
        """Train on one batch; returns its loss."""

    def flush(self, users: list[str] | None = None) -> None:
        """Apply every pending update (call after the last step)."""

    def trainable_parameters(self) -> int:
        """How many parameters this trainer trains."""

    def close(self, wait: bool = True) -> None:
        """Release what the trainer holds (workers); with `wait`, after the updates in flight."""


class Trainer(TrainerLike):
    """Trains the adapters of a ColaModel's users with Gradient Learning.

    Args:
        model: the ColaModel (the server side); each of its users gets an owner.
        optimizer: "adamw" | "adam" | "sgd" or a torch optimizer class.
        lr, weight_decay: optimizer settings; `optimizer_kwargs` passes the rest.
        scheduler: a transformers scheduler name ("constant", "linear", "cosine", ...) or a
            callable `scheduler(optimizer) -> LRScheduler`; stepped once per optimizer step.
        warmup_ratio: warm-up share of the optimizer steps (needs total_steps).
        total_steps: server steps planned, for schedules that decay.
        interval: server steps per fit (ColA's I).
        fit_steps: optimizer steps per fit on the same packets (1 = backprop-exact).
        loss_fn: `loss_fn(output, batch)` for models that return no `.loss` (per-row losses,
            shape (B,), for batches of several users).
        fit_device, fit_dtype: where and in what precision the owners' adapters train.
        backend: "inline" | "process" | "ray" (colaft.backends), or a backend instance (which
            the trainer then closes); `backend_options` go to the named backend's constructor
            (workers=, threads=; for ray also address="HOST:PORT", temp_dir=).
        staleness: S; the server may run up to S steps ahead of a user's fits (0: synchronous,
            exact). S = 1 overlaps the fits with the next server step; each update is then used
            one step late, which costs accuracy at high learning rates (measured on the main
            job, MiniLM-L6, 150 steps: held-out loss +7% at lr 1e-3, +0.4% at lr 5e-4; see
            BENCHMARKS.md).
        transfer_dtype: cast packets to this dtype before they leave the server (the owner
            fits in its own precision). torch.bfloat16 halves the bytes of float32 packets;
            measured on the main job (MiniLM-L6, 100 and 150 steps) the losses and held-out
            accuracy were unchanged to the 3 digits reported (held-out loss within 1e-4).
        stream_packets: packets leave the device while the backward runs (`server_step`);
            None: on for a CUDA server.

    These are every user's defaults; `add_user` sets a user's own.

    `stats` holds: steps, version (updates applied), skipped_fits, packet_bytes (the last
    step) and packet_bytes_total, update_bytes and snapshot_bytes (tensor bytes back from
    the owners; snapshots only with process or ray), server_seconds (in the server step) and
    server_cpu_seconds (this thread's CPU time in it: less where the thread waited for a core),
    send_seconds (handing messages to the backend; inline: including the fits),
    transfer_seconds (serialising and deserialising in this process), wait_seconds (blocked
    by the staleness bound) and recoveries (lost workers replaced).
    """

    def __init__(self, model: ColaModel, optimizer: str | Callable = "adamw", lr: float = 3e-4,
                 weight_decay: float = 0.0, scheduler: str | Callable = "constant", warmup_ratio: float = 0.0,
                 total_steps: int | None = None, interval: int = 1, fit_steps: int = 1,
                 loss_fn: LossFn | None = None, fit_device: str | torch.device | None = None,
                 fit_dtype: torch.dtype = torch.float32, optimizer_kwargs: Mapping | None = None,
                 backend: str | Backend = "inline", staleness: int = 0, transfer_dtype: torch.dtype | None = None,
                 backend_options: Mapping | None = None, stream_packets: bool | None = None):
        if interval < 1 or fit_steps < 1:
            raise ValueError("interval and fit_steps must be >= 1")
        dtype_name = _dtype_name(fit_dtype)
        self.model, self.loss_fn, self.transfer_dtype = model, loss_fn, transfer_dtype
        self.stream_packets = stream_packets
        fit_config = dict(optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                          optimizer_kwargs=dict(optimizer_kwargs or {}), scheduler=scheduler,
                          warmup_ratio=warmup_ratio, total_steps=total_steps, interval=interval, fit_steps=fit_steps,
                          dtype=dtype_name)
        FitConfig(**fit_config)  # refuse bad settings before a backend starts workers
        self.backend = make_backend(backend, **dict(backend_options or {}))
        try:
            device = str(fit_device) if fit_device is not None else self.backend.device
            self.fit_config = FitConfig(**fit_config, device=device)
            self.user_fit: dict[str, FitConfig] = {}
            self.remote: dict[str, Callable[[list], None]] = {}  # user -> where its packets go (add_remote_user)
            self.last_user_losses: dict[str, float] = {}
            self.stats = {"steps": 0, "version": 0, "skipped_fits": 0, "packet_bytes": 0, "packet_bytes_total": 0,
                          "server_seconds": 0.0, "server_cpu_seconds": 0.0}
            self.pipeline = Pipeline(self.backend, self._apply, staleness, stats=self.stats)
            self._sync_users()
        except BaseException:
            self.backend.close()
            raise

    # ------------------------------------------------------------- users
    def add_user(self, user: str, config: ColaConfig | None = None, **fit) -> None:
        """A new user: adapters on the server (`config`, default the model's) and an owner.

        Keyword arguments override this trainer's fit settings for the user, named as the
        constructor names them (lr, optimizer, interval, scheduler, total_steps, fit_device, ...).
        A user the model already has (its first) gets a fresh owner with these settings.
        """
        fit_config = self._user_fit_config(fit)  # validate before changing anything
        if user not in self.model.users:
            self.model.add_user(user, config)
        elif user in self.pipeline.tracks:  # e.g. the model's first user: its owner had the defaults
            self.pipeline.remove(user)
        self.remote.pop(user, None)
        self.user_fit[user] = fit_config
        self._start_owner(user)

    def add_remote_user(self, user: str, config: ColaConfig | None = None,
                        sink: Callable[[list], None] | None = None, **fit) -> Owner:
        """A user whose owner runs outside this trainer (a service's fit client on the user's device).

        Every step hands the user's packets to `sink(packets)` instead of a backend, and
        never waits for its fits: whoever runs the owner decides when the user's rows may
        enter a batch, and brings its updates back with `apply_update`. A user the model
        already has (its first) loses its owner here. Returns a fresh Owner of the user's
        adapters and FitConfig, whose `state()` is what the remote owner starts from.
        """
        fit_config = self._user_fit_config(fit)
        if user not in self.model.users:
            self.model.add_user(user, config)
        elif user in self.pipeline.tracks:
            self.pipeline.remove(user)
        self.user_fit[user] = fit_config
        self.remote[user] = sink
        return Owner(user, self.model.user_adapters(user), fit_config)

    def _user_fit_config(self, fit: Mapping) -> FitConfig:
        """This trainer's FitConfig with a user's overrides, given in the constructor's names."""
        fit = dict(fit)
        if "fit_device" in fit:
            fit["device"] = str(fit.pop("fit_device"))
        if "fit_dtype" in fit:
            fit["dtype"] = _dtype_name(fit.pop("fit_dtype"))
        return self.fit_config.replace(**fit)

    def remove_user(self, user: str) -> None:
        """Stop the user's owner (after its fits in flight) and free its adapters on the server."""
        if user in self.pipeline.tracks:  # a user loaded into the model has no owner before the next step
            self.pipeline.remove(user)
        self.remote.pop(user, None)
        self.user_fit.pop(user, None)
        self.model.remove_user(user)

    def _start_owner(self, user: str) -> None:
        config = self.user_fit.get(user, self.fit_config)

        def make() -> Owner:
            return Owner(user, self.model.user_adapters(user), config, snapshots=self.backend.recoverable)
        self.pipeline.add(make(), make)

    def _sync_users(self) -> None:
        """Owners for users added to the model directly; none for users it no longer has."""
        for user in self.model.users:
            if user not in self.pipeline.tracks and user not in self.remote:
                self._start_owner(user)
        for user in list(self.pipeline.tracks):
            if user not in self.model.users:
                self.pipeline.remove(user)
        # where no adapter changes every step, a merged site keeps W + delta_W from step to step
        keep = all(self.user_fit.get(u, self.fit_config).interval > 1 for u in self.model.users)
        for site in self.model.sites.values():
            site.merges.under_grad = keep

    # ------------------------------------------------------------- training
    def step(self, batch: Mapping, users: Sequence[str] | None = None) -> float:
        """One server step on `batch` (row i of user `users[i]`, or the batch's "users"); returns the loss.

        Each user's packets go to its owner, which fits every `interval` of its steps; the
        server then waits until no user is more than `staleness` fits behind.

        Raises:
            what the server step raised: before any packet left, so nothing has changed but
                the random state (dropout); the step may be tried again.
            UserFaults: the named users' fits or updates failed; every other user's step is
                done (its update applied).
            WorkerError: the backend failed; it is not usable any more.
        """
        self._sync_users()
        start, cpu = time.perf_counter(), time.thread_time()
        out = self._server_step(batch, users)
        self.stats["server_seconds"] += time.perf_counter() - start
        self.stats["server_cpu_seconds"] += time.thread_time() - cpu
        by_user: dict[str, list] = {u: [] for u in out.user_losses}
        for p in out.packets:
            by_user[p.user].append(p)
        # cast once per shared x, which stays shared; the bytes are those sent, each shared x once
        by_user = {u: cast_packets(ps, self.transfer_dtype) for u, ps in by_user.items()}
        self.stats["steps"] += 1
        self.stats["packet_bytes"] = sum(packets_nbytes(ps) for ps in by_user.values())
        self.stats["packet_bytes_total"] += self.stats["packet_bytes"]
        self.last_user_losses = out.user_losses
        for user, packets in by_user.items():
            try:
                if user in self.remote:
                    self.remote[user](packets)
                else:
                    self.pipeline.push(user, packets)
            except WorkerError:  # the backend's, not this user's
                raise
            except Exception as e:  # noqa: BLE001 - this user's packets could not be handed over: its fault alone
                self.pipeline.fault(user, f"its packets could not be sent: {type(e).__name__}: {e}")
        self.pipeline.settle()
        self.pipeline.raise_faults()
        return out.loss.item()

    def check(self, batch: Mapping, users: Sequence[str] | None = None) -> None:
        """The server step of `batch` with nothing sent: raises what `step` would raise before
        any packet leaves (to find which users' rows make it fail); changes nothing but the
        random state."""
        self._server_step(batch, users)

    def _server_step(self, batch: Mapping, users: Sequence[str] | None):
        was_training = self.model.training
        self.model.train()  # dropout at sites and in the base, as training means it
        try:
            return server_step(self.model, batch, self.loss_fn, users, self.stream_packets)
        finally:
            self.model.train(was_training)  # inference after a step is not dropout-noisy

    def flush(self, users: list[str] | None = None) -> None:
        """Fit every user's partial interval and wait for all updates (call after the last step).

        `users`: only theirs (a user whose training ends while others go on). Raises
        UserFaults as `step` does."""
        self.pipeline.flush(users)
        self.pipeline.raise_faults()

    def apply_update(self, update: Update) -> None:
        """Load a remote user's update into the server's adapters (its owner runs elsewhere)."""
        if update.user not in self.remote:
            raise ValueError(f"user {update.user!r} is not a remote user: its updates come through the pipeline")
        if update.states is not None:
            self._apply(update)

    def _apply(self, update: Update) -> None:
        tensors = [t for state in update.states.values() for t in state.values() if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise ValueError(f"the update of user {update.user!r} has non-finite weights (NaN or Inf)")
        self.model.load_adapter_state(update.states, user=update.user)
        self.stats["version"] += 1

    @property
    def lr(self) -> float:
        """The learning rate the next fit of the first user uses."""
        return self.pipeline.lr(self.model.users[0])

    def trainable_parameters(self) -> int:
        """The adapters' parameters: they train on the owners (the server holds no trainable one)."""
        return self.model.adapter_parameters()

    def close(self, wait: bool = True) -> None:
        """Stop the backend's workers; with `wait`, after the fits in flight are applied."""
        self.pipeline.close(wait)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)  # after an error, stop at once

    # ------------------------------------------------------------- the owners, in this process
    def owner(self, user: str | None = None) -> Owner:
        """The live Owner of `user` (default: the first); only where owners run in this process."""
        if not hasattr(self.backend, "owner"):
            raise ValueError(f"the owners run elsewhere ({type(self.backend).__name__}); "
                             "use trainer.owner_state(user)")
        self.pipeline.settle(0)
        return self.backend.owner(user or self.model.users[0])

    def owner_state(self, user: str | None = None) -> dict:
        """The owner's whole state (adapters, optimizer, scheduler, buffered packets, version)."""
        return self.pipeline.state(user or self.model.users[0])

    @property
    def owner_adapters(self) -> dict[str, nn.Module]:
        return self.owner().adapters

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.owner().optimizer

    @property
    def scheduler(self):
        return self.owner().scheduler

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory) -> None:
        """Adapters, optimizers, schedulers, RNG and buffered packets of every user: resuming is bit-exact."""
        state_io.save_trainer(self, directory)

    def load_checkpoint(self, directory) -> None:
        state_io.load_trainer(self, directory)


# ---------------------------------------------------------------- the training loop

@dataclass(frozen=True)
class Step:
    """One step of `train_steps`, reported when it ends."""

    number: int  # 1, 2, ...
    epoch: int  # 0 in the first pass over the batches, 1 in the second, ...
    batch: Mapping
    loss: float  # what trainer.step returned
    lr: float  # the learning rate this step's update used


def train_steps(trainer: TrainerLike, batches: Iterable[Mapping], steps: int | None = None,
                flush: bool = True) -> Iterator[Step]:
    """The training loop: `steps` trainer steps over `batches`, pass after pass (None: one
    pass), each yielded when it ends, so that the caller logs and evaluates between steps.

    With `flush` the loop ends with trainer.flush(): every partial interval is fitted and every
    update applied (False: the caller waits for the fits in flight as it needs).
    """
    numbers = itertools.count(1) if steps is None else range(1, steps + 1)
    # `numbers` first: zip stops at the last step without drawing another batch (nor reshuffling)
    for number, (epoch, batch) in zip(numbers, epochs(batches, endless=steps is not None)):
        lr = trainer.lr  # read before the step: the rate this step's update uses
        yield Step(number, epoch, batch, trainer.step(batch), lr)
    if flush:
        trainer.flush()


def epochs(batches: Iterable, endless: bool = True) -> Iterator[tuple[int, object]]:
    """(epoch, batch) pairs, pass after pass over `batches` (iterated anew each time: a shuffling
    DataLoader reshuffles); one pass unless `endless`."""
    for epoch in itertools.count() if endless else range(1):
        empty = True
        for batch in batches:
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("no training batch: the training split is empty")
