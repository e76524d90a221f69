"""What the API asks of a base model's engine besides jobs and completions: pause or resume a
job, and forget a deleted model. Queued from the API's threads (never waited for), applied on
the engine's thread before its next step (colaft.serve.scheduler calls `apply`):

    pause   -> the job's run stays in memory (adapters, owner, data position) but leaves the
               batches (Run.paused; colaft.serve.clients.may_step), and is checkpointed (a
               client-fit job's once its fits in flight are answered), so that a restart
               finds it paused at that step; a client-fit job's channel stays open, and its
               client's polls get no packets until the resume
    resume  -> the run joins the next batch where it stopped: nothing of it changed meanwhile
    forget  -> a deleted model's adapters (a finished job's, or a checkpoint's) leave the host
               once no completion in flight uses them, then their folders leave the disk

The database says whether a job is paused: a pause or resume only makes the engine read the
job's status again, so requests that arrive out of order still leave the job as the last one did.
"""
from __future__ import annotations

import logging
import queue
import shutil
from collections.abc import Callable
from pathlib import Path

from colaft.serve.host import ModelHost
from colaft.serve.jobs import Run
from colaft.serve.store import JobStore

log = logging.getLogger("colaft.serve")


class Control:
    """The pause, resume and forget requests of the engine of the base model `model_id`."""

    def __init__(self, model_id: str, wake: Callable[[], None]):
        self.model_id, self._wake = model_id, wake
        self._changed: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._forgets: queue.SimpleQueue[tuple[str, list[Path]]] = queue.SimpleQueue()
        self.forgetting: dict[str, list[Path]] = {}  # host users to unload once no completion uses them

    # ------------------------------------------------------------- called from the API's threads
    def status_changed(self, job_id: str) -> None:
        """The job was paused or resumed in the database."""
        self._changed.put(job_id)
        self._wake()

    def forget(self, user_id: str, folders: list[Path]) -> None:
        """The model answering as the host's user `user_id` was deleted: unload it, then remove `folders`."""
        self._forgets.put((user_id, folders))
        self._wake()

    # ------------------------------------------------------------- the engine's thread
    def apply(self, runs: dict[str, Run], store: JobStore, host: ModelHost, in_use: set[str],
              checkpoint: Callable[..., None]) -> None:
        """Pause or resume the runs whose status changed (`checkpoint(run, listed=False)` at a
        pause), and forget the deleted models that no completion in flight (`in_use`) uses."""
        for job_id in _drain(self._changed):
            run = runs.get(job_id)
            if run is not None:  # else not admitted yet (its admission reads the status) or over
                self._follow(run, store, checkpoint)
        for user_id, folders in _drain(self._forgets):
            self.forgetting.setdefault(user_id, []).extend(folders)
        for user_id in [u for u in self.forgetting if u not in in_use]:
            host.remove(user_id)
            for folder in self.forgetting.pop(user_id):
                shutil.rmtree(folder, ignore_errors=True)
            log.info("%s: the adapters of %s are deleted", self.model_id, user_id)

    def _follow(self, run: Run, store: JobStore, checkpoint: Callable[..., None]) -> None:
        job = store.job(run.job_id)
        paused = job is not None and job.status == "paused"
        if paused == run.paused:
            return
        run.paused = paused
        if paused and run.saved_step != run.step:
            checkpoint(run, listed=False)
        log.info("%s: job %s %s at step %d", self.model_id, run.job_id, "paused" if paused else "resumed",
                 run.step)


def _drain(q: queue.SimpleQueue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
