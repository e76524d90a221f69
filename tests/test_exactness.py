"""The exactness contract (DESIGN.md §1): with I = 1, one fit step and synchronous updates,
ColA's adapter parameters follow ordinary backprop training of the same adapted model.

`lowrank` is compared with the real PEFT LoRA (same initial weights copied from PEFT into
colaft, B non-zero so both factors train); `linear` and `mlp` with the plain-autograd
reference of conftest. Every text batch is right-padded, so the server drops padding rows.
With many users, each user's adapters follow backprop on that user's rows alone.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, make_batch, make_opt, max_rel_err, max_update_rel_err, randomize_
from references import LR, TOL, PeftTwin, flat_sites
from users_helpers import assignment, batch_of, k_users, rows, users_of

from colaft import ColaConfig, ColaModel, Trainer, server_step

STEPS = 20


def _split_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take GPT-2's key bias out of `state` (in place) and return it.

    The bias an adapter adds to the key third of `c_attn`'s output has an exactly-zero
    gradient: softmax is invariant to adding the same score q.b to every key of a row. Its
    "gradient" is round-off in both runs, which Adam normalises to steps of ~lr, so the two
    runs move it by different noise. It is checked apart: it must stay at noise level.
    """
    out = {}
    for k in [k for k in state if k.endswith("attn.c_attn.2.bias")]:  # mlp's output layer
        d = state[k].numel() // 3
        out[k] = state[k][d:2 * d].clone()
        state[k] = torch.cat([state[k][:d], state[k][2 * d:]])
    return out


def _train_both(arch, optimizer, adapter, targets, loss_tol=TOL, **trainer_options):
    """STEPS steps of ColA and of its reference (PEFT for lowrank, else autograd) from the same
    start, their losses within `loss_tol`; returns the trainer, the reference's adapters then
    and the start."""
    factory, _, kind = ARCHS[arch]
    base = factory()
    twin = copy.deepcopy(base)
    cm = ColaModel(base, ColaConfig(target_modules=targets, adapter=adapter, rank=4, alpha=8.0, hidden=8))
    heads = [s.name for s in cm.sites.values() if s.name.split(".")[-1] in cm.config.heads]
    assert len(cm.sites) >= 2 and (heads == ["classifier"]) == (arch == "bert")
    # PEFT's modules_to_save copy decays towards 0 rather than towards W_0: no decay with heads
    weight_decay = 0.0 if heads else 0.01
    make_optimizer = make_opt(optimizer, LR[optimizer], weight_decay)
    if adapter == "lowrank":
        ref = PeftTwin(twin, targets, heads, rank=4, alpha=8.0, make_optimizer=make_optimizer)
        cm.load_adapter_state(ref.site_states())  # both start from PEFT's weights
        want = lambda: flat_sites(ref.site_states())
    else:
        for i, a in enumerate(cm.adapters().values()):
            randomize_(a, std=0.05, seed=i)  # non-zero start: the adapters' input Jacobians matter
        ref = Backprop(twin, cm.adapters(), make_optimizer)
        want = lambda: flat_state(ref.adapters)
    trainer = Trainer(cm, optimizer, lr=LR[optimizer], weight_decay=weight_decay, **trainer_options)
    init = flat_state(cm.adapters())
    assert max_rel_err(init, want()) == 0.0

    batches = [make_batch(kind, seed) for seed in range(4)]
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        loss, ref_loss = trainer.step(batch), ref.step(batch)
        assert loss == pytest.approx(ref_loss, rel=loss_tol)
    trainer.flush()
    return trainer, want(), init


@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cola_follows_backprop(arch, optimizer, adapter, report_error):
    trainer, expected, init = _train_both(arch, optimizer, adapter, ARCHS[arch][1])
    got, server = flat_state(trainer.owner_adapters), flat_state(trainer.model.adapters())
    noise = [_split_key_bias(s) for s in (got, expected, init)]
    err, update_err = max_rel_err(got, expected), max_update_rel_err(got, expected, init)
    report_error(arch, optimizer, adapter, err, update_err)
    assert err <= TOL
    assert update_err <= 1e-3  # also small relative to how far the adapters moved
    assert all((got[k] - init[k]).abs().max() > 0 for k in got)  # every tensor trained
    for k in noise[0]:  # a real gradient would move it by up to lr * STEPS = 0.2 (AdamW)
        assert (noise[0][k] - noise[1][k]).abs().max() <= 1e-4
    assert trainer.stats["version"] == STEPS and trainer.stats["skipped_fits"] == 0
    # the server runs the owner's latest weights
    assert max_rel_err(server, flat_state(trainer.owner_adapters)) == 0.0


# sites that read one input: q, k, v (and gate, up) share one x in the packets
SHARED = {"llama": (["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], [3, 2]),
          "bert": (["query", "key", "value", "intermediate.dense", "output.dense"], [3])}
# bfloat16 packets (8-bit mantissa: x and dL/dh within 0.4%), 20 SGD steps: max |difference| within
# 1% of how far the adapters moved (measured 0.3% llama, 0.5% bert). AdamW divides by sqrt(v):
# weights whose gradient is near zero move by ~lr whatever its rounding, so there the same
# packets differ by 17-22% of the movement on these tiny random models (the real task's
# held-out loss is unchanged to 3 digits, BENCHMARKS.md).
BF16_TOL = 1e-2


@pytest.mark.parametrize("transfer", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["inline", "process"])
@pytest.mark.parametrize("arch", list(SHARED))
def test_shared_inputs_follow_backprop(arch, backend, transfer, report_error):
    """Packets that share x train as backprop does: in float32 to round-off (exactness unchanged),
    in bfloat16 within BF16_TOL of the adapters' movement; on a worker process too (packets
    through shared memory, a shared x once)."""
    targets, groups = SHARED[arch]
    cm = ColaModel(ARCHS[arch][0](), ColaConfig(target_modules=targets))
    packets = server_step(cm, make_batch(ARCHS[arch][2], 0)).packets  # padded: rows are cut
    by_x = {}
    for p in packets:
        by_x.setdefault(id(p.x), []).append(p.site)
    assert sorted(map(len, by_x.values()), reverse=True)[:2 * len(groups)] == sorted(groups * 2, reverse=True)

    dtype = {"float32": None, "bfloat16": torch.bfloat16}[transfer]
    optimizer = "adamw" if dtype is None else "sgd"  # see BF16_TOL
    options = {} if backend == "inline" else {"backend_options": {"workers": 1}}
    trainer, expected, init = _train_both(arch, optimizer, "lowrank", targets, TOL if dtype is None else BF16_TOL,
                                          backend=backend, transfer_dtype=dtype, **options)
    try:
        got = flat_state(trainer.model.adapters())  # S = 0: the owner's latest weights
        err, update_err = max_rel_err(got, expected), max_update_rel_err(got, expected, init)
        report_error(arch, optimizer, f"lowrank, shared x, {backend}, {transfer}", err, update_err)
        if dtype is None:
            assert err <= TOL and update_err <= 1e-3
        else:
            assert update_err <= BF16_TOL
        assert all((got[k] - init[k]).abs().max() > 0 for k in got)
    finally:
        trainer.close()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_dropout_follows_peft(arch):
    """With dropout on the adapters' input, the packets carry the dropped-out x: seeded alike,
    colaft and PEFT draw the same masks (one per site, in forward order) and train alike."""
    factory, targets, kind = ARCHS[arch]
    base = factory()
    twin = copy.deepcopy(base)
    cm = ColaModel(base, ColaConfig(target_modules=targets, rank=4, alpha=8.0, dropout=0.3))
    heads = [s.name for s in cm.sites.values() if s.name.split(".")[-1] in cm.config.heads]
    ref = PeftTwin(twin, targets, heads, rank=4, alpha=8.0, make_optimizer=make_opt("adamw", 1e-2), dropout=0.3)
    cm.load_adapter_state(ref.site_states())
    trainer = Trainer(cm, "adamw", lr=1e-2)
    losses = []
    for step in range(8):
        batch = make_batch(kind, step % 4)
        torch.manual_seed(step)
        losses.append(trainer.step(batch))
        torch.manual_seed(step)
        assert losses[-1] == pytest.approx(ref.step(batch), rel=TOL)
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_sites(ref.site_states())) <= TOL
    # the dropout did drop: ~30% zeros in the x rows of the site with the densest input (heads: none)
    packets = server_step(cm, make_batch(kind, 0)).packets
    zeros = min((p.x == 0).float().mean().item() for p in packets if p.x.is_floating_point() and p.site not in heads)
    assert 0.2 < zeros < 0.4


# ---------------------------------------------------------------- many users: each user's rows train as if alone

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("k", [1, 3, 8])
def test_mixed_step_equals_each_users_step_alone(arch, k):
    n = 2 * k + 1
    batch, users = batch_of(arch, 0, n), assignment(k, n, seed=k)
    mixed = Trainer(k_users(arch, k), optimizer="sgd", lr=0.5)
    mixed.step(batch, users=users)
    for user in users_of(k):
        alone = Trainer(k_users(arch, k), optimizer="sgd", lr=0.5)
        mine = [i for i, u in enumerate(users) if u == user]
        alone.step(rows(batch, mine), users=[user] * len(mine))
        got, want = flat_state(mixed.model.user_adapters(user)), flat_state(alone.model.user_adapters(user))
        init = flat_state(k_users(arch, k).user_adapters(user))
        assert any((want[key] - init[key]).abs().max() > 0 for key in want)  # the step did move it
        assert max_rel_err(got, want) <= 1e-6, user
        # and the other users' adapters were left alone by that user's step
        for other in users_of(k):
            if other != user:
                assert max_rel_err(flat_state(alone.model.user_adapters(other)),
                                   flat_state(k_users(arch, k).user_adapters(other))) == 0


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mixed_training_equals_per_user_backprop(arch, optimizer):
    """10 steps of mixed batches; each user against backprop on its own rows only.

    Measured: SGD with momentum agrees to <= 1.7e-7 for every user. AdamW divides by
    sqrt(v): a weight whose gradient is zero up to round-off (~1e-12, 1e-9 of the largest,
    e.g. an mlp bias behind a dead ReLU) moves by lr * noise/|noise|; lowrank and linear
    users stay <= 7e-6, mlp users reach 1.3e-4 (GPT-2) that way.
    """
    k, n, steps = 3, 7, 10
    cm = k_users(arch, k)
    initial = {u: dict(cm.user_adapters(u)) for u in cm.users}
    kw = dict(momentum=0.9) if optimizer == "sgd" else {}
    make = (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)) if optimizer == "sgd" else make_opt("adamw", 1e-2)
    refs = {u: Backprop(ARCHS[arch][0](), initial[u], make) for u in cm.users}
    trainer = Trainer(cm, optimizer=optimizer, lr=1e-2, optimizer_kwargs=kw)
    for step in range(steps):
        batch, users = batch_of(arch, step, n), assignment(k, n, seed=step)
        trainer.step(batch, users=users)
        for user, ref in refs.items():
            mine = [i for i, u in enumerate(users) if u == user]
            ref.step(rows(batch, mine))
    for user, ref in refs.items():
        kind = trainer.model.user_configs[user].adapter
        tol = 1e-6 if optimizer == "sgd" else 1e-5 if kind != "mlp" else 5e-4
        assert max_rel_err(flat_state(trainer.model.user_adapters(user)), flat_state(ref.adapters)) <= tol, user
