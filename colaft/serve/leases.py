"""Which serve process trains which job: leases in the database (every lease query is here).

Several `colaft serve` processes may share one PostgreSQL database and one data folder, each
serving the base models it was started with. Each has a row in `servers` (its id, the URL
other processes send its clients to, its models, a heartbeat), and a job it trains carries
its id in `jobs.lease_owner` until `jobs.lease_expires_at`, both on the database's clock:

    claim    each engine turn (colaft.serve.ownership): SELECT ... FOR UPDATE SKIP LOCKED the
             active jobs of my base model whose lease is free or expired, oldest first, at most
             my fair share (the model's active jobs over the live processes serving it, less
             those I hold), and write myself in as their owner: two claimers never get one job
             (on PostgreSQL one claimer of a model at a time: a transaction's advisory lock).
             Collaborative jobs all go to one process: the mean of their deltas couples them
    renew    a thread of its own (not the engine's: a long step never loses a lease) moves the
             expiry of every active job I hold, and my heartbeat, LEASE_SECONDS ahead, every
             HEARTBEAT_SECONDS
    fence    every write the engine makes about a job (a step's events, a checkpoint, its end)
             is in a transaction that locks the job's row and checks I still own it; a process
             that lost a job (it stalled past the expiry, and another took the job over) drops
             its run without writing anything
    release  at a graceful stop, once the engines have checkpointed: the others take the jobs
             over at once, not after the expiry

A process that dies (SIGKILL, power loss) stops renewing: after LEASE_SECONDS its jobs'
leases expire and a live process serving their base claims them, and resumes each from its
newest checkpoint (the engine's ordinary admission). Embedded SQLite serves one process
(`exclusive`): every active job of its models is its own, whatever an earlier, dead process
wrote; colaft.serve.commands refuses a second process on the same data folder.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading

from sqlalchemy import delete, func, or_, select, update

from colaft.serve.db import ACTIVE, Database, Job, Server, clock, new_id

log = logging.getLogger("colaft.serve")

LEASE_SECONDS = 10.0
"""A lease lasts this long past its last renewal: a dead process's jobs wait this long at most
(plus a turn of the claimer's engine and the job's admission) before another takes them."""
HEARTBEAT_SECONDS = 2.0
"""How often the leases and the heartbeat are renewed."""
FORGOTTEN = 86400.0
"""Seconds after its last heartbeat that a dead process's row is removed (by the next to start)."""


def _key(model: str) -> int:
    """The advisory lock of `model`'s claims: a stable signed 64-bit number."""
    return int.from_bytes(hashlib.sha256(f"colaft-claim:{model}".encode()).digest()[:8], "big", signed=True)


class Leases:
    """This process's row in `servers` and the leases of the jobs it trains.

    Args:
        db: the service's database.
        url: where other processes may send this one's clients (`colaft serve --advertise-url`).
        models: the base models this process serves.
        ttl: seconds a lease lasts past its renewal (LEASE_SECONDS).
    """

    def __init__(self, db: Database, url: str, models: list[str], ttl: float = LEASE_SECONDS):
        self.db, self.url, self.models, self.ttl = db, url, list(models), ttl
        self.id = new_id("server")
        self.exclusive = db.url.startswith("sqlite")
        self.clock = clock(db.engine.dialect.name)
        self.every = min(HEARTBEAT_SECONDS, ttl / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="colaft-leases", daemon=True)

    # ------------------------------------------------------------- this process
    def start(self) -> None:
        """Say this process is alive, and keep saying so (and renewing its leases) from a thread
        (not on an embedded database: its only process never loses a lease)."""
        if self.exclusive:
            return
        with self.db.session() as s:
            now = s.scalar(select(self.clock))
            s.execute(delete(Server).where(Server.heartbeat_at < now - FORGOTTEN))  # long dead: their leases expired
            s.add(Server(id=self.id, url=self.url, models=self.models, heartbeat_at=now))
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing; release every lease held (the engines have checkpointed) and leave `servers`."""
        if self.exclusive:
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        try:
            with self.db.session() as s:
                s.execute(update(Job).where(Job.lease_owner == self.id).values(lease_owner=None,
                                                                              lease_expires_at=None))
                s.execute(delete(Server).where(Server.id == self.id))
        except Exception:
            log.exception("the leases could not be released (they expire in %g s)", self.ttl)

    def renew(self) -> int:
        """Move this process's heartbeat and its active jobs' leases `ttl` ahead; the leases renewed."""
        with self.db.session() as s:
            now = s.scalar(select(self.clock))
            s.execute(update(Server).where(Server.id == self.id).values(heartbeat_at=now))
            return s.execute(update(Job).where(Job.lease_owner == self.id, Job.status.in_(ACTIVE))
                             .values(lease_expires_at=now + self.ttl)).rowcount

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.renew()
            except Exception:  # the database went away for a moment: try again at the next beat
                log.warning("the leases could not be renewed", exc_info=True)

    # ------------------------------------------------------------- jobs
    def claim(self, model: str) -> list[str]:
        """Take the leases of the active jobs of `model` that are free or expired, up to this
        process's fair share; the jobs now mine (oldest first). Collaborative jobs train on one
        process (the mean of their deltas couples them): they are all claimed by the process
        that holds one already, or by the first to find none held, whatever its share."""
        with self.db.session() as s:
            if s.bind.dialect.name == "postgresql":  # one claimer of this model at a time, on any process
                s.execute(select(func.pg_advisory_xact_lock(_key(model))))
            now = s.scalar(select(self.clock))
            free = or_(Job.lease_owner.is_(None), Job.lease_expires_at < now)
            if self.exclusive:  # the only process: jobs an earlier, dead one held are free
                free = or_(Job.lease_owner.is_(None), Job.lease_owner != self.id)
            found = s.execute(select(Job.id, Job.options).where(Job.model == model, Job.status.in_(ACTIVE), free)
                              .order_by(Job.created_at, Job.id).with_for_update(skip_locked=True)).all()
            if not found:
                return []
            alone = [i for i, options in found if options.get("mode") != "collaborative"]
            together = [i for i, options in found if options.get("mode") == "collaborative"]
            if not self.exclusive:
                if together and self._collaborating_elsewhere(s, model, now):
                    together = []
                alone = alone[:max(0, self._share(s, model, now) - len(together))]
            ids = [i for i, _ in found if i in set(alone) | set(together)]
            if ids:
                s.execute(update(Job).where(Job.id.in_(ids)).values(lease_owner=self.id,
                                                                    lease_expires_at=now + self.ttl))
        return ids

    def _collaborating_elsewhere(self, s, model: str, now: float) -> bool:
        """Another process holds a live lease of an active collaborative job of `model`."""
        return any(options.get("mode") == "collaborative" for options in s.scalars(
            select(Job.options).where(Job.model == model, Job.status.in_(ACTIVE), Job.lease_owner != self.id,
                                      Job.lease_expires_at >= now)))

    def _share(self, s, model: str, now: float) -> int:
        """How many more jobs of `model` this process may claim: its fair share of the model's
        active jobs over the live processes serving it, less those it holds."""
        serving = sum(model in (models or []) for models in
                      s.scalars(select(Server.models).where(Server.heartbeat_at > now - self.ttl)))
        active = s.execute(select(func.count(), func.count().filter(Job.lease_owner == self.id))
                           .where(Job.model == model, Job.status.in_(ACTIVE))).one()
        return math.ceil(active[0] / max(1, serving)) - active[1]

    def holds(self, s, job_ids: list[str]) -> set[str]:
        """Of `job_ids`, those this process owns; their rows stay locked until `s` ends (a claim
        waits for it, so nothing is written by a process that lost the job)."""
        if not job_ids:
            return set()
        return set(s.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), Job.lease_owner == self.id)
                             .with_for_update()))

    def holder(self, job_id: str) -> str | None:
        """The URL of the live process that holds the job's lease, when it is not this one."""
        with self.db.read() as s:
            now = s.scalar(select(self.clock))
            return s.scalar(select(Server.url).join(Job, Job.lease_owner == Server.id).where(
                Job.id == job_id, Server.id != self.id, Job.lease_expires_at > now,
                Server.heartbeat_at > now - self.ttl))

    def servers(self) -> list[str]:
        """The URLs of the live processes on this database, this one first."""
        with self.db.read() as s:
            now = s.scalar(select(self.clock))
            urls = list(s.scalars(select(Server.url).where(Server.heartbeat_at > now - self.ttl)
                                  .order_by(Server.started_at)))
        return [self.url, *[u for u in urls if u != self.url]]
