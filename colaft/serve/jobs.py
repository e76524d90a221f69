"""A job's life on its engine: admitted, checkpointed, finished, failed or cancelled.

    queued job -> admit: the task encodes the job's file (rows tagged with the job id as
                  user); Trainer.add_user(job, its ColaConfig, its FitConfig); a job that
                  was running when the server died resumes from its newest checkpoint
    every step -> (colaft.serve.scheduler forms the batch) events; a checkpoint every
                  `checkpoint_every` steps and at the ends of the last LISTED epochs
    last step  -> the job's adapters are saved (colaft and PEFT forms), its results file
                  written, and it succeeds; its adapters stay for inference until evicted

JobLifecycle is a mixin of Engine (colaft.serve.scheduler): these methods run on the
engine's thread and use its database, settings, task, trainer and `runs`. They are kept
apart from the batch forming because they are what the database and the disk see of a job.
"""
from __future__ import annotations

import logging
import math
import queue
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy import select, update

from colaft.config import ColaConfig
from colaft.io.files import write_atomic
from colaft.io.state import load_owner, read_owner, save_owner
from colaft.serve import files as datafiles
from colaft.serve.db import ACTIVE, Checkpoint, Event, File, Job, new_id, now
from colaft.serve.fits import Channel, client_info
from colaft.users import Update

log = logging.getLogger("colaft.serve")
LISTED = 3
"""Checkpoints the API shows per job: the ends of its last epochs."""


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
    # client-fit jobs (colaft.serve.fits): the engine never waits for their fits
    client: bool = False
    due: tuple[bool, dict] | None = None  # a checkpoint (listed, metrics) waiting for the fits in flight
    finishing: bool = False  # the last step is done; the last updates are awaited
    waiting: bool = False  # the client is gone; the job's rows left the batches
    seen_client: bool = False  # a client has connected since the job was admitted

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


class JobLifecycle:
    """Admitting, cancelling, failing, checkpointing and finishing jobs (a mixin of Engine)."""
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
        run.client = options.get("fit", "server") == "client"
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation comes from the job's seed alone
            torch.manual_seed(job.seed)
            if run.client:
                state = self._add_client(job_id, config, fit).state()
            else:
                self._add_user(job_id, config, fit)
        self.modes[job_id] = run.mode
        if checkpoint is not None and (self.settings.data_dir / checkpoint.path).is_dir():
            if run.client:
                state = read_owner(self.trainer, job_id, self.settings.data_dir / checkpoint.path)
            else:
                load_owner(self.trainer, job_id, self.settings.data_dir / checkpoint.path)
            run.step = run.saved_step = checkpoint.step
            run.tokens = checkpoint.metrics.get("trained_tokens", 0)
        if run.client:
            self.channels[job_id] = Channel(job_id, options["interval"], options.get("staleness", 0), state, run.step,
                                            client_info(self.cola, self.trainer, job_id), self._wake.set)
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
            if started and run.client:
                self.db.add_event(s, job_id, f"Its fits run on your device: run `colaft client --job {job_id}` "
                                  "(the job waits while no client is there)", data={"fit_client": "expected"})
        if not started:  # cancelled meanwhile
            self._drop(job_id)
            return
        log.info("%s: job %s running (%d steps)", self.id, job_id, run.total_steps)
        if run.step >= run.total_steps:  # killed after its last checkpoint, before it was marked done
            self._finish(run)

    # ------------------------------------------------------------- client-fit jobs
    def _may_step(self, run: Run) -> bool:
        """A server-fit job always; a client-fit job while its fits in flight are within its
        staleness bound, its client was seen lately and no checkpoint waits for its fits."""
        if not run.client:
            return True
        channel = self.channels[run.job_id]
        if run.finishing or not channel.runnable(self.settings.client_timeout):
            return False
        return run.due is None or channel.pending_steps > 0  # at a fit boundary a due checkpoint comes first

    def _client_jobs(self) -> None:
        """Between steps: apply the updates clients brought, take due checkpoints, end jobs whose
        last update came, and say in the events when a job waits for its client or resumes."""
        for job_id, channel in list(self.channels.items()):
            run = self.runs.get(job_id)
            if run is None:
                continue
            for accepted in channel.take_updates():
                self.trainer.apply_update(Update(job_id, accepted.version, accepted.states))
            gone = channel.gone(self.settings.client_timeout)
            if gone != run.waiting or (channel.connected and not run.seen_client):
                with self.db.session() as s:
                    if gone and not run.waiting:
                        self.db.add_event(s, job_id, f"Waiting for the fit client: none has pulled for "
                                          f"{self.settings.client_timeout:g} s; the job's steps pause while "
                                          "other jobs go on", level="warn", data={"fit_client": "waiting"})
                    elif not gone and channel.connected and (run.waiting or not run.seen_client):
                        text = "The fit client is back" if run.seen_client else "The fit client connected"
                        self.db.add_event(s, job_id, text + (": training resumes" if run.waiting else ""),
                                          data={"fit_client": "connected"})
                run.waiting = gone
                run.seen_client = run.seen_client or channel.connected
            if run.due is not None and channel.idle():
                self._checkpoint(run, *run.due)
            if run.finishing and channel.idle():
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

    def _drop(self, job_id: str, status: str = "cancelled") -> None:
        self.runs.pop(job_id, None)
        channel = self.channels.pop(job_id, None)
        if channel is not None:
            channel.close(status)
        self._remove_user(job_id)

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self._drop(job_id, "failed")
        with self.db.session() as s:
            failed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE)).values(
                status="failed", finished_at=now(), error={"code": code, "message": message, "param": param})).rowcount
            if failed:
                self.db.add_event(s, job_id, f"Fine-tuning job failed: {message}", level="error")
        log.warning("%s: job %s failed: %s", self.id, job_id, code)

    def _checkpoint(self, run: Run, listed: bool, metrics: dict | None = None) -> None:
        """Save the job's adapters and owner. `listed`: the end of one of the last LISTED epochs,
        shown by the API (as OpenAI does); the others only let a restarted server resume, and
        only the newest of them is kept. A client-fit job's checkpoint waits until no fit of
        it is in flight (`_client_jobs` takes it then): the server holds its owner's state
        only as of the last update."""
        metrics = metrics or {"train_loss": sum(run.losses) / len(run.losses) if run.losses else None,
                              "trained_tokens": run.tokens}
        channel = self.channels.get(run.job_id)
        if channel is not None and not channel.idle():
            run.due = (listed or (run.due is not None and run.due[0]), metrics)
            return
        run.due = None
        relative = Path("jobs") / run.job_id / "checkpoints" / f"step-{run.step:07d}"
        save_owner(self.trainer, run.job_id, self.settings.data_dir / relative,
                   state=channel.state if channel is not None else None)
        run.saved_step = run.step
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
        channel = self.channels.get(job_id)
        if channel is None:
            self.trainer.flush([job_id])
        else:  # the client fits the partial interval; the job ends once every update is applied
            if not run.finishing:
                run.finishing = True
                if channel.pending_steps:
                    channel.offer("flush", [])
            if not channel.idle():
                return
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
                self._drop(job_id)
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
        self.runs.pop(job_id, None)
        if channel is not None:
            self.channels.pop(job_id, None)
            channel.close("succeeded")
        self.used(job_id)  # its adapters stay in the ColaModel for inference, until unused
        self.unload_unused()
        log.info("%s: job %s succeeded", self.id, job_id)

    def _evaluate(self, run: Run) -> dict:
        self.set_mode(run.mode)
        size = 2 * run.batch_size
        batches = [self.task.collate(run.eval_features[i:i + size]) for i in range(0, len(run.eval_features), size)]
        metrics = self.task.evaluate(self.cola, batches)
        return {k: v for k, v in metrics.items() if k != "users"}

    def _results_file(self, s, job: Job, run: Run) -> str:
        """A CSV of the job's step losses, as a file of its owner (purpose fine-tune-results)."""
        events = s.scalars(select(Event).where(Event.job_id == job.id, Event.type == "metrics")
                           .order_by(Event.seq))
        lines = ["step,train_loss"] + [f"{e.data['step']},{e.data['train_loss']}" for e in events
                                       if e.data and "train_loss" in e.data]
        data = ("\n".join(lines) + "\n").encode()
        file_id = new_id("file")
        write_atomic(self.settings.data_dir / "files" / file_id, data)
        s.add(File(id=file_id, user_id=job.user_id, filename=f"{job.id}-results.csv", purpose="fine-tune-results",
                   bytes=len(data), format="results", rows=len(lines) - 1, created_at=now()))
        return file_id
