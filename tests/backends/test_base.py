"""Every backend keeps the Backend interface's promises: fits exactly as inline and backprop, staleness as
specified, no update lost or applied twice when a worker dies, worker errors raised in the server; the registry.

Worker processes and Ray actors import colaft when they start (a few seconds each), so every
test starts few of them; the Ray tests share one private Ray instance (module scope).
"""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from backend_helpers import KINDS, build, states
from conftest import ARCHS, Backprop, flat_state, make_opt, max_rel_err, text_batch

from colaft import ColaConfig, Packet, Trainer
from colaft.backends import BACKENDS, make_backend
from colaft.backends.process import ProcessBackend
from colaft.pipeline import UserFaults

REMOTE = ["process", "ray"]


# ---------------------------------------------------------------- backends under test

def kill(backend, user: str) -> None:
    """Kill the worker hosting `user` the hard way: SIGKILL of the process, ray.kill of the actor."""
    if isinstance(backend, ProcessBackend):
        os.kill(backend.pid_of(user), signal.SIGKILL)
    else:
        import ray
        ray.kill(backend.actor_of(user))


def batch(step: int, users: list[str]) -> tuple[dict, list[str]]:
    rows = 2 * len(users)
    lengths = [3 + (step + i) % 4 for i in range(rows)]  # padding differs by row
    return text_batch(step, "lm", lengths), [users[(i + step) % len(users)] for i in range(rows)]


def train(trainer: Trainer, steps: int, users: list[str], hook=None) -> Trainer:
    for step in range(steps):
        trainer.step(*batch(step, users))
        if hook:
            hook(step)
    trainer.flush()
    return trainer


def start(backend, users=("user.0", "user.1"), interval2: str | None = "user.2", **kw) -> Trainer:
    """A trainer over `users`, plus `interval2` added late with interval 2 (an mlp adapter)."""
    trainer = Trainer(build(users), "adamw", lr=1e-2, backend=backend, **kw)
    if interval2:
        trainer.add_user(interval2, ColaConfig(target_modules=ARCHS["llama"][1], **KINDS[interval2]), interval=2)
    return trainer


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_remote_fits_equal_inline_and_backprop(remote):
    """S = 0, three users of mixed adapter types on two workers, one user with interval 2."""
    users = ["user.0", "user.1", "user.2"]
    ref = Backprop(ARCHS["llama"][0](), dict(build().user_adapters("user.0")), make_opt("adamw", 1e-2))
    inline = train(start("inline"), 5, users)
    backend = remote(2)
    got = train(start(backend), 5, users)
    assert max_rel_err(states(got), states(inline)) == 0.0  # bit for bit
    assert len({backend.where[u] for u in users}) == 2  # the users were spread over both workers
    assert got.stats["version"] == inline.stats["version"] == 5 + 5 + 3  # two fits of 2 steps and a flush
    for step in range(5):  # user.0 alone against backprop on its rows
        b, rows = batch(step, users)
        mine = [i for i, u in enumerate(rows) if u == "user.0"]
        ref.step({k: v[mine] for k, v in b.items()})
    assert max_rel_err(flat_state(got.model.user_adapters("user.0")), flat_state(ref.adapters)) <= 1e-5
    assert got.owner_state("user.2")["version"] == 3
    assert got.stats["transfer_seconds"] > 0 and got.stats["snapshot_bytes"] > 0


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_staleness_one_sends_the_next_step_before_the_fit_is_done(remote):
    """With S = 1 the server returns from a step while its fit is still in flight; with one
    user that is exactly the delayed inline trajectory (updates one step late, every step)."""
    runs = []
    for backend in (make_backend("inline", delayed=True), remote(1)):
        trainer = Trainer(build(["user.0"]), "adamw", lr=1e-2, backend=backend, staleness=1, fit_steps=20)
        track = trainer.pipeline.tracks["user.0"]
        trainer.step(text_batch(0))
        assert track.outstanding == 1 and trainer.stats["version"] == 0  # not waited for
        for s in range(1, 4):
            trainer.step(text_batch(s))
            assert track.outstanding == 1 and trainer.stats["version"] == s
        trainer.flush()
        assert track.outstanding == 0 and trainer.stats["version"] == 4
        runs.append(trainer)
    assert max_rel_err(states(runs[1]), states(runs[0])) == 0.0


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_killed_workers_lose_no_update_and_apply_none_twice(remote):
    """A worker killed between steps (two users on it, one mid-interval) and another killed
    with a fit in flight: the run equals an uninterrupted one."""
    users = ["user.0", "user.1", "user.2"]
    inline = train(start("inline"), 7, users)
    backend = remote(2)
    trainer = start(backend)
    assert backend.where["user.0"] == backend.where["user.2"] != backend.where["user.1"]
    submit, killed = backend.submit, []

    def submit_then_kill(msg):  # kill user.1's worker right after its push #5 went out
        submit(msg)
        if msg.user == "user.1" and msg.seq == 5 and not killed:
            killed.append(msg.seq)
            kill(backend, "user.1")
    backend.submit = submit_then_kill

    def between(step):
        if step == 2:  # user.2 holds one buffered push (interval 2): it must be replayed
            kill(backend, "user.0")
    train(trainer, 7, users, hook=between)
    assert killed == [5] and trainer.stats["recoveries"] == 2
    assert max_rel_err(states(trainer), states(inline)) == 0.0
    assert trainer.stats["version"] == inline.stats["version"]  # every update applied once
    assert {u: t.version for u, t in trainer.pipeline.tracks.items()} == {"user.0": 7, "user.1": 7, "user.2": 4}


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_non_finite_packets_never_reach_an_adapter(remote):
    scale = [1.0]
    loss_fn = lambda out, b: out.loss * scale[0]
    runs = []
    for backend in ("inline", remote(1)):
        trainer = Trainer(build(["user.0"]), "adamw", lr=1e-2, backend=backend, loss_fn=loss_fn)
        for s in range(4):
            scale[0] = float("nan") if s == 2 else 1.0
            loss = trainer.step(text_batch(s))
            assert math.isfinite(loss) == (s != 2)
        assert trainer.stats["skipped_fits"] == 1 and trainer.stats["version"] == 3
        runs.append(trainer)
    assert max_rel_err(states(runs[1]), states(runs[0])) == 0.0
    state = runs[1].owner_state()
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_an_exception_in_a_fit_is_its_users_fault_alone(remote):
    """A fit that raises on the worker is answered as its user's fault (UserFaults, with the
    worker's traceback for the log); the other user's step is done and the backend goes on."""
    for backend in ("inline", remote(1)):
        trainer = Trainer(build(["user.0", "user.1"]), backend=backend)
        trainer.step(*batch(0, ["user.0", "user.1"]))
        bad = Packet("no.such.site", torch.randn(3, 16), torch.randn(3, 16), "user.0")
        trainer.pipeline.push("user.0", [bad])
        trainer.pipeline.settle()  # answered: no hang, and nothing raised before every reply is taken
        with pytest.raises(UserFaults, match=r"user 'user.0': push #2 of user 'user.0' failed: KeyError.*no\.such"
                           ) as e:
            trainer.pipeline.raise_faults()
        assert list(e.value.faults) == ["user.0"] and "Traceback" in e.value.traces["user.0"]
        trainer.pipeline.raise_faults()  # raised once
        version = trainer.stats["version"]
        trainer.remove_user("user.0")
        trainer.step(*batch(1, ["user.1"]))  # the other user trains on, on the same workers
        assert trainer.stats["version"] == version + 1
        trainer.close()


# ---------------------------------------------------------------- the registry

def test_backend_registry():
    assert set(BACKENDS) >= {"inline", "process", "ray"}
    with pytest.raises(ValueError, match="unknown backend 'carrier-pigeon'"):
        make_backend("carrier-pigeon")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ProcessBackend(workers=0)
