"""`process`: the owners on a pool of local worker processes (torch.multiprocessing, spawn).

    server: Message -> sender thread: pack (tensors into shared memory) -> pipe
      -> worker process: unpack -> Worker.handle (the fit) -> pack Reply -> pipe -> server: unpack

Each user lives on one worker (the least loaded one when the user was added), so its
messages are handled in order. Tensors travel through reusable shared-memory buffers
(colaft.backends.shm); packets on a GPU are copied straight into them, so the owners train
on the CPU. A worker that dies (killed, out of memory) is noticed while the server waits -
its pipe closes and its process sentinel fires - replaced by a fresh process, and reported
as WorkerLost; the pipeline rebuilds its users' owners from their snapshots. An exception in
a worker (a bug in a fit) comes back with its traceback and is raised as WorkerError.
"""
from __future__ import annotations

import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as mp

from colaft.backends.base import Message, Reply, Worker, WorkerError, WorkerLost, describe, register_backend
from colaft.backends.shm import Incoming, Outgoing
from colaft.runtime import default_workers
from colaft.users import Owner

POLL_SECONDS = 0.5
"""Longest sleep while waiting for replies before the workers are looked at again."""
STOP_SECONDS = 5.0
"""How long close() lets the workers exit on their own before it terminates them."""


# ---------------------------------------------------------------- the worker process

def _post(conn: Connection, envelope: tuple) -> None:
    # ForkingPickler: a new shared buffer crosses as a file descriptor (torch's reduction)
    conn.send_bytes(ForkingPickler.dumps(envelope))


def _serve(conn: Connection, threads: int) -> None:
    """A worker: handle the server's envelopes in order until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which then stops us
    torch.set_num_threads(threads)
    worker, incoming, outgoing = Worker(), Incoming(), Outgoing()
    _post(conn, ("ready", 0, None))
    while True:
        try:
            kind, tag, body = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # the server has exited
        if kind == "stop":
            return
        if kind == "release":
            outgoing.release(tag)
            continue
        try:
            obj = incoming.unpack(body)
            if body.buffer is not None:
                _post(conn, ("release", body.buffer, None))
            if kind in ("add", "remove"):
                getattr(worker, kind)(obj)
                _post(conn, ("done", tag, None))
            else:
                _post(conn, ("reply", tag, outgoing.pack(worker.handle(obj))))
        except Exception:  # noqa: BLE001 - the server raises it, with this traceback
            _post(conn, ("error", tag, traceback.format_exc()))


# ---------------------------------------------------------------- the server's side

class _Sender(threading.Thread):
    """Packs and writes one worker's envelopes, in order, off the server's thread.

    The server never blocks on a worker busy with a fit, and the copy of a step's packets
    into shared memory (tens of ms for 100+ MiB) overlaps the server's next step instead of
    delaying it.
    """

    def __init__(self, conn: Connection, outgoing: Outgoing):
        super().__init__(daemon=True, name="colaft-fit-send")
        self.conn, self.outgoing = conn, outgoing
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: str | None = None  # a packing failure, for the server to raise
        self.seconds = 0.0  # spent packing

    def put(self, envelope: bytes | memoryview | tuple | None) -> None:
        """Packed bytes; (kind, tag, obj) to pack here; None: stop."""
        self.queue.put(envelope)

    def pack(self, kind: str, tag: int, obj: Any) -> bytes:
        body = self.outgoing.pack(obj)
        return ForkingPickler.dumps((kind, tag, body))  # a new shared buffer crosses as a file descriptor

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                if isinstance(item, tuple):  # to pack here
                    start = time.perf_counter()
                    item = self.pack(*item)
                    self.seconds += time.perf_counter() - start
                self.conn.send_bytes(item)
            except OSError:
                return  # the worker is gone; the server notices from the pipe and the process
            except Exception:  # noqa: BLE001 - raised in the server by the next poll
                self.error = traceback.format_exc()
                return


@dataclass
class _Slot:
    """One worker process and the server's end of its link."""

    process: BaseProcess
    conn: Connection
    sender: _Sender
    incoming: Incoming = field(default_factory=Incoming)
    users: set[str] = field(default_factory=set)
    ready: bool = False  # it has started (imported colaft) and said so
    broken: bool = False  # its pipe failed: treat it as dead


def _stop(slots: list[_Slot], grace: float = STOP_SECONDS) -> None:
    """Stop every worker: ask, wait up to `grace` seconds, then terminate and kill. Idempotent.

    A worker still starting (importing) holds nothing and cannot read yet: it is terminated
    at once rather than waited for.
    """
    for slot in slots:
        if slot.process.is_alive():
            slot.sender.put(pickle.dumps(("stop", 0, None)))
    deadline = time.monotonic() + grace
    for slot in slots:
        started = slot.ready or (not slot.conn.closed and slot.conn.poll())  # "ready" is its first word
        slot.process.join(max(0.0, deadline - time.monotonic()) if started else 0.0)
        for end in (slot.process.terminate, slot.process.kill):
            if slot.process.is_alive():
                end()
                slot.process.join(1.0)
        slot.sender.put(None)
        slot.conn.close()
    slots.clear()


@register_backend("process")
class ProcessBackend:
    """Owners on `workers` local processes (default: the idle cores less the server's threads).

    Args:
        workers: number of worker processes.
        threads: torch intra-op threads in each worker (1: the fits of small adapters
            gain nothing from more, and several workers share the cores).
    """

    recoverable = True
    device = "cpu"

    def __init__(self, workers: int | None = None, threads: int = 1):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self.threads = threads
        self._ctx = mp.get_context("spawn")  # fork would copy the server's threads and CUDA state
        self.slots: list[_Slot] = []
        # a forgotten close() (or an exception before it) still stops the workers, at the
        # latest when the interpreter exits
        self._finalizer = weakref.finalize(self, _stop, self.slots)
        self.slots.extend(self._start() for _ in range(workers or default_workers()))
        self.where: dict[str, int] = {}  # user -> slot
        self._what: dict[int, tuple[int, str]] = {}  # tag -> (slot, what the message is), until answered
        self._calls: dict[int, Any] = {}  # tag of a call -> its value once answered (None until then)
        self._ready: list[Reply] = []
        self._failure: WorkerError | None = None
        self._tags = 0
        self._seconds = 0.0  # unpacking, and packing on this thread; see transfer_seconds
        self._gone = 0.0  # packing time of replaced workers' senders

    @property
    def transfer_seconds(self) -> float:
        """Time this process spent packing and unpacking messages (pushes are packed by the
        sender threads, overlapping the server's next step)."""
        return self._seconds + self._gone + sum(s.sender.seconds for s in self.slots)

    @property
    def pids(self) -> list[int]:
        return [s.process.pid for s in self.slots]

    def pid_of(self, user: str) -> int:
        """The process id of the worker hosting `user`."""
        return self.slots[self.where[user]].process.pid

    def _start(self) -> _Slot:
        here, there = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_serve, args=(there, self.threads), daemon=True, name="colaft-fit")
        process.start()
        there.close()  # the worker holds the only other end: its death reads as end of file here
        sender = _Sender(here, Outgoing())
        sender.start()
        return _Slot(process, here, sender)

    # ------------------------------------------------------------- sending
    def _post(self, i: int, kind: str, what: str, obj: Any, here: bool = False) -> int:
        """Queue an envelope for worker i; `here`: pack it now, on this thread (errors raise here)."""
        sender = self.slots[i].sender
        self._tags += 1
        if here:
            start = time.perf_counter()
            try:
                sender.put(sender.pack(kind, self._tags, obj))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise ValueError(f"{what} cannot be sent to a worker process ({e}); the user's settings "
                                 "must be picklable: functions and classes importable, no lambdas") from e
            finally:
                self._seconds += time.perf_counter() - start
        else:
            sender.put((kind, self._tags, obj))
        self._what[self._tags] = (i, what)
        return self._tags

    def add(self, owner: Owner) -> None:
        i = min(range(len(self.slots)), key=lambda i: len(self.slots[i].users))  # least loaded
        self._post(i, "add", f"the owner of user {owner.user!r}", owner, here=True)
        self.slots[i].users.add(owner.user)
        self.where[owner.user] = i

    def remove(self, user: str) -> None:
        i = self.where.pop(user)
        self.slots[i].users.discard(user)
        self._post(i, "remove", f"removing user {user!r}", user, here=True)

    def submit(self, msg: Message) -> None:
        # packed by the sender thread: the packets are fresh tensors nobody changes meanwhile
        self._post(self.where[msg.user], "msg", describe(msg), msg)

    # ------------------------------------------------------------- receiving
    def replies(self, block: bool) -> list[Reply]:
        while True:
            self._poll(0)
            self._check()
            if self._ready or not block:
                out, self._ready = self._ready, []
                return out
            self._poll(POLL_SECONDS)

    def call(self, msg: Message) -> Any:
        tag = self._post(self.where[msg.user], "msg", describe(msg), msg, here=True)
        self._calls[tag] = None
        try:
            while tag in self._what:
                self._poll(POLL_SECONDS)
                self._check()
            return self._calls[tag]
        finally:
            self._calls.pop(tag, None)

    def _poll(self, timeout: float) -> None:
        """Read whatever the workers have sent, waiting up to `timeout` seconds for something."""
        if self._failure is not None:
            raise self._failure
        for slot in self.slots:
            if slot.sender.error:
                self._failure = WorkerError(f"packing a message for worker process {slot.process.pid} "
                                            f"failed:\n{slot.sender.error}")
                raise self._failure
        waitables = [s.conn for s in self.slots] + [s.process.sentinel for s in self.slots]
        ready = set(wait(waitables, timeout))
        for i, slot in enumerate(self.slots):
            if slot.conn in ready or not slot.process.is_alive():
                self._drain(i)

    def _drain(self, i: int) -> None:
        slot = self.slots[i]
        try:
            while not slot.broken and slot.conn.poll():
                self._take(i, pickle.loads(slot.conn.recv_bytes()))
        except (EOFError, OSError):  # its pipe closed, or a buffer it sent died with it
            slot.broken = True

    def _take(self, i: int, envelope: tuple) -> None:
        kind, tag, body = envelope
        slot = self.slots[i]
        if kind in ("ready", "release"):
            slot.ready = True
            if kind == "release":
                slot.sender.outgoing.release(tag)
            return
        _, what = self._what.pop(tag, (i, "a message"))
        if kind == "done":  # an owner added or removed
            return
        if kind == "error":
            self._failure = WorkerError(f"worker process {slot.process.pid} failed on {what}:\n{body}")
            raise self._failure
        start = time.perf_counter()
        value = slot.incoming.unpack(body)
        if body.buffer is not None:
            slot.sender.put(pickle.dumps(("release", body.buffer, None)))
        self._seconds += time.perf_counter() - start
        if tag in self._calls:
            self._calls[tag] = value
        else:
            self._ready.append(value)

    def _check(self) -> None:
        """Replace the first dead worker and raise WorkerLost with its users."""
        for i, slot in enumerate(self.slots):
            if slot.process.is_alive() and not slot.broken:
                continue
            self._drain(i)  # what it sent before it died still counts
            users = sorted(slot.users)
            why = f"worker process {slot.process.pid} " + (
                "closed its pipe" if slot.process.is_alive() else f"exited with code {slot.process.exitcode}")
            _stop([slot], grace=0.0)
            self._gone += slot.sender.seconds
            self.slots[i] = self._start()
            for user in users:
                self.where.pop(user, None)
            self._what = {t: (j, w) for t, (j, w) in self._what.items() if j != i}
            raise WorkerLost(users, why)

    def close(self) -> None:
        self._finalizer()
