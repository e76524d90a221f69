"""Where the owners' fits run: one small interface, one file per backend, a string-keyed registry.

A backend hosts Owners (colaft.users) on workers and carries Messages to them in order,
per user. Every worker runs the same `Worker.handle`; backends differ only in transport:

    inline   in the server's process, on any torch device
    process  local worker processes (torch.multiprocessing; tensors through shared memory)
    ray      Ray actors, on this machine or an existing cluster (tensors through the object store)

Versions, staleness and recovery are not a backend's business (see colaft.pipeline): a
backend that loses a worker starts a new one and raises WorkerLost naming the users it
hosted; the pipeline re-creates their owners from snapshots and replays their messages.
Adding a backend means one new file that calls `register_backend`.
"""
from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from colaft.packets import Packet
from colaft.users import Owner, Update


@dataclass
class Message:
    """A request to the owner of `user`, answered by a Reply (push, flush) or a value (state, load)."""

    kind: str  # "push" | "flush" | "state" | "load"
    user: str
    seq: int = 0  # the pipeline's number of this message, per user (push, flush)
    packets: list[Packet] | None = None  # push: one server step's packets of this user
    state: dict | None = None  # load: the owner's whole state (Owner.state)


@dataclass
class Reply:
    user: str
    seq: int  # the Message this answers
    update: Update | None  # None: the packets were buffered (interval) or nothing was pending
    error: str | None = None  # the fit raised: "Type: message" (the owner's state is then unknown)
    trace: str | None = None  # and its traceback, for the server's log


class WorkerLost(RuntimeError):
    """A worker died; the backend has started a replacement with no owner on it."""

    def __init__(self, users: list[str], why: str):
        super().__init__(f"a worker hosting {len(users)} user(s) was lost: {why}")
        self.users = users


class WorkerError(RuntimeError):
    """A worker raised outside any one owner's fit (unpacking a message, a state request); the
    text holds the worker's traceback. Not recoverable by replaying: the same message would
    fail again. (A fit that raises is its user's fault alone: a Reply with `error`.)"""


class Worker:
    """What runs on every worker: the owners placed there and the handling of messages."""

    def __init__(self):
        self.owners: dict[str, Owner] = {}

    def add(self, owner: Owner) -> None:
        self.owners[owner.user] = owner

    def remove(self, user: str) -> None:
        self.owners.pop(user, None)

    def handle(self, msg: Message) -> Reply | Any:
        owner = self.owners[msg.user]
        if msg.kind in ("push", "flush"):
            # a fit that raises (its device, its settings, its packets) is its user's fault: the
            # reply says so and the worker goes on serving the other users
            try:
                return Reply(msg.user, msg.seq, owner.push(msg.packets) if msg.kind == "push" else owner.flush())
            except Exception as e:  # noqa: BLE001 - answered, for the server to blame the user
                error = "".join(traceback.format_exception_only(type(e), e)).strip()
                return Reply(msg.user, msg.seq, None, error=f"{describe(msg)} failed: {error}",
                             trace=traceback.format_exc())
        if msg.kind == "state":
            return owner.state()
        if msg.kind == "load":
            owner.load_state(msg.state)
            return None
        raise ValueError(f"unknown message kind {msg.kind!r}")


def describe(msg: Message) -> str:
    """The message in words, for errors: 'push #3 of user 'a''."""
    number = f" #{msg.seq}" if msg.kind in ("push", "flush") else ""
    return f"{msg.kind}{number} of user {msg.user!r}"


class Backend(Protocol):
    """The transport between the server and the owners."""

    recoverable: bool
    """Whether a worker can be lost (then owners send snapshots, so that their work can be redone)."""
    device: str | None
    """Where the workers' owners train (None: where the server's adapters are)."""
    transfer_seconds: float
    """Server time spent serialising messages and deserialising replies so far (0 in process)."""

    def add(self, owner: Owner) -> None:
        """Place `owner` on a worker (its user's messages go there from now on)."""

    def remove(self, user: str) -> None:
        """Drop the owner of `user` from its worker."""

    def submit(self, msg: Message) -> None:
        """Send a push or flush; its Reply comes back from `replies`. Never blocks on the fit."""

    def replies(self, block: bool) -> list[Reply]:
        """Replies that have arrived; with `block`, wait for at least one.

        Raises:
            WorkerLost: a worker died; its replacement hosts no owner yet.
            WorkerError: a worker raised; the backend is not usable any more.
        """

    def call(self, msg: Message) -> Any:
        """A synchronous request (state, load), answered after the user's earlier messages.

        Raises:
            WorkerLost, WorkerError: as `replies`; the call was not answered.
        """

    def close(self) -> None:
        """Stop every worker; nothing is left running."""


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register_backend(name: str) -> Callable:
    """Class decorator: make a backend available under `name`."""
    def add(cls):
        BACKENDS[name] = cls
        return cls
    return add


def make_backend(spec: str | Backend, **options) -> Backend:
    """A backend by name (`options` go to its constructor), or `spec` itself if it is one."""
    if not isinstance(spec, str):
        return spec
    if spec not in BACKENDS:
        raise ValueError(f"unknown backend {spec!r}; backends: {', '.join(BACKENDS)}")
    return BACKENDS[spec](**options)
