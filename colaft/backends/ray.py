"""`ray`: the owners on Ray actors, on this machine or on an existing Ray cluster.

    server: Message -> ship (tensors as numpy arrays) -> actor.handle.remote  [Ray's object store]
      -> actor: unship -> Worker.handle (the fit) -> ship(Reply) -> ray.wait / ray.get / unship

`address=None` starts a private Ray instance on this machine (its files under `temp_dir`,
no dashboard, quiet logs) and shuts it down at close(); `address="HOST:PORT"` joins a
running cluster (`ray start --head` prints the address) and only disconnects at close().
Each actor hosts one Worker and reserves one CPU; a user's messages all go to one actor,
which runs them in submission order. A lost actor (`ray.kill`, its node gone) surfaces as a
Ray error on its results: a new actor takes its place and WorkerLost names its users.
The session itself (a private instance, a cluster's address, one per process) is
colaft.backends.ray_session's. Ray is imported only when this backend is built.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from colaft.backends import wire
from colaft.backends.base import Message, Reply, Worker, WorkerError, WorkerLost, describe, register_backend
from colaft.backends.ray_session import CONNECT_SECONDS, SESSION, check_reachable, start_local
from colaft.users import Owner

START_SECONDS = 120.0
"""How long the actors may take to start (import colaft, reserve a CPU) before giving up."""
POLL_SECONDS = 0.5
"""Longest sleep while waiting for replies before looking at the actors again."""


@dataclasses.dataclass
class Shipment:
    """An object with its tensors set aside as flat numpy arrays (colaft.backends.wire).

    Ray moves numpy arrays through its object store without pickling their bytes; torch
    tensors it pickles. Measured with 267 MiB of packets to an actor on 2 cores: 45 ms for
    the round trip as numpy, 1.8-2.8 s as tensors.
    """

    payload: bytes
    arrays: list  # of (nbytes,) uint8 numpy arrays


def ship(obj) -> Shipment:
    """Set the tensors of `obj` aside (moved to the CPU, each distinct view once)."""
    arrays, index = [], {}

    def place(t: torch.Tensor) -> tuple:
        t = t.detach().cpu()
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in index:
            index[key] = len(arrays)
            arrays.append(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # any dtype, bfloat16 too
        return index[key], t.dtype, tuple(t.shape)
    return Shipment(wire.dumps(obj, place), arrays)


def unship(shipment: Shipment):
    """The object back, each tensor a writable copy (the arrays are read-only object-store memory)."""
    def rebuild(descriptor: tuple) -> torch.Tensor:
        i, dtype, shape = descriptor
        with warnings.catch_warnings():  # "not writable": it is copied at once
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(shipment.arrays[i]).clone()  # (nbytes,) uint8
        return flat.view(dtype).reshape(shape)
    return wire.loads(shipment.payload, rebuild)


class _Actor:
    """What each Ray actor runs (made a remote class when the backend is built)."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.worker = Worker()

    def pid(self) -> int:
        return os.getpid()

    def add(self, owner: Shipment) -> None:
        self.worker.add(unship(owner))

    def remove(self, user: str) -> None:
        self.worker.remove(user)

    def handle(self, msg: Shipment) -> Shipment:
        return ship(self.worker.handle(unship(msg)))


@dataclasses.dataclass
class _Held:
    """What close() (or the finalizer of a forgotten backend) releases."""

    actors: list = dataclasses.field(default_factory=list)
    stop_ray: Callable[[], None] | None = None  # set when this backend started or joined Ray

    def release(self) -> None:
        import ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead, or Ray already shut down
                pass
        self.actors.clear()
        if self.stop_ray is not None:
            self.stop_ray, stop = None, self.stop_ray
            stop()


@register_backend("ray")
class RayBackend:
    """Owners on `workers` Ray actors of one CPU each.

    Args:
        workers: number of actors (default: on a private instance, this machine's idle cores
            less the server's threads; on a cluster, its free CPUs).
        address: "HOST:PORT" of a running cluster; None: a private instance on this machine.
            If Ray is already initialised in this process, that session is used as it is.
        temp_dir: where a private instance keeps its files (None: a temporary folder,
            removed at close()).
        threads: torch threads per actor.
        connect_timeout, start_timeout: seconds to reach `address`, and for the actors to start.
    """

    recoverable = True
    device = "cpu"

    def __init__(self, workers: int | None = None, address: str | None = None, temp_dir: str | Path | None = None,
                 threads: int = 1, connect_timeout: float = CONNECT_SECONDS, start_timeout: float = START_SECONDS):
        import ray

        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        SESSION.check(address)
        if address is not None and not SESSION.holders:
            check_reachable(address, connect_timeout)
        self.threads = threads
        self._held = _Held()
        self._finalizer = weakref.finalize(self, self._held.release)
        self.where: dict[str, int] = {}  # user -> actor
        self.users: list[set[str]] = []  # per actor
        self.pending: dict[Any, tuple[int, str, str]] = {}  # result ref -> (actor, kind, what), in submission order
        self._calls: dict[Any, Any] = {}  # ref of a call -> its value once answered
        self._ready: list[Reply] = []
        self._failure: WorkerError | None = None
        self.transfer_seconds = 0.0  # server time submitting messages and fetching replies
        self.temp_dir: Path | None = None  # a private instance's files
        try:
            if ray.is_initialized() and not SESSION.holders:
                pass  # someone else's session (a notebook's, a test's): use it and leave it running
            else:
                def start() -> tuple[Callable[[], None], Path | None]:
                    if address is None:
                        local = start_local(temp_dir, num_cpus=max(os.cpu_count() or 1, workers or 1))
                        return local.stop, local.folder
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
                    return ray.shutdown, None
                self._held.stop_ray, self.temp_dir = SESSION.join(address, start)
            if workers is None:
                from colaft.runtime import default_workers
                workers = default_workers() if address is None else max(1, int(ray.available_resources().get("CPU", 1)))
            self._remote = ray.remote(num_cpus=1, max_restarts=0)(_Actor)
            for _ in range(workers):
                self._held.actors.append(self._remote.remote(threads))
                self.users.append(set())
            self._wait_started(start_timeout)
        except BaseException:
            self.close()
            raise

    @property
    def actors(self) -> list:
        return self._held.actors

    def _wait_started(self, timeout: float) -> None:
        import ray
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources().get("CPU", 0)
            raise TimeoutError(f"{len(self.actors)} Ray actors of one CPU each did not start within {timeout:.0f} s "
                               f"({free:g} CPUs free in the cluster)") from None
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"the Ray actors could not start (is colaft installed on every node?): {e}") from None

    def actor_of(self, user: str):
        """The actor hosting `user`."""
        return self.actors[self.where[user]]

    # ------------------------------------------------------------- sending
    def _send(self, i: int, method: str, kind: str, what: str, obj) -> Any:
        start = time.perf_counter()
        arg = obj if isinstance(obj, str) else ship(obj)
        ref = getattr(self.actors[i], method).remote(arg)  # the argument goes to the object store here
        self.transfer_seconds += time.perf_counter() - start
        self.pending[ref] = (i, kind, what)
        return ref

    def add(self, owner: Owner) -> None:
        i = min(range(len(self.actors)), key=lambda i: len(self.users[i]))  # least loaded
        self._send(i, "add", "done", f"the owner of user {owner.user!r}", owner)
        self.users[i].add(owner.user)
        self.where[owner.user] = i

    def remove(self, user: str) -> None:
        i = self.where.pop(user)
        self.users[i].discard(user)
        self._send(i, "remove", "done", f"removing user {user!r}", user)

    def submit(self, msg: Message) -> None:
        self._send(self.where[msg.user], "handle", "reply", describe(msg), msg)

    def call(self, msg: Message) -> Any:
        ref = self._send(self.where[msg.user], "handle", "call", describe(msg), msg)
        while ref in self.pending:
            self._collect(POLL_SECONDS)
        return self._calls.pop(ref)

    # ------------------------------------------------------------- receiving
    def replies(self, block: bool) -> list[Reply]:
        while True:
            self._collect(0)
            if self._ready or not block:
                out, self._ready = self._ready, []
                return out
            self._collect(POLL_SECONDS)

    def _collect(self, timeout: float) -> None:
        """Fetch the finished results, per actor in submission order; waits up to `timeout` for one."""
        import ray
        if self._failure is not None:
            raise self._failure
        refs = list(self.pending)
        if not refs:
            return
        if timeout:
            ray.wait(refs, num_returns=1, timeout=timeout)
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        start = time.perf_counter()
        held_up: set[int] = set()  # actors with an unfinished earlier result
        lost: dict[int, str] = {}
        for ref in refs:
            i, kind, what = self.pending[ref]
            if i in held_up or i in lost or ref not in done:
                held_up.add(i)
                continue
            del self.pending[ref]
            try:
                value = ray.get(ref)
                value = unship(value) if isinstance(value, Shipment) else value
            except ray.exceptions.RayTaskError as e:  # the handler raised: a bug, not a lost actor
                self._failure = WorkerError(f"a Ray actor failed on {what}:\n{e}")
                raise self._failure from None
            except ray.exceptions.RayError as e:  # the actor died, or its node, or the result was lost
                lost[i] = f"{type(e).__name__} on {what}"
                continue
            if kind == "reply":
                self._ready.append(value)
            elif kind == "call":
                self._calls[ref] = value
        self.transfer_seconds += time.perf_counter() - start
        if lost:
            i, why = next(iter(lost.items()))
            raise WorkerLost(self._replace(i), why)

    def _replace(self, i: int) -> list[str]:
        """A new actor in place of actor i; its users, now on no actor."""
        import ray
        try:
            ray.kill(self.actors[i])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._remote.remote(self.threads)
        users, self.users[i] = sorted(self.users[i]), set()
        for user in users:
            self.where.pop(user, None)
        self.pending = {r: v for r, v in self.pending.items() if v[0] != i}  # their results will not come
        return users

    def close(self) -> None:
        self._finalizer()

