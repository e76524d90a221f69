"""Training as a service: one Engine (a thread) per base model, every job a user of its ColaModel.

The Engine is the scheduler. It holds, and alone calls, two parts:

    host  (colaft.serve.host.ModelHost)  the base model, its ColaModel and Trainer, the jobs'
                                         adapters and modes, the finished ones kept for inference
    store (colaft.serve.store.JobStore)  the jobs' rows, events, checkpoints and results on the
                                         database and the disk

and itself the running jobs (colaft.serve.jobs.Run), the client-fit jobs' channels (colaft.serve.fits,
tended by colaft.serve.clients) and the queues the API fills (pauses, deletions: colaft.serve.control):

    queued job -> admit: rows encoded, the job added to the host, resumed from its checkpoint
    each tick  -> every running job's next `batch_size` rows, all jobs' rows collated into
                  ONE batch -> host.step: one forward and backward for all jobs, each job's
                  fit on its own rows (on the configured backend)
                  (collaborative jobs form a second batch, in collaborative mode)
               -> per-job loss -> events; checkpoints; at its last step the job's adapters
                  are saved, exported and it succeeds
               -> a fault fails only the job it is blamed on: its own fit or update, or the
                  shared step on its rows (found by halving the batch, colaft.serve.isolation);
                  the other jobs step on, from the same state
    between ticks: inference requests, batched across adapters, a few tokens of each per turn
                   (colaft.serve.decode): a long completion never holds the thread

Why a tick and not colaft.app.loop.train: that loop runs a fixed DataLoader for a fixed set of users
and steps. Here jobs arrive, finish and are cancelled between any two steps, and the thread also
answers inference and writes events and checkpoints; so the tick only forms the batch and calls the
library's Trainer.step (same encode, collate, step and loss normalisation: the sum over jobs of each
job's mean loss, so a job's updates do not depend on which other jobs share its batches).

The HTTP event loop never waits for this thread: the API only writes the database and
hands job ids, cancellations and inference requests over through thread-safe queues.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from colaft.backends import WorkerError
from colaft.runtime import yield_cpu
from colaft.serve import clients, isolation
from colaft.serve.control import Control
from colaft.serve.db import Database, File
from colaft.serve.decode import Generation
from colaft.serve.fits import Channel
from colaft.serve.host import ModelHost
from colaft.serve.inference import ModelGone
from colaft.serve.jobs import LISTED, Run, cola_config, fit_settings, step_groups
from colaft.serve.leases import Leases
from colaft.serve.ownership import Ownership
from colaft.serve.settings import Settings
from colaft.serve.store import JobStore

log = logging.getLogger("colaft.serve")


CHECKPOINTS_PER_STEP = 4
"""Periodic (resume-only) checkpoints taken after one training step at most; the rest wait."""


class Engine:
    """The training thread of the base model `model_id`: it steps the model's host, keeps the
    model's jobs in its store, and answers inference between steps."""

    def __init__(self, model_id: str, source: str, task: str, db: Database, settings: Settings,
                 leases: Leases | None = None):
        self.id, self.settings = model_id, settings
        self.host = ModelHost(model_id, source, task, settings)
        self.generation = Generation(self.host, settings)  # completions in flight
        leases = leases or Leases(db, "", [model_id])  # (not started: an embedded database's only process)
        self.store = JobStore(model_id, db, settings.data_dir, owner=None if leases.exclusive else leases.id)
        self.ownership = Ownership(model_id, leases, self.store)  # claims, other processes' changes
        self.runs: dict[str, Run] = {}
        self.channels: dict[str, Channel] = {}  # client-fit jobs (colaft.serve.fits), read by the API too
        self._due: OrderedDict[str, None] = OrderedDict()  # jobs whose periodic checkpoint waits its turn
        self._admits: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self.control = Control(model_id, self._wake.set)  # pause, resume, deleted models
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
        """A job was created: claim it (or leave it to another process, past this one's share)."""
        self.ownership.claim_soon()
        self._wake.set()

    def queue_admit(self, job_id: str) -> None:
        """A job this process now holds the lease of: admit it at a coming turn (engine's thread)."""
        self._admits.put(job_id)

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
        yield_cpu(self.settings.training_niceness)  # before this thread starts torch's threads and the workers
        try:
            self.ownership.startup(self)
        except Exception:
            log.exception("%s: could not restore the jobs of this model", self.id)
        self.ready.set()
        while not self._stopping:
            try:
                self._take_cancels()
                self.ownership.turn(self)
                self.control.apply(self.runs, self.store, self.host, self.generation.users(), self._checkpoint)
                admitting = self._take_admit()
                self._serve()
                clients.tend(self.channels, self.runs, self.host, self.store, self.settings.client_timeout,
                             self._checkpoint, self._finish)
                if (self.runs and self._tick()) or self.generation.busy or admitting:
                    continue  # completions in flight and jobs waiting to start go on at the next turn
            except Exception:  # e.g. the database went away for a moment: keep serving
                log.exception("%s: the engine's loop failed; going on", self.id)
            self._wake.wait(0.5 if self.runs else 1.0)  # a client's push or pull wakes it sooner
            self._wake.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        self.generation.close(RuntimeError("the server stopped before the completion was done"))
        for run in list(self.runs.values()):
            if run.client and not self.channels[run.job_id].idle():
                continue  # its owner's state is with its client: resume from the last checkpoint
            try:
                self._checkpoint(run, listed=False)
            except Exception:
                log.exception("%s: could not checkpoint %s at shutdown", self.id, run.job_id)
        self.host.close()

    # ------------------------------------------------------------- admission and cancellation
    def _take_admit(self) -> bool:
        """Starts the next job waiting (if any); True if more wait. One a turn: a job's data is
        tokenised as it starts, and a burst of new jobs must not stop the running ones' steps."""
        try:
            job_id = self._admits.get_nowait()
        except queue.Empty:
            return False
        try:
            self._admit(job_id)
        except Exception as e:
            log.exception("%s: job %s could not start", self.id, job_id)
            self._fail(job_id, "internal_error", f"the job could not start: {type(e).__name__}")
        return not self._admits.empty()

    def _admit(self, job_id: str) -> None:
        if job_id in self.runs:
            return
        admission = self.store.admission(job_id)
        if admission is None:
            return
        job, options, hyper = admission.job, admission.job.options, admission.job.hyperparameters
        try:
            features = self._encode(job_id, admission.train, options["max_length"])
            eval_features = self._encode(job_id, admission.valid, options["max_length"]) if admission.valid else []
        except (ValueError, OSError) as e:
            self._fail(job_id, "invalid_training_file", str(e), "training_file")
            return
        run = Run(job_id, options["mode"], features, eval_features, hyper["batch_size"], hyper["n_epochs"], job.seed)
        config = cola_config(options)
        fit = fit_settings(self.host.task.recipe.lr, options, hyper, run.total_steps)
        run.client = options.get("fit", "server") == "client"
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation comes from the job's seed alone
            torch.manual_seed(job.seed)
            if run.client:
                state = self.host.add_client_job(job_id, run.mode, config, fit, job.labels,
                                                 sink=lambda packets: self.channels[job_id].offer("push", packets)
                                                 ).state()
            else:
                self.host.add_job(job_id, run.mode, config, fit, job.labels)
        if admission.checkpoint is not None:
            folder = self.store.path(admission.checkpoint)
            if run.client:
                state = self.host.read_owner(job_id, folder)
            else:
                self.host.load_owner(job_id, folder)
            run.step = run.saved_step = admission.checkpoint.step
            run.tokens = admission.checkpoint.metrics.get("trained_tokens", 0)
        if run.client:
            self.channels[job_id] = Channel(job_id, options["interval"], options.get("staleness", 0), state, run.step,
                                            self.host.client_info(job_id), self._wake.set, job.user_id)
        self.runs[job_id] = run
        status = self.store.start(run, admission.resumed)
        if status is None:  # cancelled meanwhile
            self.drop(job_id)
            return
        run.paused = status == "paused"
        log.info("%s: job %s %s (%d steps)", self.id, job_id, status, run.total_steps)
        if run.step >= run.total_steps:  # killed after its last checkpoint, before it was marked done
            self._finish(run)

    def _encode(self, job_id: str, file: File, max_length: int) -> list[dict]:
        return [{**f, "user": job_id} for f in self.host.task.encode(self.store.records(file), max_length)]

    def _take_cancels(self) -> None:
        while True:
            try:
                job_id = self._cancels.get_nowait()
            except queue.Empty:
                return
            if job_id in self.runs:
                self.drop(job_id)
                log.info("%s: job %s cancelled", self.id, job_id)

    def drop(self, job_id: str, status: str = "cancelled") -> None:
        self.runs.pop(job_id, None)
        channel = self.channels.pop(job_id, None)
        if channel is not None:
            channel.close(status)
        self.host.remove(job_id)

    def _fail(self, job_id: str, code: str, message: str, param: str | None = None) -> None:
        self.drop(job_id, "failed")
        self.store.fail(job_id, code, message, param)
        log.warning("%s: job %s failed: %s", self.id, job_id, code)

    # ------------------------------------------------------------- training
    def _tick(self) -> bool:
        """One step per mode over the jobs that may step; False when none may (all wait for clients)."""
        stepped = False
        for mode in ("personal", "collaborative"):
            runs = [r for r in self.runs.values() if r.mode == mode and
                    clients.may_step(r, self.channels.get(r.job_id), self.settings.client_timeout)]
            rows = {r.job_id: r.next_rows() for r in runs}
            cap = self.settings.max_step_tokens if mode == "personal" else 0  # collaborative: coupled by the mean
            for group in step_groups(runs, rows, cap):
                stepped = True
                try:  # blames the step's own faults on their jobs
                    self._step(group, mode, {r.job_id: rows[r.job_id] for r in group})
                except Exception as e:  # recording the step (database, checkpoints) failed: stop its jobs
                    log.exception("%s: a step of %d jobs could not be recorded", self.id, len(group))
                    for r in group:
                        if r.job_id in self.runs:
                            self._fail(r.job_id, "internal_error", f"training stopped: {type(e).__name__}")
        return stepped

    def _batch(self, runs: list[Run]) -> dict:
        return self.host.task.collate([f for r in runs for f in r.next_rows()])

    def _step(self, runs: list[Run], mode: str, rows: dict[str, list[dict]] | None = None) -> None:
        """One step of `runs` (on `rows`, each job's next rows). A job whose own fit fails fails alone;
        when the shared server step fails, the jobs it is blamed on fail and the others step again
        (colaft.serve.isolation)."""
        rows = rows or {r.job_id: r.next_rows() for r in runs}
        batch = self.host.task.collate([f for r in runs for f in rows[r.job_id]])
        try:
            with isolation.rewind():
                losses, seconds, faults = self.host.step(batch, mode)
        except WorkerError as e:  # the backend broke, after packets left: no job can go on
            log.exception("%s: the fit backend failed", self.id)
            for r in runs:
                self._fail(r.job_id, "internal_error", f"training stopped: {type(e).__name__}")
            return
        except Exception as e:
            log.warning("%s: the server step of %d jobs failed; finding the jobs it fails on", self.id, len(runs),
                        exc_info=True)
            blamed, retries = isolation.blame(runs, e, lambda rs: self.host.check(self._batch(rs), mode))
            for job_id, why in blamed.items():
                self._fail(job_id, "training_failed", f"the training step failed on this job's rows: {why}")
            for group in retries:
                self._step(group, mode)
            return
        for job_id, why in faults.items():
            self._fail(job_id, "fit_failed", f"the job's fit failed: {why}")
        runs = [r for r in runs if r.job_id not in faults]
        self.steps += 1
        self.rows += len(batch["users"])
        self.step_seconds += seconds
        log.info("%s: step %d: %d jobs, %d rows, %s mode, %.3f s", self.id, self.steps, len(runs),
                 len(batch["users"]), mode, seconds)
        live = self.store.record_step(runs, rows, losses)
        for r in runs:
            if r.job_id not in live:  # cancelled meanwhile, or taken over by another process
                self.drop(r.job_id, "cancelled" if self.store.owns(r.job_id) else "moved")
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
        """At most CHECKPOINTS_PER_STEP of the due periodic checkpoints after a step, oldest first: jobs
        created together fall due together (64 at once stopped training for ~2 s); the others wait."""
        for _ in range(min(CHECKPOINTS_PER_STEP, len(self._due))):
            job_id, _ = self._due.popitem(last=False)
            run = self.runs.get(job_id)
            if run is not None and run.saved_step != run.step:
                self._checkpoint(run, listed=False)

    def _checkpoint(self, run: Run, listed: bool, metrics: dict | None = None) -> None:
        """Save the job's adapters and owner. `listed`: the end of one of the last LISTED epochs,
        shown by the API (as OpenAI does); the others only let a restarted server resume, and
        only the newest of them is kept. A client-fit job's checkpoint waits until no fit of
        it is in flight (`clients.tend` takes it then): the server holds its owner's state
        only as of the last update."""
        metrics = metrics or {"train_loss": sum(run.losses) / len(run.losses) if run.losses else None,
                              "trained_tokens": run.tokens}
        channel = self.channels.get(run.job_id)
        if channel is not None and not channel.idle():
            run.due = (listed or (run.due is not None and run.due[0]), metrics)
            return
        run.due = None
        if not self.store.owns(run.job_id):  # another process took the job over: its folders are its own
            return
        folder = self.store.checkpoint_folder(run.job_id, run.step)
        self.host.save_owner(run.job_id, folder, state=channel.state if channel is not None else None)
        run.saved_step = run.step
        self.store.add_checkpoint(run, folder, listed, metrics)

    def _finish(self, run: Run) -> None:
        job_id = run.job_id
        channel = self.channels.get(job_id)
        if channel is None:
            for failed, why in self.host.flush(job_id).items():
                self._fail(failed, "fit_failed", f"the job's fit failed: {why}")
            if job_id not in self.runs:
                return
        else:  # the client fits the partial interval; the job ends once every update is applied
            if not run.finishing:
                run.finishing = True
                if channel.pending_steps:
                    channel.offer("flush", [])
            if not channel.idle():
                return
        if not self.store.owns(job_id):  # another process took the job over: it finishes it
            self.drop(job_id, "moved")
            return
        metrics = self.host.evaluate(run.mode, run.eval_features, 2 * run.batch_size) if run.eval_features else {}
        self.host.save_adapters(job_id, self.store.job_folder(job_id))
        if run.saved_step != run.step:
            self._checkpoint(run, listed=True)
        if not self.store.succeed(run, metrics):  # cancelled during the last step
            self.drop(job_id)
            return
        self.runs.pop(job_id, None)
        if channel is not None:
            self.channels.pop(job_id, None)
            channel.close("succeeded")
        self.host.finish(job_id)
        log.info("%s: job %s succeeded", self.id, job_id)

    # ------------------------------------------------------------- inference
    def _serve(self) -> None:
        """New requests join the completions in flight (max_inference_batch rows at most), which
        then advance by a few tokens each (colaft.serve.decode)."""
        requests = self.generation.take(self._requests)
        if requests:
            self.generation.add(requests, self._ensure_adapters)
        if requests or self.generation.active:
            self.generation.advance()
            self.host.unload_unused(keep=self.generation.users())

    def _ensure_adapters(self, user_id: str) -> None:
        """A finished job's or a checkpoint's adapters in the ColaModel (from disk at first use)."""
        if user_id in self.control.forgetting:  # deleted while the request waited for this turn
            raise ModelGone(f"the model of {user_id} was deleted")
        if self.host.holds(user_id):
            self.host.used(user_id)
        else:
            self.load_finished(user_id, *self.store.adapters(user_id))

    def load_finished(self, user_id: str, job, folder, mode: str) -> None:
        self.host.load_finished(user_id, mode, cola_config(job.options), folder, job.labels)
