"""colaft.users: an adapter owner (trainable copies, a buffer fitted every `interval` server
steps, its whole state, pickling) and FitConfig (validation, the learning-rate schedule counted
in optimizer steps)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import flat_state, max_rel_err, randomize_, text_batch
from torch import nn
from users_helpers import build_users  # test_backends.py imports build_users from here too

from colaft import ColaConfig, FitConfig, Owner, Packet, Trainer, server_step
from colaft.adapters import SiteSpec, build_adapter
from colaft.users import Update, optimizer_and_schedule

SPEC = SiteSpec("linear", 6, 5)


def server_adapters(seed: int = 0) -> dict[str, nn.Module]:
    """Two sites' frozen server adapters (lowrank, mlp), non-zero."""
    out = {}
    for i, name in enumerate(["lowrank", "mlp"]):
        adapter = build_adapter(name, SPEC, ColaConfig(target_modules=["x"], adapter=name, rank=3, hidden=4))
        out[f"site.{i}"] = randomize_(adapter, std=0.2, seed=seed + i).requires_grad_(False)
    return out


def packets(seed: int, n: int = 4) -> list[Packet]:
    """One server step's packets of the user "ann": n rows at each site."""
    g = torch.Generator().manual_seed(seed)
    return [Packet(site, torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g), "ann")
            for site in ("site.0", "site.1")]


def states_of(adapters: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in a.state_dict().items()} for n, a in adapters.items()}


def assert_states_equal(got, want) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].keys() == want[n].keys() and all(torch.equal(got[n][k], want[n][k]) for k in want[n]), n


# ---------------------------------------------------------------- FitConfig

def test_fit_config_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; built in: adamw, adam, sgd \(or pass a class\)"):
        FitConfig(optimizer="lion")
    with pytest.raises(ValueError, match="dtype 'int8': use one of float32, bfloat16, float16, float64"):
        FitConfig(dtype="int8")
    with pytest.raises(ValueError, match="scheduler 'linear' with warm-up needs total_steps"):
        FitConfig(scheduler="linear")
    with pytest.raises(ValueError, match="scheduler 'constant' with warm-up needs total_steps"):
        FitConfig(warmup_ratio=0.1)
    for field, value in [("lr", 0.0), ("weight_decay", -1.0), ("interval", 0), ("fit_steps", 0), ("warmup_ratio", 1.5),
                         ("total_steps", 0), ("optimizer_kwargs", "momentum=0.9")]:
        with pytest.raises(ValueError, match=field):
            FitConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown optimizer"):
        FitConfig().replace(optimizer="lion")  # a changed copy is checked too
    assert FitConfig(optimizer=torch.optim.RMSprop).optimizer is torch.optim.RMSprop  # any optimizer class
    assert FitConfig(scheduler="cosine", total_steps=10).replace(lr=1.0).lr == 1.0


def test_the_schedule_counts_optimizer_steps():
    """10 server steps, a fit every 2, 3 optimizer steps a fit: 15 optimizer steps, 3 of them warm-up (20%)."""
    params = [nn.Parameter(torch.zeros(2))]
    config = FitConfig(optimizer="sgd", lr=1.0, scheduler="linear", warmup_ratio=0.2, total_steps=10, interval=2,
                       fit_steps=3, optimizer_kwargs=dict(momentum=0.5))
    optimizer, scheduler = optimizer_and_schedule(params, config)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.5
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert lrs[3:] == pytest.approx([(15 - k) / 12 for k in range(3, 15)])  # linear decay from the peak
    assert optimizer.param_groups[0]["lr"] == 0.0

    halve = FitConfig(optimizer=torch.optim.Adam, lr=0.2, weight_decay=0.1,
                      scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5))
    optimizer, scheduler = optimizer_and_schedule(params, halve)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["weight_decay"] == 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------- Owner

def test_an_owner_trains_copies_and_answers_every_interval():
    server = server_adapters()
    before = states_of(server)
    owner = Owner("ann", server, FitConfig(optimizer="sgd", lr=0.1, interval=2, dtype="float64"))
    assert all(p.requires_grad and p.dtype == torch.float64 for a in owner.adapters.values() for p in a.parameters())
    assert owner.flush() is None and owner.version == 0  # nothing buffered, nothing fitted
    assert owner.push(packets(0)) is None  # one step of two buffered
    assert owner.pending_steps == 1 and len(owner.pending) == 2
    update = owner.push(packets(1))
    assert isinstance(update, Update) and (update.user, update.version, update.rows, update.lr) == ("ann", 1, 16, 0.1)
    assert owner.pending == [] and owner.pending_steps == 0 and update.snapshot is None
    assert update.states.keys() == server.keys()
    assert update.nbytes == sum(t.numel() * 8 for s in update.states.values() for t in s.values())  # float64
    assert all(not torch.equal(update.states[n][k], before[n][k].double()) for n in before for k in before[n])
    assert_states_equal(states_of(server), before)  # the server's adapters are the server's to update
    assert all(not p.requires_grad for a in server.values() for p in a.parameters())


def test_a_partial_interval_fits_the_mean_of_its_steps():
    """flush() fits what is buffered: the dL/dh of the 2 buffered steps of an interval of 3, each times 1/2."""
    server = server_adapters(seed=3)
    owner = Owner("ann", server, FitConfig(optimizer="sgd", lr=0.5, interval=3))
    reference = {n: copy.deepcopy(a).requires_grad_(True) for n, a in server.items()}
    steps = packets(0) + packets(1)
    for p in steps:
        reference[p.site](p.x).backward(p.grad * 0.5)
    with torch.no_grad():
        for a in reference.values():
            for q in a.parameters():
                q -= 0.5 * q.grad
    assert owner.push(packets(0)) is None and owner.push(packets(1)) is None
    update = owner.flush()
    assert update.version == 1 and update.rows == 16 and owner.pending_steps == 0
    got = {f"{n}.{k}": v for n, s in update.states.items() for k, v in s.items()}
    assert max_rel_err(got, flat_state(reference)) <= 1e-6


def test_a_non_finite_step_is_skipped_and_counted():
    server = server_adapters()
    owner = Owner("ann", server, FitConfig(optimizer="adamw", lr=1e-2, scheduler="linear", total_steps=4))
    before, lr = states_of(owner.adapters), owner.lr
    broken = packets(0)
    broken[1].grad[0, 0] = float("nan")
    update = owner.push(broken)
    assert update.states is None and update.nbytes == 0 and (update.version, update.rows) == (1, 0)
    assert owner.lr == lr == update.lr  # the schedule did not move
    assert_states_equal(states_of(owner.adapters), before)
    assert owner.push(packets(1)).states is not None and owner.version == 2


def test_state_snapshots_and_pickling_resume_an_owner_exactly():
    config = FitConfig(optimizer="adamw", lr=1e-2, scheduler="linear", warmup_ratio=0.25, total_steps=8, interval=2)
    owner = Owner("ann", server_adapters(), config, snapshots=True)
    owner.push(packets(0))
    update = owner.push(packets(1))
    assert (update.snapshot["version"], update.snapshot["pending_steps"]) == (1, 0)
    assert_states_equal(update.snapshot["adapters"], update.states)
    owner.push(packets(2))  # one step buffered
    state = owner.state()
    assert state["pending_steps"] == 1 and len(state["pending"]) == 2

    restored = Owner("ann", server_adapters(seed=9), config)  # other weights, a fresh optimizer
    restored.load_state(state)
    pickled = pickle.loads(pickle.dumps(owner))  # as a backend sends an owner to a worker
    first, *others = [o.push(packets(3)) for o in (owner, restored, pickled)]
    assert (first.version, first.rows) == (2, 16)
    for u in others:
        assert (u.version, u.rows, u.lr) == (first.version, first.rows, first.lr)
        assert_states_equal(u.states, first.states)


def test_load_state_refuses_more_buffered_steps_than_its_interval():
    owner = Owner("ann", server_adapters(), FitConfig(interval=2))
    owner.push(packets(0))
    with pytest.raises(ValueError, match="user 'ann': the state holds 1 pending server steps, but this owner fits "
                                         "every 1"):
        Owner("ann", server_adapters(), FitConfig(interval=1)).load_state(owner.state())


def test_an_owner_fits_its_users_packets_as_the_trainer_does():
    """An owner built from one user's server adapters, fed that user's packets of a mixed batch."""
    kinds = [dict(adapter="lowrank", rank=4), dict(adapter="mlp", hidden=8)]
    cm = build_users("llama", ["ann", "bob"], kinds=kinds)
    batch, users = text_batch(0), ["ann", "bob", "bob", "ann"]
    step = server_step(cm, batch, users=users)
    init = flat_state(cm.user_adapters("ann"))
    owner = Owner("ann", cm.user_adapters("ann"), FitConfig(optimizer="sgd", lr=0.5))
    update = owner.push([p for p in step.packets if p.user == "ann"])
    Trainer(cm, optimizer="sgd", lr=0.5).step(batch, users=users)
    got = {f"{n}.{k}": v for n, s in update.states.items() for k, v in s.items()}
    want = flat_state(cm.user_adapters("ann"))
    assert max_rel_err(got, want) <= 1e-6
    assert all(not torch.equal(got[k], v) for k, v in init.items())  # every tensor trained
