"""The server's side of a job whose fits run on the user's device (`"fit": "client"`).

    engine step t -> channel.offer(packets of the job's rows)   message #t, kept until fitted
    client        -> GET  .../fit/packets?after=SEQ  (long poll) -> the messages after SEQ
                  -> Owner.push / flush on its own CPU
                  -> POST .../fit/updates (version v, seq, the owner's whole state)
    channel       -> accepts v once (v = the applied version + 1, seq = the next fit's message),
                     keeps the state as the job's snapshot, drops the messages it covers
    engine        -> applies accepted updates between steps; the job's rows enter a batch
                     only while its fits in flight are within the staleness bound and its
                     client was seen lately: otherwise the job waits and other jobs go on

Nothing here blocks the engine's thread: the engine asks `runnable()` before forming a
batch and takes accepted updates with `take_updates()`. A long poll (`poll`) is a coroutine
awaiting an asyncio event that the engine's thread sets through the poll's loop
(`call_soon_threadsafe`): a waiting client costs no thread and never waits on the engine.
A client that dies loses nothing: it starts again from the snapshot (the state after the
last applied update) and is sent the messages after it again; a duplicate or stale push is
refused (409), so no update is applied twice.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from colaft.packets import Packet, packets_to_bytes


@dataclass
class _Message:
    seq: int
    kind: str  # "push" (one step's packets) | "flush" (fit the partial interval at the job's end)
    packets: list[Packet]
    ends_fit: bool  # the owner fits on this message (so an update must answer it)


@dataclass
class Accepted:
    """An update the channel accepted; the engine loads `states` (None: a skipped fit)."""

    version: int
    seq: int
    states: dict[str, dict[str, torch.Tensor]] | None


SEEN_EVERY = 5.0
"""Seconds between a waiting pull's checks: each counts its client as seen (a waiting client is alive)."""


class Refused(Exception):
    """A pull or push the channel cannot take: `code` says why; the API answers `status` naming
    `param` (409 and the version, unless the body itself is bad)."""

    def __init__(self, code: str, message: str, status: int = 409, param: str = "version"):
        super().__init__(message)
        self.code, self.status, self.param = code, status, param


class Channel:
    """One client-fit job's messages, snapshot and versions, shared by the engine and the API.

    Args:
        job_id: the job (its user id on the ColaModel).
        interval, staleness: the job's I and S.
        state: the owner's state to start from (no buffered packets), at `version` and
            covering the messages up to `seq`.
        info: how the client builds the owner (sites, ColaConfig, FitConfig; see `client_info`).
        wake: called when an update is accepted (wakes the engine).
        user: the job's owner (the API finds a running job's channel without the database).
    """

    def __init__(self, job_id: str, interval: int, staleness: int, state: dict, seq: int, info: dict,
                 wake: Callable[[], None], user: str | None = None):
        self.job_id, self.interval, self.staleness, self.info, self.wake = job_id, interval, staleness, info, wake
        self.user = user
        self.shapes = {site: {k: tuple(v.shape) for k, v in params.items()}
                       for site, params in state["adapters"].items()}
        self.elements = sum(math.prod(shape) for params in self.shapes.values() for shape in params.values())
        """The adapters' values: what the size of an update (the owner's whole state) follows."""
        self.lock = threading.Lock()  # the engine's thread and the API's loop share the channel
        self.state = state  # the snapshot: the owner after the last accepted update
        self.version = state["version"]  # accepted versions (the engine applies them in order)
        self.acked = self.sent = seq  # messages covered by the snapshot; messages offered
        self.since_fit = 0  # pushes offered since the last fit point
        self.messages: dict[int, _Message] = {}
        self.accepted: list[Accepted] = []
        self.last_seen = time.monotonic()  # the client's last pull or push (admission counts as one)
        self.connected = False  # a client has pulled since the job was admitted
        self.final: str | None = None  # the job's status once it is over
        self._cache: dict[tuple, bytes] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()  # the polls waiting now

    def _notify(self) -> None:
        """Wake every waiting poll (the caller holds `lock`) through its loop (one call per loop,
        whatever the number of polls)."""
        loops: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for loop, event in self._waiters:
            loops.setdefault(loop, []).append(event)
        for loop, events in loops.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the loop is closed: nobody waits there any more
                pass

    # ------------------------------------------------------------- the engine's side
    def offer(self, kind: str, packets: list[Packet]) -> None:
        """A new message: one step's packets ("push"), or "flush" at the end of the job."""
        with self.lock:
            self.since_fit += kind == "push"
            ends_fit = self.since_fit >= self.interval or (kind == "flush" and self.since_fit > 0)
            if ends_fit:
                self.since_fit = 0
            self.sent += 1
            self.messages[self.sent] = _Message(self.sent, kind, packets, ends_fit)
            self._notify()

    @property
    def pending_steps(self) -> int:
        """Pushes offered after the last fit point (a flush makes the owner fit them)."""
        return self.since_fit

    def fits_in_flight(self) -> int:
        """Fits sent and not yet answered, plus answered ones the engine has not applied yet."""
        with self.lock:
            return sum(m.ends_fit for m in self.messages.values()) + len(self.accepted)

    def runnable(self, timeout: float) -> bool:
        """May the job's rows enter the next batch: its fits in flight within the bound, its client seen lately."""
        return self.fits_in_flight() <= self.staleness and not self.gone(timeout)

    def gone(self, timeout: float) -> bool:
        return time.monotonic() - self.last_seen > timeout

    def take_updates(self) -> list[Accepted]:
        with self.lock:
            out, self.accepted = self.accepted, []
            return out

    def idle(self) -> bool:
        """Every message is answered and every accepted update taken: the snapshot is the whole truth."""
        with self.lock:
            return self.acked == self.sent and not self.accepted

    def close(self, status: str) -> None:
        """The job is over (`status`): long polls return, and pulls say so from now on."""
        with self.lock:
            self.final = status
            self.messages.clear()
            self._notify()

    # ------------------------------------------------------------- the API's side
    def seen(self) -> None:
        self.last_seen = time.monotonic()
        self.connected = True

    async def poll(self, after: int, wait: float, version: int | None = None) -> tuple[list[_Message], bool]:
        """The messages after `after`, waiting up to `wait` s for one; (messages, job over).
        `version`: the client's; one the server does not hold (the server went back to a
        checkpoint, another client pushed meanwhile) makes the client start again from fit/state.
        It waits on an asyncio event, set from the engine's thread through this loop, so a
        waiting poll holds no thread. Cancelled (its client went away), it leaves nothing behind."""
        deadline = time.monotonic() + wait
        loop = asyncio.get_running_loop()
        while True:
            waiter = (loop, asyncio.Event())
            with self.lock:
                answer = self._answer(after, version)
                if answer is not None:
                    return answer
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], False
                self._waiters.add(waiter)  # under the lock: a message offered from now on sets it
            try:
                await asyncio.wait_for(waiter[1].wait(), min(left, SEEN_EVERY))
            except TimeoutError:
                pass
            finally:
                with self.lock:
                    self._waiters.discard(waiter)

    def _answer(self, after: int, version: int | None) -> tuple[list[_Message], bool] | None:
        """What a pull answers now (the caller holds `lock`), or None: nothing new yet."""
        self.seen()
        if self.final is not None:
            return [], True
        if not self.acked <= after <= self.sent or (version is not None and version != self.version):
            raise Refused("resync", f"the server holds version {self.version} and messages "
                                    f"{self.acked + 1}..{self.sent}, not version {version} after "
                                    f"message {after}: fetch fit/state and start from it")
        if self.sent > after:
            return [self.messages[s] for s in range(after + 1, self.sent + 1)], False
        return None

    def body(self, messages: list[_Message]) -> bytes:
        """The messages' packets, serialised once (colaft.packets' safetensors form)."""
        key = tuple(m.seq for m in messages)
        with self.lock:
            data = self._cache.get(key)
        if data is None:
            data = packets_to_bytes([p for m in messages for p in m.packets])
            with self.lock:
                self._cache = {key: data}  # a retried pull gets the same bytes; older ones are dropped
        return data

    def push(self, version: int, seq: int, state: dict, skipped: bool) -> None:
        """Accept the update `version` answering message `seq`, or raise Refused."""
        with self.lock:
            self.seen()
            self._expect(version, seq, state)
        self._check(state)  # its tensors are checked without the lock: a poll never waits on them
        with self.lock:
            self._expect(version, seq, state)  # again: another push may have been taken meanwhile
            self.version, self.acked, self.state = version, seq, state
            for s in [s for s in self.messages if s <= seq]:
                del self.messages[s]
            self.accepted.append(Accepted(version, seq, None if skipped else state["adapters"]))
            self._notify()
        self.wake()

    def _expect(self, version: int, seq: int, state: dict) -> None:
        """Refused unless `version` answering `seq` is the update the channel waits for (the caller holds `lock`)."""
        if self.final is not None:
            raise Refused("job_finished", f"the job has {self.final}: no update is taken")
        if version <= self.version:
            raise Refused("duplicate_update", f"version {version} is already applied (the server holds "
                                              f"version {self.version}); it is not applied again")
        fits = [m.seq for m in self.messages.values() if m.ends_fit]
        if version != self.version + 1 or not fits or seq != fits[0]:
            expected = f"version {self.version + 1} answering message {fits[0]}" if fits else \
                f"no update before message {self.acked + 1} is fitted"
            raise Refused("unexpected_update", f"version {version} for message {seq}: the server expects "
                                               f"{expected}; fetch fit/state and start from it")
        if int(state["version"]) != version:
            raise Refused("unexpected_update", f"the state is at version {state['version']}, not {version}")

    def _check(self, state: dict) -> None:
        adapters = state["adapters"]
        if not isinstance(adapters, dict) or adapters.keys() != self.shapes.keys():
            raise Refused("invalid_update", "the state's adapters are not this job's sites")
        for site, shapes in self.shapes.items():
            got = adapters[site]
            if not isinstance(got, dict) or got.keys() != shapes.keys() or any(
                    not isinstance(got[k], torch.Tensor) or tuple(got[k].shape) != shape
                    or not got[k].is_floating_point() for k, shape in shapes.items()):
                raise Refused("invalid_update", f"the state's adapter at {site} does not fit this job's")
        # the adapters and the optimizer's moments only: buffered packets may be non-finite (the
        # server's own; the owner skips their fit), and the client cannot change them
        bad = _non_finite(adapters, "adapters") or _non_finite(state.get("optimizer", {}), "optimizer")
        if bad is not None:  # taken, they would be the job's adapters: NaN outputs, a NaN adapter at the end
            raise Refused("non_finite_update", f"the state's tensor {bad} holds NaN or Inf; the update is "
                                               "not applied (the job goes on from its current version)",
                          400, "body")


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


def _non_finite(obj, path: str) -> str | None:
    """The path of the first floating tensor in `obj` (nested dicts/lists) holding NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        return path if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    for key, value in items:
        bad = _non_finite(value, f"{path}.{key}")
        if bad is not None:
            return bad
    return None


def client_info(cola, trainer, user: str) -> dict:
    """What a client needs to build the user's Owner: each site's spec and adapter, the
    ColaConfig and the FitConfig (its device is the client's choice)."""
    sites = {}
    for name, adapter in cola.user_adapters(user).items():
        site = cola.site(name)
        sites[name] = {"spec": dataclasses.asdict(site.spec), "head": site.is_head,
                       "bias": getattr(adapter, "bias", None) is not None}
    fit = dataclasses.asdict(trainer.user_fit[user])
    fit.pop("device")
    return {"sites": sites, "cola_config": cola.user_configs[user].to_dict(), "fit_config": fit}
