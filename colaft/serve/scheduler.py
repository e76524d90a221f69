"""Training as a service: one Engine (a thread) per base model, every job a user of its ColaModel.

    queued job -> admit (colaft.serve.jobs: a job's life, its checkpoints and its end)
    each tick  -> every running job's next `batch_size` rows, all jobs' rows collated into
                  ONE batch -> trainer.step(batch): one forward and backward for all jobs,
                  each job's fit on its own rows (on the configured backend)
                  (collaborative jobs form a second batch, in collaborative mode)
               -> per-job loss -> events; checkpoints (save_owner); at its last step the
                  job's adapters are saved, exported and it succeeds
    between ticks: inference requests, batched across adapters (colaft.serve.inference)

Why a tick and not colaft.app.loop.train: that loop runs a fixed DataLoader for a fixed set of
users and steps. Here jobs arrive, finish and are cancelled between any two steps, and the
thread also answers inference and writes events and checkpoints; so the tick only forms the
batch and calls the library's Trainer.step (same encode, collate, step and loss
normalisation: the sum over jobs of each job's mean loss, so a job's updates do not depend on
which other jobs share its batches).

The HTTP event loop never waits for this thread: the API only writes the database and
hands job ids, cancellations and inference requests over through thread-safe queues.

Finished jobs' adapters are loaded for inference on demand and unloaded least recently
used first past `max_loaded_adapters` (personal jobs only: a collaborative job's delta is
part of the mean every collaborative job sees, so it stays while the server runs).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from colaft.backends import BACKENDS, make_backend
from colaft.config import ColaConfig
from colaft.model import ColaModel
from colaft.serve.db import ACTIVE, Database, Job
from colaft.serve.fits import Channel
from colaft.serve.jobs import LISTED, JobLifecycle, Run
from colaft.tasks import get_task
from colaft.trainer import Trainer

log = logging.getLogger("colaft.serve")


CHECKPOINTS_PER_STEP = 4
"""Periodic (resume-only) checkpoints taken after one training step at most; the rest wait."""


def default_backend() -> str:
    """"process" when that backend is installed (fits off the server's process), else "inline"."""
    return "process" if "process" in BACKENDS else "inline"


@dataclass
class Settings:
    """How the service trains; set by `colaft serve`'s options."""

    data_dir: Path
    backend: str = "inline"
    backend_options: dict = field(default_factory=dict)
    """Keyword arguments of the backend (workers, address)."""
    checkpoint_every: int = 20
    """Save each running job's state every so many of its steps (and at every epoch end)."""
    num_labels: int = 2
    """Classification heads have this many outputs; a job may use up to that many labels."""
    max_inference_batch: int = 32
    max_loaded_adapters: int = 8
    """Finished personal jobs whose adapters stay loaded for inference; the least recently
    used one past this is unloaded, and loaded from disk again when next asked for."""
    client_timeout: float = 30.0
    """A client-fit job whose client has not pulled for this many seconds waits (its rows
    leave the batches) until the client is back."""


class Engine(JobLifecycle):
    """The base model `model_id` (task "clm" or "sc"), its ColaModel, Trainer and training thread."""

    def __init__(self, model_id: str, source: str, task: str, db: Database, settings: Settings):
        self.id, self.source, self.db, self.settings = model_id, source, db, settings
        self.task = get_task(task)
        self.task_name = task
        # a classification head of num_labels outputs; every job numbers its labels from 0
        labels = [{"label": i} for i in range(settings.num_labels)] if task == "sc" else []
        self.base = self.task.load(source, labels, seed=0)
        self.base.eval()
        self.cola: ColaModel | None = None
        self.trainer: Trainer | None = None
        self.runs: dict[str, Run] = {}
        self.channels: dict[str, Channel] = {}  # client-fit jobs (colaft.serve.fits), read by the API too
        self.modes: dict[str, str] = {}  # job id -> mode, for every job whose adapters are loaded
        # finished personal jobs whose adapters are loaded, least recently used first
        self.finished: OrderedDict[str, None] = OrderedDict()
        self._labels: dict[str, list] = {}  # classification job id -> its labels (index = head output)
        self._due: OrderedDict[str, None] = OrderedDict()  # jobs whose periodic checkpoint waits its turn
        self._admits: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"colaft-engine-{model_id}", daemon=True)
        self.ready = threading.Event()
        self.steps = 0  # training steps taken since the server started (each mode's batch counts one)
        self.rows = 0  # rows trained in them
        self.step_seconds = 0.0  # time inside Trainer.step

    # ------------------------------------------------------------- called from the API's threads
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the current step, checkpoint every running job, stop the backend."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def admit(self, job_id: str) -> None:
        self._admits.put(job_id)
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._cancels.put(job_id)
        self._wake.set()

    def infer(self, request) -> Future:
        """Queue an inference request (colaft.serve.inference.Request); its future holds the answer."""
        request.future = Future()
        self._requests.put(request)
        self._wake.set()
        return request.future

    # ------------------------------------------------------------- the thread
    def _main(self) -> None:
        try:
            self._startup()
        except Exception:
            log.exception("%s: could not restore the jobs of this model", self.id)
        self.ready.set()
        while not self._stopping:
            try:
                self._take_cancels()
                self._take_admits()
                self._serve()
                self._client_jobs()
                if self.runs and self._tick():
                    continue
            except Exception:  # e.g. the database went away for a moment: keep serving
                log.exception("%s: the engine's loop failed; going on", self.id)
            self._wake.wait(0.5 if self.runs else 1.0)  # a client's push or pull wakes it sooner
            self._wake.clear()
        self._shutdown()

    def _startup(self) -> None:
        """Load the adapters of the collaborative finished jobs (their deltas make the mean) and of
        the most recently finished personal ones; queue unfinished jobs (running ones resume
        from a checkpoint). Other finished jobs load when a request first asks for them."""
        with self.db.read() as s:
            jobs = list(s.scalars(select(Job).where(Job.model == self.id).order_by(Job.created_at)))
        done = sorted((j for j in jobs if j.status == "succeeded"), key=lambda j: (j.finished_at or 0, j.created_at))
        personal = [j for j in done if j.options["mode"] != "collaborative"]
        warm = {j.id for j in personal[len(personal) - self.settings.max_loaded_adapters:]}
        for job in done:
            if job.options["mode"] == "collaborative" or job.id in warm:
                try:
                    self._load_finished(job.id, job.options["mode"])
                except Exception:
                    log.exception("%s: adapters of %s could not be loaded", self.id, job.id)
        for job in jobs:
            if job.status in ACTIVE:
                self._admits.put(job.id)

    def _shutdown(self) -> None:
        for run in list(self.runs.values()):
            if run.client and not self.channels[run.job_id].idle():
                continue  # its owner's state is with its client: resume from the last checkpoint
            try:
                self._checkpoint(run, listed=False)
            except Exception:
                log.exception("%s: could not checkpoint %s at shutdown", self.id, run.job_id)
        if self.trainer is not None:
            self.trainer.close()

    # ------------------------------------------------------------- users of the ColaModel
    def _add_user(self, job_id: str, config: ColaConfig, fit: dict) -> None:
        if self.cola is None:
            self.cola = ColaModel(self.base, config, user=job_id)
            self.trainer = Trainer(self.cola, backend=self._backend(), **fit)
        else:
            self.trainer.add_user(job_id, config, **fit)

    def _add_client(self, job_id: str, config: ColaConfig, fit: dict):
        """A client-fit job's user: adapters on the server, its owner handed to the client
        (returned, fresh); its packets go to its channel, never to the backend."""
        def sink(packets, job_id=job_id):
            self.channels[job_id].offer("push", packets)
        if self.cola is None:
            self.cola = ColaModel(self.base, config, user=job_id)
            self.trainer = Trainer(self.cola, backend=self._backend(), **fit)
            return self.trainer.add_remote_user(job_id, sink=sink, **fit)
        return self.trainer.add_remote_user(job_id, config, sink, **fit)

    def _load_finished(self, job_id: str, mode: str) -> None:
        folder = self.settings.data_dir / "jobs" / job_id / "adapter"
        if self.cola is None:
            self.cola = ColaModel.from_pretrained(self.base, folder, user=job_id)
            self.trainer = Trainer(self.cola, backend=self._backend())
        elif job_id not in self.cola.users:
            self.cola.load_adapters(folder, user=job_id)
        self.modes[job_id] = mode
        self.used(job_id)

    def used(self, job_id: str) -> None:
        """A finished job's adapters were just loaded or asked for: the last to be unloaded."""
        if job_id not in self.runs and self.modes.get(job_id) != "collaborative":
            self.finished[job_id] = None
            self.finished.move_to_end(job_id)

    def unload_unused(self) -> None:
        """Unload the least recently used finished personal jobs' adapters past max_loaded_adapters.
        Called between batches, never inside one, so a batch may briefly hold more."""
        while len(self.finished) > self.settings.max_loaded_adapters:
            job_id, _ = self.finished.popitem(last=False)
            self._remove_user(job_id)
            log.info("%s: unloaded the adapters of %s (least recently used)", self.id, job_id)

    def _backend(self):
        return make_backend(self.settings.backend, **self.settings.backend_options)

    def _remove_user(self, job_id: str) -> None:
        self.finished.pop(job_id, None)
        self.modes.pop(job_id, None)
        self._labels.pop(job_id, None)
        if self.cola is not None and job_id in self.cola.users:
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
    def _tick(self) -> bool:
        """One step per mode over the jobs that may step; False when none may (all wait for clients)."""
        stepped = False
        for mode in ("personal", "collaborative"):
            runs = [r for r in self.runs.values() if r.mode == mode and self._may_step(r)]
            if runs:
                stepped = True
                try:
                    self._step(runs, mode)
                except Exception as e:
                    log.exception("%s: a step of %d jobs failed", self.id, len(runs))
                    for r in runs:
                        self._fail(r.job_id, "internal_error", f"training stopped: {type(e).__name__}")
        return stepped

    def _step(self, runs: list[Run], mode: str) -> None:
        rows = {r.job_id: r.next_rows() for r in runs}
        batch = self.task.collate([f for r in runs for f in rows[r.job_id]])
        self.set_mode(mode)
        start = time.perf_counter()
        self.trainer.step(batch)
        seconds = time.perf_counter() - start
        losses = self.trainer.last_user_losses
        self.steps += 1
        self.rows += len(batch["users"])
        self.step_seconds += seconds
        log.info("%s: step %d: %d jobs, %d rows, %s mode, %.3f s", self.id, self.steps, len(runs),
                 len(batch["users"]), mode, seconds)
        with self.db.session() as s:  # jobs cancelled during the step get no more events
            live = set(s.scalars(select(Job.id).where(Job.id.in_(list(rows)), Job.status == "running")
                                 .with_for_update()))
            for r in runs:
                if r.job_id not in live:
                    continue
                r.step += 1
                r.tokens += sum(len(f["input_ids"]) for f in rows[r.job_id])
                loss = losses[r.job_id]
                r.losses.append(loss)
                self.db.add_event(s, r.job_id, f"Step {r.step}/{r.total_steps}: training loss={loss:.4f}",
                                  type="metrics", data={"step": r.step, "total_steps": r.total_steps,
                                                        "train_loss": loss,
                                                        "epoch": (r.step - 1) // r.steps_per_epoch + 1})
        for r in runs:
            if r.job_id not in live:
                self._drop(r.job_id)
            elif not math.isfinite(r.losses[-1]):
                self._fail(r.job_id, "training_diverged", f"the training loss is {r.losses[-1]} at step {r.step}: "
                           "lower learning_rate_multiplier", "hyperparameters.learning_rate_multiplier")
            elif r.step == r.total_steps:
                self._finish(r)
            elif r.step % r.steps_per_epoch == 0 and r.step >= r.total_steps - (LISTED - 1) * r.steps_per_epoch:
                self._checkpoint(r, listed=True)
            elif r.step % self.settings.checkpoint_every == 0:
                self._due[r.job_id] = None
            if r.step % r.steps_per_epoch == 0:
                r.losses = []  # the checkpoints' train_loss is the mean over their epoch
        self._periodic_checkpoints()

    def _periodic_checkpoints(self) -> None:
        """At most CHECKPOINTS_PER_STEP of the due periodic checkpoints after a step, oldest first:
        jobs created together fall due together (64 at once stopped training for ~2 s); the
        others wait a step or more, and are taken at the step they have reached then."""
        for _ in range(min(CHECKPOINTS_PER_STEP, len(self._due))):
            job_id, _ = self._due.popitem(last=False)
            run = self.runs.get(job_id)
            if run is not None and run.saved_step != run.step:
                self._checkpoint(run, listed=False)

    # ------------------------------------------------------------- inference
    def _serve(self) -> None:
        from colaft.serve.inference import serve_requests
        requests = []
        while len(requests) < self.settings.max_inference_batch:
            try:
                requests.append(self._requests.get_nowait())
            except queue.Empty:
                break
        if requests:
            serve_requests(self, requests)
            self.unload_unused()

    def job_labels(self, job_id: str) -> list:
        """A classification job's labels, in the order of the head's outputs."""
        if job_id not in self._labels:
            with self.db.read() as s:  # kept on the job: its training file may be deleted since
                self._labels[job_id] = list(s.get(Job, job_id).labels or [])
        return self._labels[job_id]

    def ensure_adapters(self, job_id: str, mode: str) -> None:
        """A finished job's adapters in the ColaModel (loaded from disk after a restart or an unload)."""
        if self.cola is None or job_id not in self.cola.users:
            self._load_finished(job_id, mode)
        else:
            self.used(job_id)

