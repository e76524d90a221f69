"""What an engine (colaft.serve.scheduler) learns from the database each turn, when other
serve processes share it (colaft.serve.leases):

    claims    the jobs of its base model it now holds the leases of: queued ones, and those a
              dead process held (they resume from their newest checkpoint when admitted); a
              job created through this process's API makes the next turn claim at once,
              otherwise claims are asked every `every` seconds
    follow    its runs' rows, in one query: a run whose lease another process took is dropped
              (nothing written); one cancelled, paused or resumed through another process's API
              is dropped, or paused or resumed, as a local request would have done
    models    finished jobs of its base model that changed elsewhere: a collaborative job
              another process finished joins the mean (its adapters loaded from the shared
              folder); a model another process deleted is unloaded here

On SQLite the only process claims every active job, when it starts and when a job is created
through its API, and follows nothing it did not do itself.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from colaft.serve.db import FINAL, now
from colaft.serve.leases import Leases
from colaft.serve.store import JobStore

log = logging.getLogger("colaft.serve")

FOLLOW_SECONDS = 0.5
"""Seconds between an engine's looks at its runs' rows and its claims of free jobs."""
MODELS_SECONDS = 2.0
"""Seconds between an engine's looks for models finished or deleted by other processes."""
CLOCK_SLACK = 300
"""Seconds the machines' clocks may disagree: finished_at and model_deleted_at are each
writer's own clock, so the look for changes reaches this far back (and skips what it holds)."""


class Ownership:
    """The jobs of the engine of `model_id` across processes (see the module's docstring)."""

    def __init__(self, model_id: str, leases: Leases, store: JobStore, every: float = FOLLOW_SECONDS):
        self.model_id, self.leases, self.store, self.every = model_id, leases, store, every
        self._claim_now = True
        self._followed = self._claimed = self._looked = 0.0
        self._since = now()

    def claim_soon(self) -> None:
        """A job was created here: claim at the next turn."""
        self._claim_now = True

    def startup(self, engine: Any) -> None:
        """Load the adapters of the collaborative finished jobs (their deltas make the mean) and of
        the most recently finished personal ones. Other finished jobs load when a request first
        asks for them; unfinished ones are claimed at the turns that follow."""
        jobs = self.store.jobs()
        done = sorted((j for j in jobs if j.status == "succeeded" and j.model_deleted_at is None),
                      key=lambda j: (j.finished_at or 0, j.created_at))
        personal = [j for j in done if j.options["mode"] != "collaborative"]
        warm = {j.id for j in personal[len(personal) - engine.settings.max_loaded_adapters:]}
        for job in done:
            if job.options["mode"] == "collaborative" or job.id in warm:
                self._load(engine, job)

    def turn(self, engine: Any) -> None:
        """Claims, the runs' rows and other processes' models, each when its time has come."""
        t = time.monotonic()
        # the only process of an embedded database claims when asked (start, a job created here):
        # nothing else frees a job there, and a claim is a write transaction (SQLite's write lock)
        if self._claim_now or (not self.leases.exclusive and t - self._claimed >= self.every):
            self._claim_now, self._claimed = False, t
            for job_id in self.leases.claim(self.model_id):
                if job_id not in engine.runs:
                    engine.queue_admit(job_id)
        if self.leases.exclusive:
            return
        if engine.runs and t - self._followed >= self.every:
            self._followed = t
            self._follow(engine)
        if t - self._looked >= MODELS_SECONDS:
            self._looked = t
            self._models(engine)

    def _follow(self, engine: Any) -> None:
        rows = self.store.statuses(list(engine.runs))
        for job_id, run in list(engine.runs.items()):
            status, owner = rows.get(job_id, ("cancelled", None))
            if owner != self.leases.id:
                log.warning("%s: job %s is trained by another process now (this one lost its lease): dropped",
                            self.model_id, job_id)
                engine.drop(job_id, "moved")
            elif status in FINAL:
                log.info("%s: job %s %s through another process", self.model_id, job_id, status)
                engine.drop(job_id, status)
            elif (status == "paused") != run.paused:
                engine.control.status_changed(job_id)

    def _models(self, engine: Any) -> None:
        since, self._since = self._since - CLOCK_SLACK, now()
        for job in self.store.changed_models(since):
            if job.model_deleted_at is not None:
                if engine.host.holds(job.id) and job.id not in engine.runs | engine.control.forgetting.keys():
                    engine.control.forget(job.id, [])
            elif job.status == "succeeded" and job.options["mode"] == "collaborative" \
                    and not engine.host.holds(job.id):
                log.info("%s: job %s finished in another process: its delta joins the mean", self.model_id,
                         job.id)
                self._load(engine, job)

    def _load(self, engine: Any, job) -> None:
        try:
            engine.load_finished(job.id, job, self.store.job_folder(job.id) / "adapter", job.options["mode"])
        except Exception:
            log.exception("%s: adapters of %s could not be loaded", self.model_id, job.id)
