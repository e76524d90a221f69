"""The pipeline between the server and a backend: each version applied once and in order, the staleness
bound, flush, recovery from a lost worker, the owners' state, closing.

The backend here is scripted: real owners answer every message at once, but a reply reaches the
pipeline only when the pipeline blocks for one (oldest first), so the server runs exactly as far
ahead as the bound lets it; the test can kill a user's worker, or deliver a reply a second time.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from colaft.backends import Message, Reply, Worker, WorkerLost
from colaft.packets import Packet
from colaft.pipeline import Pipeline
from colaft.users import FitConfig, Owner, Update


class Scripted:
    """A backend driven by the test (see the module's docstring)."""

    transfer_seconds = 0.0

    def __init__(self, recoverable: bool = False):
        self.recoverable = recoverable
        self.worker = Worker()
        self.held: list[Reply] = []  # answered, not yet delivered
        self.again: list[Reply] = []  # delivered once, to be delivered at the next look
        self.dead: set[str] = set()  # users whose worker died: their messages vanish until they are re-added
        self.lost: list[str] = []  # reported by WorkerLost at the next look
        self.closed = False

    def add(self, owner: Owner) -> None:
        self.dead.discard(owner.user)
        self.worker.add(owner)

    def remove(self, user: str) -> None:
        self.worker.remove(user)

    def submit(self, msg: Message) -> None:
        if msg.user not in self.dead:
            self.held.append(self.worker.handle(msg))

    def call(self, msg: Message):
        return self.worker.handle(msg)

    def replies(self, block: bool) -> list[Reply]:
        if self.lost:
            users, self.lost = self.lost, []
            raise WorkerLost(users, "killed by the test")
        out, self.again = self.again, []
        if block:
            assert self.held, "the pipeline waits for a reply that no message will bring"
            out.append(self.held.pop(0))
        return out

    def kill(self, user: str) -> None:
        """The worker of `user` dies: its owner and every reply it had not delivered are gone."""
        self.worker.remove(user)
        self.held = [r for r in self.held if r.user != user]
        self.dead.add(user)
        self.lost.append(user)

    def close(self) -> None:
        self.closed = True


def owner_of(user: str = "a", snapshots: bool = False, **fit) -> Owner:
    torch.manual_seed(0)  # every owner of a test starts from the same adapter
    config = FitConfig(**{"optimizer": "sgd", "lr": 0.1, "device": "cpu", **fit})
    return Owner(user, {"site": nn.Linear(3, 2)}, config, snapshots=snapshots)


def packets(step: int, user: str = "a") -> list[Packet]:
    """One server step's packets of `user`: 4 rows at one site."""
    g = torch.Generator().manual_seed(step)
    return [Packet("site", torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g), user)]


def pipeline(staleness: int = 0, users=("a",), recoverable: bool = False, **fit) -> tuple[Pipeline, list[Update]]:
    """A pipeline over a Scripted backend, one owner per user; the list collects the updates it applies."""
    applied: list[Update] = []
    pipe = Pipeline(Scripted(recoverable), applied.append, staleness)
    for user in users:
        def make(user=user) -> Owner:
            return owner_of(user, snapshots=recoverable, **fit)
        pipe.add(make(), make)
    return pipe, applied


def weights(update: Update) -> dict[str, torch.Tensor]:
    return update.states["site"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- versions and the staleness bound

def test_each_version_is_applied_once_and_in_order():
    pipe, applied = pipeline()
    for step in range(3):
        pipe.push("a", packets(step))
        pipe.settle()
    assert [u.version for u in applied] == [1, 2, 3]
    reference = owner_of()
    for step in range(3):
        reference.push(packets(step))
    assert same(weights(applied[-1]), reference.adapters["site"].state_dict())
    pipe.backend.again = [Reply("a", 2, applied[1])]  # a reply seen before (a replayed message answered again)
    pipe.settle()  # dropped by its number: nothing applied, and nothing more to wait for
    assert len(applied) == 3 and pipe.tracks["a"].outstanding == 0
    pipe.push("a", packets(3))
    pipe.backend.held[-1] = Reply("a", 4, applied[1])  # a new message answered with a version already applied
    pipe.settle()
    assert len(applied) == 3 and pipe.tracks["a"].outstanding == 0


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_the_server_runs_at_most_s_fits_ahead(staleness):
    pipe, applied = pipeline(staleness)
    for step in range(1, 6):
        pipe.push("a", packets(step))
        pipe.settle()
        assert pipe.tracks["a"].outstanding == min(step, staleness)
        assert [u.version for u in applied] == list(range(1, step - staleness + 1))  # step t's update from t + S
    assert pipe.stats["wait_seconds"] >= 0 and pipe.stats["update_bytes"] == sum(u.nbytes for u in applied)


def test_settle_waits_only_for_the_users_named():
    pipe, applied = pipeline(staleness=3, users=("a", "b"))
    pipe.push("a", packets(0, "a"))
    pipe.push("b", packets(0, "b"))
    pipe.settle(0, users=["b"])  # the oldest reply (a's) arrives first: taken on the way to b's
    assert [(u.user, u.version) for u in applied] == [("a", 1), ("b", 1)]
    pipe.push("a", packets(1, "a"))
    pipe.push("b", packets(1, "b"))
    pipe.settle(0, users=["a"])
    assert {u: t.outstanding for u, t in pipe.tracks.items()} == {"a": 0, "b": 1}


def test_a_skipped_fit_counts_its_version_but_applies_nothing():
    pipe, applied = pipeline()
    pipe.push("a", [Packet("site", torch.full((4, 3), math.nan), torch.zeros(4, 2), "a")])
    pipe.settle()
    pipe.push("a", packets(1))
    pipe.settle()
    assert pipe.stats["skipped_fits"] == 1 and [u.version for u in applied] == [2]
    assert pipe.tracks["a"].version == 2


# ---------------------------------------------------------------- flush

def test_flush_fits_the_partial_interval_of_the_users_named():
    pipe, applied = pipeline(users=("a", "b"), interval=2)
    pipe.push("a", packets(0, "a"))
    pipe.push("b", packets(0, "b"))
    pipe.settle()
    assert applied == []  # half an interval each: buffered, nothing fitted
    pipe.flush(["a"])
    assert [(u.user, u.version) for u in applied] == [("a", 1)]
    reference = owner_of(interval=2)
    reference.push(packets(0, "a"))
    assert same(weights(applied[0]), weights(reference.flush()))  # a one-step interval: that step's packets alone
    pipe.flush()  # b's half interval now; a has nothing buffered, so no new version of a
    assert [(u.user, u.version) for u in applied] == [("a", 1), ("b", 1)]
    assert all(t.outstanding == 0 for t in pipe.tracks.values())


# ---------------------------------------------------------------- recovery

def run_with_kills(kills: dict[int, str], steps: int = 6) -> tuple[Pipeline, list[Update]]:
    """`steps` pushes at S = 1, interval 2, on a recoverable backend; kills[t]: when, after push t."""
    pipe, applied = pipeline(staleness=1, recoverable=True, interval=2)
    for step in range(steps):
        pipe.push("a", packets(step))
        if kills.get(step):
            pipe.backend.kill("a")
        pipe.settle()
    pipe.flush()
    return pipe, applied


def test_a_lost_worker_loses_no_update_and_applies_none_twice():
    """Killed with a fit in flight and a half interval not yet snapshotted, then again later: the
    owner is rebuilt from its last snapshot, the messages since are replayed, replies already seen
    are dropped, and the run equals one without losses."""
    clean, expected = run_with_kills({})
    pipe, applied = run_with_kills({2: "a", 4: "a"})
    assert pipe.stats["recoveries"] == 2 and clean.stats["recoveries"] == 0
    assert [u.version for u in applied] == [u.version for u in expected] == [1, 2, 3]
    for got, want in zip(applied, expected):
        assert same(weights(got), weights(want))
    assert pipe.state("a")["version"] == 3
    # kept for a replay: the messages since the last snapshot, here the final flush (it fitted nothing)
    assert [m.kind for m in pipe.tracks["a"].log] == ["flush"]


def test_a_call_to_a_lost_worker_is_answered_after_recovery():
    pipe, applied = pipeline(recoverable=True)
    pipe.push("a", packets(0))
    pipe.settle()
    pipe.backend.kill("a")
    state = pipe.state("a")
    assert state["version"] == 1 and pipe.stats["recoveries"] == 1
    assert same(state["adapters"]["site"], weights(applied[0]))


# ---------------------------------------------------------------- the owners' state

def test_state_and_load_state_rewind_an_owner():
    pipe, applied = pipeline(staleness=1, scheduler="linear", total_steps=4)
    pipe.push("a", packets(0))
    saved = pipe.state("a")  # answered after the push: the owner after its first fit
    assert saved["version"] == 1 and [u.version for u in applied] == [1]
    lr_after_one = pipe.lr("a")
    for step in (1, 2):
        pipe.push("a", packets(step))
        pipe.settle()
    assert pipe.lr("a") < lr_after_one
    pipe.load_state("a", saved)
    assert pipe.tracks["a"].version == 1 and pipe.lr("a") == lr_after_one
    pipe.push("a", packets(1))  # the second step again, from the first fit's owner: the same update
    pipe.settle(0)
    assert applied[-1].version == 2 and same(weights(applied[-1]), weights(applied[1]))


# ---------------------------------------------------------------- closing, removing

def test_close_applies_the_fits_in_flight_unless_told_not_to_wait():
    for wait in (True, False):
        pipe, applied = pipeline(staleness=1)
        pipe.push("a", packets(0))
        pipe.settle()
        assert applied == []
        pipe.close(wait)
        assert pipe.backend.closed and len(applied) == int(wait)


def test_remove_answers_the_users_messages_first():
    pipe, applied = pipeline(staleness=1, users=("a", "b"))
    pipe.push("a", packets(0, "a"))
    pipe.remove("a")
    assert [u.user for u in applied] == ["a"] and list(pipe.tracks) == ["b"]
    assert "a" not in pipe.backend.worker.owners
