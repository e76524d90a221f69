"""What the database and the disk hold of one base model's jobs: rows, events, checkpoints, results.

    <data-dir>/files/<file id>                       uploaded data and results files
    <data-dir>/jobs/<job id>/checkpoints/step-N/     the job's adapters and owner at step N
    <data-dir>/jobs/<job id>/adapter/, peft/         its adapters once it succeeded

Every write is one transaction. A job's status moves only from an active one: a job the API
cancelled meanwhile stays cancelled, and the engine (colaft.serve.scheduler) is told so by the
return value and drops it. Only the newest unlisted checkpoint is kept, and its folder is
removed after the row that points at it.

Fenced: with an `owner` (this process's id in colaft.serve.leases), a write about a job is
made only while the job's lease is this process's, checked in the write's own transaction on
the job's locked row; a job another process took over is answered as one cancelled meanwhile
(the engine drops it, writing nothing).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update

from colaft.io.files import write_atomic
from colaft.serve import files as datafiles
from colaft.serve.db import ACTIVE, Checkpoint, Database, Event, File, Job, new_id, now
from colaft.serve.inference import ModelGone
from colaft.serve.jobs import Run

TRAINING = ("running", "paused")
"""Statuses of a job the engine holds in memory (a paused job's run waits there for its resume)."""


@dataclass
class Admission:
    """What a queued job, or one that was running when the server stopped, starts from."""

    job: Job
    train: File
    valid: File | None
    resumed: bool  # it was running or paused: it goes on from `checkpoint` (None: from step 0)
    checkpoint: Checkpoint | None  # its newest checkpoint whose folder is there


class JobStore:
    """The jobs of the base model `model_id` in `db` and under `data_dir`; `owner`: the lease
    owner whose writes alone are made (None: no fencing)."""

    def __init__(self, model_id: str, db: Database, data_dir: Path, owner: str | None = None):
        self.model_id, self.db, self.data_dir, self.owner = model_id, db, data_dir, owner

    def _mine(self, job: Job | None) -> bool:
        return job is not None and (self.owner is None or job.lease_owner == self.owner)

    def owns(self, job_id: str) -> bool:
        """The job's lease is still this process's (a write about it may go on). Unfenced (one
        process on an embedded database), every job is: no query on the step's path."""
        if self.owner is None:
            return True
        with self.db.read() as s:
            return self._mine(s.get(Job, job_id))

    # ------------------------------------------------------------- reading
    def jobs(self) -> list[Job]:
        """Every job of this model, oldest first."""
        with self.db.read() as s:
            return list(s.scalars(select(Job).where(Job.model == self.model_id).order_by(Job.created_at)))

    def job(self, job_id: str) -> Job:
        with self.db.read() as s:
            return s.get(Job, job_id)

    def statuses(self, job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
        """Each job's status and lease owner, in one query."""
        with self.db.read() as s:
            return {i: (st, o) for i, st, o in s.execute(select(Job.id, Job.status, Job.lease_owner)
                                                          .where(Job.id.in_(list(job_ids))))}

    def changed_models(self, since: int) -> list[Job]:
        """This model's jobs that finished or whose model was deleted at `since` or later."""
        with self.db.read() as s:
            return list(s.scalars(select(Job).where(Job.model == self.model_id, or_(
                Job.finished_at >= since, Job.model_deleted_at >= since))))

    def admission(self, job_id: str) -> Admission | None:
        """The job and its files, or None when it is no longer active."""
        with self.db.read() as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in ACTIVE:
                return None
            train = s.get(File, job.training_file)
            valid = s.get(File, job.validation_file) if job.validation_file else None
            resumed = job.status in TRAINING
            checkpoint = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.step.desc()).limit(1)) if resumed else None
        if checkpoint is not None and not self.path(checkpoint).is_dir():
            checkpoint = None
        return Admission(job, train, valid, resumed, checkpoint)

    def adapters(self, user_id: str) -> tuple[Job, Path, str]:
        """What answers as the host's user `user_id`: a finished job (its id) or one of its listed
        checkpoints (the checkpoint's id); its job, the folder of its adapters, and the mode they
        answer in (a checkpoint's own adapters: personal)."""
        with self.db.read() as s:
            job = s.get(Job, user_id)
            if job is not None:
                if job.model_deleted_at is not None:
                    raise ModelGone(f"the model of {user_id} was deleted")
                return job, self.job_folder(job.id) / "adapter", job.options["mode"]
            checkpoint = s.scalar(select(Checkpoint).where(Checkpoint.id == user_id))
            if checkpoint is None:  # deleted (or never listed)
                raise ModelGone(f"no model answers as {user_id}")
            return s.get(Job, checkpoint.job_id), self.path(checkpoint), "personal"

    def records(self, file: File) -> list[dict]:
        """A data file's records in the task's form (raises ValueError or OSError if unreadable)."""
        fmt, records, _ = datafiles.parse((self.data_dir / "files" / file.id).read_bytes(), file.filename)
        return datafiles.task_records(fmt, records, file.labels)

    def path(self, checkpoint: Checkpoint) -> Path:
        return self.data_dir / checkpoint.path

    def job_folder(self, job_id: str) -> Path:
        """Where a finished job's adapters are (adapter/, and peft/ when it has that form)."""
        return self.data_dir / "jobs" / job_id

    def checkpoint_folder(self, job_id: str, step: int) -> Path:
        return self.job_folder(job_id) / "checkpoints" / f"step-{step:07d}"

    # ------------------------------------------------------------- writing
    def start(self, run: Run, resumed: bool) -> str | None:
        """The job runs (with the events that say how), or stays paused (paused before it started,
        or before a restart): its status then; None when it was cancelled meanwhile."""
        job_id = run.job_id
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)  # a pause or cancel waits for this transaction
            if job is None or job.status not in ACTIVE or not self._mine(job):
                return None
            job.total_steps = run.total_steps
            if job.status == "paused":
                return job.status
            job.status = "running"
            if resumed:
                self.db.add_event(s, job_id, f"Resumed from the checkpoint at step {run.step} after a restart"
                                  if run.step else "Restarted from step 0 after a restart (no checkpoint yet)")
            else:
                self.db.add_event(s, job_id, f"Fine-tuning job started: {run.total_steps} steps "
                                  f"({run.n_epochs} epochs of {run.steps_per_epoch})")
            if run.client:
                self.db.add_event(s, job_id, f"Its fits run on your device: run `colaft client --job {job_id}` "
                                  "(the job waits while no client is there)", data={"fit_client": "expected"})
        return "running"

    def add_event(self, job_id: str, message: str, **kwargs) -> None:
        """One event of the job (Database.add_event's keywords), in its own transaction."""
        with self.db.session() as s:
            self.db.add_event(s, job_id, message, **kwargs)

    def record_step(self, runs: list[Run], rows: dict[str, list[dict]], losses: dict[str, float]) -> set[str]:
        """A training step of `runs` (on `rows`, with `losses`) is done: the jobs still running
        advance, each with its metrics event; returns their ids (a job paused during the step
        advances too). Jobs cancelled during the step get no more events (their rows are locked:
        a cancel waits for this transaction)."""
        with self.db.session() as s:
            mine = [] if self.owner is None else [Job.lease_owner == self.owner]
            live = set(s.scalars(select(Job.id).where(Job.id.in_(list(rows)), Job.status.in_(TRAINING), *mine)
                                 .with_for_update()))
            for r in runs:
                if r.job_id not in live:
                    continue
                r.advance(rows[r.job_id], losses[r.job_id])
                loss = r.losses[-1]
                self.db.add_event(s, r.job_id, f"Step {r.step}/{r.total_steps}: training loss={loss:.4f}",
                                  type="metrics", data={"step": r.step, "total_steps": r.total_steps,
                                                        "train_loss": loss, "epoch": r.epoch})
        return live

    def add_checkpoint(self, run: Run, folder: Path, listed: bool, metrics: dict) -> None:
        """Record the checkpoint saved in `folder` at the job's step; an unlisted one replaces the
        older unlisted ones (rows, then folders). Not when the job is no longer this process's."""
        with self.db.session() as s:
            if not self._mine(s.get(Job, run.job_id, with_for_update=True)):
                return
            old = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == run.job_id, Checkpoint.listed == 0,
                                                          Checkpoint.step < run.step)))
            s.add(Checkpoint(id=new_id("ftckpt"), job_id=run.job_id, step=run.step, metrics=metrics,
                             path=str(folder.relative_to(self.data_dir)), listed=int(listed), created_at=now()))
            for c in old:
                s.delete(c)
            if listed:
                self.db.add_event(s, run.job_id, f"Checkpoint created at step {run.step}")
        for c in old:
            shutil.rmtree(self.path(c), ignore_errors=True)

    def fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        """The job failed (unless it ended meanwhile), with an OpenAI-shaped error and an event."""
        with self.db.session() as s:
            mine = [] if self.owner is None else [Job.lease_owner == self.owner]
            failed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_(ACTIVE), *mine).values(
                status="failed", finished_at=now(), error={"code": code, "message": message, "param": param})).rowcount
            if failed:
                self.db.add_event(s, job_id, f"Fine-tuning job failed: {message}", level="error")

    def succeed(self, run: Run, metrics: dict) -> bool:
        """The job succeeded: its fine-tuned model, results file, validation `metrics` and events.
        False when it was cancelled during its last step (one paused during it succeeds)."""
        job_id = run.job_id
        with self.db.session() as s:
            job = s.get(Job, job_id, with_for_update=True)  # a cancel waits for this transaction
            if job.status not in TRAINING or not self._mine(job):
                return False
            results = self._results_file(s, job)
            job.status, job.finished_at = "succeeded", now()
            job.fine_tuned_model = job.model_name
            job.trained_tokens = run.tokens
            job.result_files = [results]
            if metrics:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                self.db.add_event(s, job_id, f"Validation: {shown}", type="metrics",
                                  data={"step": run.step, **{f"valid_{k}": v for k, v in metrics.items()
                                                             if isinstance(v, float)}})
            self.db.add_event(s, job_id, f"New fine-tuned model created: {job.fine_tuned_model}")
            self.db.add_event(s, job_id, "The job has successfully completed")
        return True

    def _results_file(self, s, job: Job) -> str:
        """A CSV of the job's step losses, as a file of its owner (purpose fine-tune-results)."""
        events = s.scalars(select(Event).where(Event.job_id == job.id, Event.type == "metrics")
                           .order_by(Event.seq))
        lines = ["step,train_loss"] + [f"{e.data['step']},{e.data['train_loss']}" for e in events
                                       if e.data and "train_loss" in e.data]
        data = ("\n".join(lines) + "\n").encode()
        file_id = new_id("file")
        write_atomic(self.data_dir / "files" / file_id, data)
        s.add(File(id=file_id, user_id=job.user_id, filename=f"{job.id}-results.csv", purpose="fine-tune-results",
                   bytes=len(data), format="results", rows=len(lines) - 1, created_at=now()))
        return file_id
