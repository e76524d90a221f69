"""Between the server and a backend: message numbers, versions, the staleness bound, recovery.

    server step t -> push(user, packets #seq) -> backend -> owner fits -> Reply(seq, Update v)
                  -> settle(S): wait until no user has more than S unanswered messages
                  -> apply Update v once (v > the version the server holds), in order

With S = 0 the server waits for every fit before its next step (exactly the synchronous
trajectory); with S = 1 it runs step t+1 while the fits of step t are in flight, so its
adapters are at most one version old. For a backend that can lose workers, every Update
carries the owner's whole state (a snapshot) and the pipeline keeps the messages sent since
the last snapshot: when a worker dies, its users' owners are rebuilt from their snapshots
and the messages replayed; replies already seen are dropped by number, updates by version,
so no update is lost or applied twice.

A user's fault - its fit raised on the worker, or its update could not be applied here (a
device the server cannot read, non-finite weights) - is kept in `faults` and raised as
UserFaults by `raise_faults`, once every other user's reply has been taken: one user's fault
never stops another's update.

Figures kept in `stats` (the Trainer's): wait_seconds (blocked on the staleness bound),
send_seconds (handing messages to the backend; inline: the fits themselves),
transfer_seconds (the backend serialising and deserialising, from the backend),
update_bytes and snapshot_bytes (tensor bytes that came back), recoveries, skipped_fits.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from colaft.backends import Backend, Message, Reply, WorkerLost
from colaft.packets import Packet
from colaft.users import Owner, Update


class UserFaults(RuntimeError):
    """Some users' fits or updates failed (user -> why); every other user's step is done.

    The faulty users' owners are in an unknown state: remove them (or stop)."""

    def __init__(self, faults: dict[str, str], traces: dict[str, str] | None = None):
        super().__init__("; ".join(f"user {u!r}: {why}" for u, why in faults.items()))
        self.faults, self.traces = faults, traces or {}


@dataclass
class _Track:
    """The server's view of one user's owner."""

    rebuild: Callable[[], Owner]  # a fresh owner with this user's adapters and settings
    snapshot: dict  # the owner's state after the last answered message that carried one
    lr: float  # the learning rate the owner's next fit uses
    sent: int = 0  # messages sent
    answered: int = 0  # replies seen (replies arrive in message order)
    version: int = 0  # the latest version applied on the server
    log: list[Message] = field(default_factory=list)  # messages sent after the snapshot

    @property
    def outstanding(self) -> int:
        return self.sent - self.answered


class Pipeline:
    """Args:
        backend: where the owners run.
        apply: `apply(update)` loads an update's weights into the server (called once per version).
        staleness: S, the number of unanswered messages per user the server may run ahead of.
    """

    def __init__(self, backend: Backend, apply: Callable[[Update], None], staleness: int = 0,
                 stats: dict | None = None):
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, not {staleness}")
        self.backend, self.apply, self.staleness = backend, apply, staleness
        self.tracks: dict[str, _Track] = {}
        self.faults: dict[str, str] = {}  # user -> why its fit or update failed, until raised
        self.traces: dict[str, str] = {}
        self.stats = stats if stats is not None else {}
        for k, v in {"recoveries": 0, "wait_seconds": 0.0, "send_seconds": 0.0, "transfer_seconds": 0.0,
                     "update_bytes": 0, "snapshot_bytes": 0, "skipped_fits": 0}.items():
            self.stats.setdefault(k, v)

    def add(self, owner: Owner, rebuild: Callable[[], Owner]) -> None:
        """Start tracking `owner` and place it on the backend."""
        snapshot = owner.state() if self.backend.recoverable else {}
        self.tracks[owner.user] = _Track(rebuild, snapshot, owner.lr)
        self.backend.add(owner)

    def remove(self, user: str) -> None:
        self.settle(0, users=[user])
        self.backend.remove(user)
        del self.tracks[user]
        self.faults.pop(user, None)
        self.traces.pop(user, None)

    def fault(self, user: str, why: str, trace: str | None = None) -> None:
        """Blame `user` for a failure of its own (kept until `raise_faults`)."""
        self.faults.setdefault(user, why)
        if trace:
            self.traces.setdefault(user, trace)

    def raise_faults(self) -> None:
        """Raise UserFaults for the faults kept since the last call, if any."""
        if self.faults:
            faults, traces, self.faults, self.traces = self.faults, self.traces, {}, {}
            raise UserFaults(faults, traces)

    def lr(self, user: str) -> float:
        return self.tracks[user].lr

    # ------------------------------------------------------------- messages
    def push(self, user: str, packets: list[Packet]) -> None:
        self._send(Message("push", user, packets=packets))

    def flush(self, users: list[str] | None = None) -> None:
        """Fit every user's (or only `users'`) partial interval now and wait until those updates are applied."""
        users = list(self.tracks) if users is None else users
        for user in users:
            self._send(Message("flush", user))
        self.settle(0, users=users)

    def state(self, user: str) -> dict:
        """The owner's whole state, once every message sent to it is answered."""
        return self._call(Message("state", user))

    def load_state(self, user: str, state: dict) -> None:
        """Replace the owner's whole state (a checkpoint's), once its messages are answered."""
        self._call(Message("load", user, state=state))
        track = self.tracks[user]
        track.version, track.log = state["version"], []
        if self.backend.recoverable:
            track.snapshot = state
        track.lr = state["optimizer"]["param_groups"][0]["lr"]

    def _call(self, msg: Message) -> Any:
        """A synchronous request after the user's messages; asked again if a worker is lost meanwhile."""
        while True:
            self.settle(0, users=[msg.user])
            try:
                return self.backend.call(msg)
            except WorkerLost as lost:
                self._recover(lost.users)

    def _send(self, msg: Message) -> None:
        track = self.tracks[msg.user]
        track.sent += 1
        msg.seq = track.sent
        if self.backend.recoverable:
            track.log.append(msg)
        start = time.perf_counter()
        try:
            self.backend.submit(msg)
        except BaseException:  # not sent: no reply to wait for
            track.sent -= 1
            if track.log and track.log[-1] is msg:
                track.log.pop()
            raise
        self.stats["send_seconds"] += time.perf_counter() - start
        self.stats["transfer_seconds"] = getattr(self.backend, "transfer_seconds", 0.0)

    # ------------------------------------------------------------- replies
    def settle(self, staleness: int | None = None, users: list[str] | None = None) -> None:
        """Apply the replies that arrived; wait while a user has more than `staleness` unanswered."""
        bound = self.staleness if staleness is None else staleness
        tracks = [self.tracks[u] for u in users] if users is not None else list(self.tracks.values())
        self._receive(block=False)
        start = time.perf_counter()
        while any(t.outstanding > bound for t in tracks):
            self._receive(block=True)
        self.stats["wait_seconds"] += time.perf_counter() - start
        self.stats["transfer_seconds"] = getattr(self.backend, "transfer_seconds", 0.0)

    def _receive(self, block: bool) -> None:
        try:
            replies = self.backend.replies(block)
        except WorkerLost as lost:
            self._recover(lost.users)
            return
        for reply in replies:
            self._take(reply)

    def _take(self, reply: Reply) -> None:
        track = self.tracks.get(reply.user)
        if track is None or reply.seq <= track.answered:
            return  # a replayed message answered again, or a removed user
        track.answered = reply.seq
        if reply.error is not None:
            self.fault(reply.user, reply.error, reply.trace)
            return
        update = reply.update
        if update is None:
            return
        if update.snapshot is not None:
            self.stats["snapshot_bytes"] += tensor_bytes(update.snapshot)
            track.snapshot = update.snapshot
            track.log = [m for m in track.log if m.seq > reply.seq]
        track.lr = update.lr
        if update.version <= track.version:
            return
        track.version = update.version
        if update.states is None:
            self.stats["skipped_fits"] += 1
            return
        self.stats["update_bytes"] += update.nbytes
        try:
            self.apply(update)
        except Exception as e:  # noqa: BLE001 - this user's weights (e.g. on a device the server cannot read)
            self.fault(reply.user, f"its update could not be applied: {type(e).__name__}: {e}")

    def _recover(self, users: list[str]) -> None:
        """Rebuild the lost users' owners from their snapshots and replay what they had not answered."""
        self.stats["recoveries"] += 1
        for user in users:
            track = self.tracks.get(user)
            if track is None:
                continue
            owner = track.rebuild()
            owner.load_state(track.snapshot)
            self.backend.add(owner)
            for msg in track.log:
                self.backend.submit(msg)

    def close(self, wait: bool = True) -> None:
        """Stop the backend; with `wait`, once the fits in flight are answered and applied."""
        try:
            if wait:
                self.settle(0)
        finally:
            self.backend.close()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in nested dicts, lists, tuples and packets (a snapshot, a message)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Packet):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
