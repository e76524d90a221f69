"""One base model of the service and what every job of it shares: its ColaModel and Trainer.

    a job's adapters arrive, one of three ways:
      server fit  -> add_job: adapters + an owner on the backend (Trainer.add_user)
      client fit  -> add_client_job: adapters; the owner is handed out (Trainer.add_remote_user)
      finished    -> load_finished: the saved adapters, for inference after a restart or an unload
    the first of them, whichever way, makes the ColaModel and its Trainer (`_attach`, the one
    place they are made); every later one is a new user of them

Each job is one user, its id the job's. The host keeps each user's mode (personal or
collaborative) and, for a classification model, the labels its head outputs mean. Finished
personal jobs stay loaded until more than `max_loaded_adapters` of them are, then the least
recently used is unloaded (a collaborative job's delta is part of the mean every collaborative
job sees: it stays). Everything here runs on the engine's thread (colaft.serve.scheduler),
which decides when; where on disk things are is the job store's (colaft.serve.store).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from colaft.backends import make_backend
from colaft.config import ColaConfig
from colaft.io.state import load_owner, read_owner, save_owner
from colaft.model import ColaModel
from colaft.packets import TRANSFER_DTYPES
from colaft.pipeline import UserFaults
from colaft.serve.fits import client_info
from colaft.serve.settings import Settings
from colaft.tasks import get_task
from colaft.trainer import Trainer
from colaft.users import Owner, Update

log = logging.getLogger("colaft.serve")


class ModelHost:
    """The base model `model_id` (task "clm" or "sc"), its ColaModel and Trainer, and their users."""

    def __init__(self, model_id: str, source: str, task: str, settings: Settings):
        self.id, self.settings = model_id, settings
        self.task = get_task(task)
        self.task_name = task
        # a classification head of num_labels outputs; every job numbers its labels from 0
        labels = [{"label": i} for i in range(settings.num_labels)] if task == "sc" else []
        self.base = self.task.load(source, labels, seed=0)
        self.base.eval()
        self.cola: ColaModel | None = None
        self.trainer: Trainer | None = None
        self.modes: dict[str, str] = {}  # job id -> mode, for every job whose adapters are loaded
        self.labels: dict[str, list] = {}  # job id -> its labels (index = head output; none for a chat job)
        self.training: set[str] = set()  # jobs still training (never unloaded)
        # finished personal jobs whose adapters are loaded, least recently used first
        self.finished: OrderedDict[str, None] = OrderedDict()

    # ------------------------------------------------------------- users
    def _attach(self, job_id: str, config: ColaConfig) -> None:
        """Make the ColaModel, with the job's adapters (`config`), and its Trainer unless they
        exist. The Trainer keeps the library's fit defaults: each job's fit settings are its own
        (`add_user`), never the first job's for every later one."""
        if self.cola is not None:
            return
        self.cola = ColaModel(self.base, config, user=job_id)
        try:
            self.trainer = Trainer(self.cola, backend=make_backend(self.settings.backend,
                                                                   **self.settings.backend_options),
                                   transfer_dtype=TRANSFER_DTYPES[self.settings.transfer_dtype])
        except BaseException:
            self.cola = None  # a later job tries again from nothing
            raise

    def _added(self, job_id: str, mode: str, labels: list | None) -> None:
        self.modes[job_id] = mode
        self.labels[job_id] = list(labels or [])
        if labels:  # saved with the job's adapters: its downloads name the head's outputs
            self.cola.labels[job_id] = list(labels)

    def add_job(self, job_id: str, mode: str, config: ColaConfig, fit: dict, labels: list | None) -> None:
        """A job whose fits run on the server: its adapters and an owner on the backend."""
        self._attach(job_id, config)
        try:
            self.trainer.add_user(job_id, config, **fit)  # a first user's owner is made again, with its fit
        except BaseException:
            if job_id in self.cola.users:
                self.trainer.remove_user(job_id)
            raise
        self.training.add(job_id)
        self._added(job_id, mode, labels)

    def add_client_job(self, job_id: str, mode: str, config: ColaConfig, fit: dict, labels: list | None,
                       sink: Callable[[list], None]) -> Owner:
        """A job whose fits run on its client: adapters here, its packets to `sink`, never to the
        backend. Returns a fresh owner of the job, to hand to the client."""
        self._attach(job_id, config)  # a first user loses the owner the Trainer gave it
        owner = self.trainer.add_remote_user(job_id, config, sink, **fit)
        self.training.add(job_id)
        self._added(job_id, mode, labels)
        return owner

    def load_finished(self, job_id: str, mode: str, config: ColaConfig, folder: Path, labels: list | None) -> None:
        """A finished job's saved adapters (`folder`, saved with `config`), for inference."""
        self._attach(job_id, config)
        try:
            self.cola.load_adapters(folder, user=job_id)  # a first user's fresh adapters get the saved weights
        except BaseException:
            if job_id in self.cola.users:
                self.trainer.remove_user(job_id)
            raise
        self._added(job_id, mode, labels)
        self.used(job_id)

    def holds(self, job_id: str) -> bool:
        return self.cola is not None and job_id in self.cola.users

    def finish(self, job_id: str) -> None:
        """The job is done training: its adapters stay for inference, until unused."""
        self.training.discard(job_id)
        self.used(job_id)
        self.unload_unused()

    def used(self, job_id: str) -> None:
        """A finished job's adapters were just loaded or asked for: the last to be unloaded."""
        if job_id not in self.training and self.modes.get(job_id) != "collaborative":
            self.finished[job_id] = None
            self.finished.move_to_end(job_id)

    def unload_unused(self, keep: set[str] | frozenset = frozenset()) -> None:
        """Unload the least recently used finished personal jobs' adapters past max_loaded_adapters,
        but none of `keep` (jobs whose completions are in flight): those may briefly be more."""
        for job_id in [j for j in self.finished if j not in keep]:
            if len(self.finished) <= self.settings.max_loaded_adapters:
                break
            self.remove(job_id)
            log.info("%s: unloaded the adapters of %s (least recently used)", self.id, job_id)

    def remove(self, job_id: str) -> None:
        """The job's adapters and owner go (after its fits in flight), whatever state it is in."""
        self.training.discard(job_id)
        self.finished.pop(job_id, None)
        self.modes.pop(job_id, None)
        self.labels.pop(job_id, None)
        if self.holds(job_id):
            self.trainer.remove_user(job_id)

    def set_mode(self, mode: str) -> None:
        """personal, or collaborative: the mean delta of the collaborative jobs (weight 0 for the others)."""
        if self.cola is None:
            return
        if mode == "collaborative":
            weights = {u: float(self.modes.get(u) == "collaborative") for u in self.cola.users}
            self.cola.set_mode("collaborative", weights)
        else:
            self.cola.set_mode("personal")

    # ------------------------------------------------------------- training
    def step(self, batch: dict, mode: str) -> tuple[dict[str, float], float, dict[str, str]]:
        """One training step in `mode` on `batch` (rows of several jobs): (each job's loss, seconds
        in Trainer.step, the jobs whose own fit or update failed -> why). Raises when the shared
        server step failed: then nothing was sent or applied (Trainer.step)."""
        self.set_mode(mode)
        start = time.perf_counter()
        faults = {}
        try:
            self.trainer.step(batch)
        except UserFaults as e:  # the other jobs' steps are done
            faults = self._faults(e)
        return self.trainer.last_user_losses, time.perf_counter() - start, faults

    def check(self, batch: dict, mode: str) -> None:
        """The server step of `batch` in `mode` with nothing sent or applied: raises as `step` would."""
        self.set_mode(mode)
        self.trainer.check(batch)

    def flush(self, job_id: str) -> dict[str, str]:
        """Fit the job's partial interval and wait for its updates (its last step is done); the
        jobs whose fit failed meanwhile -> why."""
        try:
            self.trainer.flush([job_id])
        except UserFaults as e:
            return self._faults(e)
        return {}

    def _faults(self, e: UserFaults) -> dict[str, str]:
        for job_id, trace in e.traces.items():
            log.warning("%s: the fit of job %s failed:\n%s", self.id, job_id, trace)
        return e.faults

    def apply_update(self, update: Update) -> None:
        """A client-fit job's update, brought by its client."""
        self.trainer.apply_update(update)

    def client_info(self, job_id: str) -> dict:
        return client_info(self.cola, self.trainer, job_id)

    def save_owner(self, job_id: str, folder: Path, state: dict | None = None) -> None:
        """A checkpoint of the job: its adapters and owner (`state`: a client-fit job's, as last updated)."""
        save_owner(self.trainer, job_id, folder, state=state)

    def load_owner(self, job_id: str, folder: Path) -> None:
        """Resume a server-fit job from its checkpoint: adapters and owner."""
        load_owner(self.trainer, job_id, folder)

    def read_owner(self, job_id: str, folder: Path) -> dict:
        """Resume a client-fit job from its checkpoint: its adapters here; its owner's state is
        returned, for the client."""
        return read_owner(self.trainer, job_id, folder)

    def save_adapters(self, job_id: str, folder: Path) -> None:
        """The job's adapters in folder/adapter (colaft) and folder/peft (PEFT, when it has that form)."""
        self.cola.save_pretrained(folder / "adapter", user=job_id)
        try:
            self.cola.export_peft(folder / "peft", user=job_id)
        except ValueError as e:  # e.g. mlp adapters: PEFT's LoRA cannot hold them
            log.info("%s: job %s has no PEFT form: %s", self.id, job_id, e)

    def evaluate(self, mode: str, features: list[dict], batch_size: int) -> dict:
        """The task's metrics of the model in `mode` on `features` (validation rows of one job)."""
        self.set_mode(mode)
        batches = [self.task.collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size)]
        metrics = self.task.evaluate(self.cola, batches)
        return {k: v for k, v in metrics.items() if k != "users"}

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()

    # ------------------------------------------------------------- inference
    def model(self, users: list[str | None]):
        """The model to call and its routing keywords: the ColaModel once it exists, else the base."""
        if self.cola is None:
            return self.base, {}
        return self.cola, {"users": users}
