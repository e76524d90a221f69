"""Training as a service: one Engine (a thread) per base model, every job a user of its ColaModel.

    queued job -> admit: the task encodes the job's file (rows tagged with the job id as
                  user); Trainer.add_user(job, its ColaConfig, its FitConfig)
    each tick  -> every running job's next `batch_size` rows, all jobs' rows collated into
                  ONE batch -> trainer.step(batch): one forward and backward for all jobs,
                  each job's fit on its own rows (on the configured backend)
                  (collaborative jobs form a second batch, in collaborative mode)
               -> per-job loss -> events; checkpoints (save_owner); at its last step the
                  job's adapters are saved, exported and it succeeds
    between ticks: inference requests, batched across adapters (colaft.serve.inference)

Why a tick and not colaft.loop.train: that loop runs a fixed DataLoader for a fixed set of
users and steps. Here jobs arrive, finish and are cancelled between any two steps, and the
thread also answers inference and writes events and checkpoints; so the tick only forms the
batch and calls the library's Trainer.step (same encode, collate, step and loss
normalisation: the sum over jobs of each job's mean loss, so a job's updates do not depend on
which other jobs share its batches).

The HTTP event loop never waits for this thread: the API only writes the database and
hands job ids, cancellations and inference requests over through thread-safe queues.
"""
from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy import select, update

from colaft import ColaConfig, ColaModel, Trainer
from colaft.backends import BACKENDS, make_backend
from colaft.checkpoint import load_owner, save_owner
from colaft.serve import files as datafiles
from colaft.serve.db import ACTIVE, Checkpoint, Database, File, Job, new_id, now
from colaft.tasks import get_task

log = logging.getLogger("colaft.serve")
LISTED = 3
"""Checkpoints the API shows per job: the ends of its last epochs."""


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


@dataclass
class Run:
    """A running job, in memory."""

    job_id: str
    mode: str
    features: list[dict]  # encoded training rows, each with "user" = job id
    eval_features: list[dict]
    batch_size: int
    n_epochs: int
    seed: int
    step: int = 0
    tokens: int = 0
    saved_step: int = -1  # the step of the newest checkpoint
    losses: list[float] = field(default_factory=list)  # this epoch's step losses

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch

    def next_rows(self) -> list[dict]:
        """The rows of this job's next step: epoch by epoch, each shuffled by (seed, epoch)."""
        epoch, i = divmod(self.step, self.steps_per_epoch)
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.features[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]


class Engine:
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
        self.modes: dict[str, str] = {}  # job id -> mode, for every job whose adapters are loaded
        self._labels: dict[str, list] = {}  # classification job id -> its labels (index = head output)
        self._admits: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"colaft-engine-{model_id}", daemon=True)
        self.ready = threading.Event()
        self.steps = 0

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
                if self.runs:
                    self._tick()
                    continue
            except Exception:  # e.g. the database went away for a moment: keep serving
                log.exception("%s: the engine's loop failed; going on", self.id)
            self._wake.wait(1.0)
            self._wake.clear()
        self._shutdown()

    def _startup(self) -> None:
        """Load the adapters of finished jobs; queue unfinished ones (running ones resume from a checkpoint)."""
        with self.db.read() as s:
            jobs = list(s.scalars(select(Job).where(Job.model == self.id).order_by(Job.created_at)))
        for job in jobs:
            if job.status == "succeeded":
                try:
                    self._load_finished(job.id, job.options["mode"])
                except Exception:
                    log.exception("%s: adapters of %s could not be loaded", self.id, job.id)
            elif job.status in ACTIVE:
                self._admits.put(job.id)

    def _shutdown(self) -> None:
        for run in list(self.runs.values()):
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
            self.trainer.add_user(job_id, config, **_fit_config_names(fit))

    def _load_finished(self, job_id: str, mode: str) -> None:
        folder = self.settings.data_dir / "jobs" / job_id / "adapter"
        if self.cola is None:
            self.cola = ColaModel.from_pretrained(self.base, folder, user=job_id)
            self.trainer = Trainer(self.cola, backend=self._backend())
        elif job_id not in self.cola.users:
            self.cola.load_adapters(folder, user=job_id)
        self.modes[job_id] = mode

    def _backend(self):
        return make_backend(self.settings.backend, **self.settings.backend_options)

    def _remove_user(self, job_id: str) -> None:
        self.modes.pop(job_id, None)
        self._labels.pop(job_id, None)
        if self.cola is not None and job_id in self.cola.users:
            self.trainer.remove_user(job_id)

    def set_mode(self, mode: str) -> None:
        """personal, or collaborative: the mean delta of the collaborative jobs (weight 0 for the others)."""
        if self.cola is None:
            return
        if mode == "collaborative":
            self.cola.set_mode("collaborative", {u: float(self.modes.get(u) == "collaborative") for u in self.cola.users})
        else:
            self.cola.set_mode("personal")

    # ------------------------------------------------------------- jobs
    def _take_admits(self) -> None:
        while True:
            try:
                job_id = self._admits.get_nowait()
            except queue.Empty:
                return
            try:
                self._admit(job_id)
            except Exception as e:
                log.exception("%s: job %s could not start", self.id, job_id)
                self._fail(job_id, "internal_error", f"the job could not start: {type(e).__name__}")

    def _admit(self, job_id: str) -> None:
        with self.db.read() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in ACTIVE or job_id in self.runs:
                return
            train_file = s.get(File, job.training_file)
            valid_file = s.get(File, job.validation_file) if job.validation_file else None
            resume = job.status == "running"
            checkpoint = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.step.desc()).limit(1)) if resume else None
        options, hyper = job.options, job.hyperparameters
        try:
            features = self._encode(job_id, train_file, options["max_length"])
            eval_features = self._encode(job_id, valid_file, options["max_length"]) if valid_file else []
        except (ValueError, OSError) as e:
            self._fail(job_id, "invalid_training_file", str(e), "training_file")
            return
        run = Run(job_id, options["mode"], features, eval_features, hyper["batch_size"], hyper["n_epochs"], job.seed)
        config = ColaConfig(target_modules=options["targets"], adapter=options["adapter"], rank=options["rank"],
                            alpha=options["alpha"], hidden=options["hidden"])
        fit = {"optimizer": "adamw", "lr": self.task.recipe.lr * hyper["learning_rate_multiplier"],
               "scheduler": "linear", "total_steps": run.total_steps, "interval": options["interval"]}
        if options["fit_device"]:
            fit["fit_device"] = options["fit_device"]
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation comes from the job's seed alone
            torch.manual_seed(job.seed)
            self._add_user(job_id, config, fit)
        self.modes[job_id] = run.mode
        if checkpoint is not None and (self.settings.data_dir / checkpoint.path).is_dir():
            load_owner(self.trainer, job_id, self.settings.data_dir / checkpoint.path)
            run.step = run.saved_step = checkpoint.step
            run.tokens = checkpoint.metrics.get("trained_tokens", 0)
        self.runs[job_id] = run
        with self.db.session() as s:
            started = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE))
                                .values(status="running", total_steps=run.total_steps)).rowcount
            if started and resume:
                self.db.add_event(s, job_id, f"Resumed from the checkpoint at step {run.step} after a restart"
                                  if run.step else "Restarted from step 0 after a restart (no checkpoint yet)")
            elif started:
                self.db.add_event(s, job_id, f"Fine-tuning job started: {run.total_steps} steps "
                                  f"({run.n_epochs} epochs of {run.steps_per_epoch})")
        if not started:  # cancelled meanwhile
            self._drop(job_id)
            return
        log.info("%s: job %s running (%d steps)", self.id, job_id, run.total_steps)
        if run.step >= run.total_steps:  # killed after its last checkpoint, before it was marked done
            self._finish(run)

    def _encode(self, job_id: str, file: File, max_length: int) -> list[dict]:
        path = self.settings.data_dir / "files" / file.id
        fmt, records, _ = datafiles.parse(path.read_bytes())
        records = datafiles.task_records(fmt, records, file.labels)
        return [{**f, "user": job_id} for f in self.task.encode(records, max_length)]

    def _take_cancels(self) -> None:
        while True:
            try:
                job_id = self._cancels.get_nowait()
            except queue.Empty:
                return
            if job_id in self.runs:
                self._drop(job_id)
                log.info("%s: job %s cancelled", self.id, job_id)

    def _drop(self, job_id: str) -> None:
        self.runs.pop(job_id, None)
        self._remove_user(job_id)

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self._drop(job_id)
        with self.db.session() as s:
            failed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE)).values(
                status="failed", finished_at=now(), error={"code": code, "message": message, "param": param})).rowcount
            if failed:
                self.db.add_event(s, job_id, f"Fine-tuning job failed: {message}", level="error")
        log.warning("%s: job %s failed: %s", self.id, job_id, code)

    # ------------------------------------------------------------- training
    def _tick(self) -> None:
        for mode in ("personal", "collaborative"):
            runs = [r for r in self.runs.values() if r.mode == mode]
            if runs:
                try:
                    self._step(runs, mode)
                except Exception as e:
                    log.exception("%s: a step of %d jobs failed", self.id, len(runs))
                    for r in runs:
                        self._fail(r.job_id, "internal_error", f"training stopped: {type(e).__name__}")

    def _step(self, runs: list[Run], mode: str) -> None:
        rows = {r.job_id: r.next_rows() for r in runs}
        batch = self.task.collate([f for r in runs for f in rows[r.job_id]])
        self.set_mode(mode)
        start = time.perf_counter()
        self.trainer.step(batch)
        seconds = time.perf_counter() - start
        losses = self.trainer.last_user_losses
        self.steps += 1
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
                                                        "train_loss": loss, "epoch": (r.step - 1) // r.steps_per_epoch + 1})
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
                self._checkpoint(r, listed=False)
            if r.step % r.steps_per_epoch == 0:
                r.losses = []  # the checkpoints' train_loss is the mean over their epoch

    def _checkpoint(self, run: Run, listed: bool) -> None:
        """Save the job's adapters and owner. `listed`: the end of one of the last LISTED epochs,
        shown by the API (as OpenAI does); the others only let a restarted server resume, and
        only the newest of them is kept."""
        relative = Path("jobs") / run.job_id / "checkpoints" / f"step-{run.step:07d}"
        save_owner(self.trainer, run.job_id, self.settings.data_dir / relative)
        run.saved_step = run.step
        metrics = {"train_loss": sum(run.losses) / len(run.losses) if run.losses else None,
                   "trained_tokens": run.tokens}
        with self.db.session() as s:
            old = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == run.job_id, Checkpoint.listed == 0,
                                                          Checkpoint.step < run.step)))
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=run.job_id, step=run.step, metrics=metrics,
                             path=str(relative), listed=int(listed), created_at=now()))
            for c in old:
                s.delete(c)
            if listed:
                self.db.add_event(s, run.job_id, f"Checkpoint created at step {run.step}")
        for c in old:
            shutil.rmtree(self.settings.data_dir / c.path, ignore_errors=True)

    def _finish(self, run: Run) -> None:
        job_id = run.job_id
        self.trainer.flush([job_id])
        folder = self.settings.data_dir / "jobs" / job_id
        metrics = self._evaluate(run) if run.eval_features else {}
        self.cola.save_pretrained(folder / "adapter", user=job_id)
        try:
            self.cola.export_peft(folder / "peft", user=job_id)
        except ValueError as e:  # e.g. mlp adapters: PEFT's LoRA cannot hold them
            log.info("%s: job %s has no PEFT form: %s", self.id, job_id, e)
        if run.saved_step != run.step:
            self._checkpoint(run, listed=True)
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)  # a cancel waits for this transaction
            if job.status != "running":  # cancelled during the last step
                self.runs.pop(job_id, None)
                return
            results = self._results_file(s, job, run)
            job.status, job.finished_at = "succeeded", now()
            job.fine_tuned_model = f"ft:{self.id}:{job_id}"
            job.trained_tokens = run.tokens
            job.result_files = [results]
            if metrics:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                self.db.add_event(s, job_id, f"Validation: {shown}", type="metrics",
                                  data={"step": run.step, **{f"valid_{k}": v for k, v in metrics.items()
                                                             if isinstance(v, float)}})
            self.db.add_event(s, job_id, f"New fine-tuned model created: {job.fine_tuned_model}")
            self.db.add_event(s, job_id, "The job has successfully completed")
        self.runs.pop(job_id, None)  # its adapters stay in the ColaModel, for inference
        log.info("%s: job %s succeeded", self.id, job_id)

    def _evaluate(self, run: Run) -> dict:
        self.set_mode(run.mode)
        size = 2 * run.batch_size
        batches = [self.task.collate(run.eval_features[i:i + size]) for i in range(0, len(run.eval_features), size)]
        metrics = self.task.evaluate(self.cola, batches)
        return {k: v for k, v in metrics.items() if k != "users"}

    def _results_file(self, s, job: Job, run: Run) -> str:
        """A CSV of the job's step losses, as a file of its owner (purpose fine-tune-results)."""
        from colaft.serve.db import Event
        events = s.scalars(select(Event).where(Event.job_id == job.id, Event.type == "metrics")
                           .order_by(Event.seq))
        lines = ["step,train_loss"] + [f"{e.data['step']},{e.data['train_loss']}" for e in events
                                       if e.data and "train_loss" in e.data]
        data = ("\n".join(lines) + "\n").encode()
        file_id = new_id("file")
        datafiles.write_atomic(self.settings.data_dir / "files" / file_id, data)
        s.add(File(id=file_id, user_id=job.user_id, filename=f"{job.id}-results.csv", purpose="fine-tune-results",
                   bytes=len(data), format="results", rows=len(lines) - 1, created_at=now()))
        return file_id

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

    def job_labels(self, job_id: str) -> list:
        """A classification job's labels, in the order of the head's outputs."""
        if job_id not in self._labels:
            with self.db.read() as s:  # kept on the job: its training file may be deleted since
                self._labels[job_id] = list(s.get(Job, job_id).labels or [])
        return self._labels[job_id]

    def ensure_adapters(self, job_id: str, mode: str) -> None:
        """A finished job's adapters in the ColaModel (loaded from disk after a restart)."""
        if self.cola is None or job_id not in self.cola.users:
            self._load_finished(job_id, mode)


def _fit_config_names(fit: dict) -> dict:
    """Trainer's constructor says fit_device where FitConfig says device."""
    out = dict(fit)
    if "fit_device" in out:
        out["device"] = out.pop("fit_device")
    return out
