"""Many users on one base model: isolation, exactness against per-user backprop, routing, modes."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, make_opt, max_rel_err, randomize_
from users_helpers import assignment, batch_of, k_users, rows, users_of
from users_helpers import build_users as build_users  # test_backends.py imports it from here

from colaft import ColaConfig, Trainer


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


@pytest.mark.parametrize("arch", list(ARCHS))
def test_routed_forward_equals_each_users_forward(arch):
    cm = k_users(arch, 4)
    batch = batch_of(arch, 3, 9)
    batch.pop("labels")
    users = assignment(4, 9, seed=3)
    cm.eval()
    with torch.no_grad():
        mixed = cm(**batch, users=users).logits
        for user in cm.users:
            mine = [i for i, u in enumerate(users) if u == user]
            alone = cm(**rows(batch, mine), users=[user] * len(mine)).logits
            torch.testing.assert_close(mixed[mine], alone, rtol=1e-5, atol=1e-6)


def test_generation_routes_rows_to_their_users():
    cm = k_users("llama", 2, kinds=[dict(adapter="lowrank", rank=4)])
    with torch.no_grad():  # make the users' adapters differ a lot, so the users' texts differ
        for j, a in enumerate(cm.user_adapters("user.1").values()):
            randomize_(a, std=1.0, seed=j)
    prompt = torch.tensor([[5, 6, 7], [5, 6, 7]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    both = cm.generate(input_ids=prompt, users=["user.0", "user.1"], **kw)
    each = [cm.generate(input_ids=prompt[:1], users=[u], **kw)[0] for u in ["user.0", "user.1"]]
    assert torch.equal(both[0], each[0]) and torch.equal(both[1], each[1])
    assert not torch.equal(each[0], each[1])
    beams = cm.generate(input_ids=prompt, users=["user.0", "user.1"], num_beams=2, **kw)  # rows repeat per beam
    assert beams.shape == both.shape


def test_lowrank_rows_run_batched_not_per_user(monkeypatch):
    """Low-rank users of a mixed batch share one batched call per site (no per-user loop)."""
    from colaft.adapters.lowrank import LowRankLinear
    cm = k_users("llama", 8, kinds=[dict(adapter="lowrank", rank=4), dict(adapter="lowrank", rank=8)])
    calls = []
    original = LowRankLinear.grouped
    monkeypatch.setattr(LowRankLinear, "grouped", staticmethod(lambda *a: calls.append(1) or original(*a)))
    monkeypatch.setattr(LowRankLinear, "forward", lambda *a: pytest.fail("a per-user lowrank forward ran"))
    batch = batch_of("llama", 0, 16)
    cm(**batch, users=assignment(8, 16, seed=0))
    linear_sites = sum(isinstance(s.get("user.0"), LowRankLinear) for s in cm.sites.values())
    assert len(calls) == linear_sites


def test_collaborative_mode_forward_and_fits():
    """Every row sees the weighted mean of the deltas; each user fits (dg_u/dw)^T dL/dh on its rows only."""
    arch, k = "bert", 3
    lowrank = [dict(adapter="lowrank", rank=4), dict(adapter="linear")]
    cm = k_users(arch, k, kinds=lowrank)
    weights = {"user.0": 2.0}  # the others weigh 1
    cm.set_mode("collaborative", weights)
    batch, users = batch_of(arch, 1, 6), assignment(k, 6, seed=1)
    # forward: the base with W + sum_u w_u dW_u / sum_u w_u at every site
    plain = ARCHS[arch][0]()
    modules = dict(plain.named_modules())
    total = 2.0 + (k - 1)
    with torch.no_grad():
        for site in cm.sites.values():
            m = modules[site.name]
            for user, adapter in site.by_user().items():
                dw, db = adapter.delta_weight()
                w = weights.get(user, 1.0) / total
                m.weight += w * dw
                if db is not None:
                    m.bias += w * db
    cm.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(**batch, users=users).logits, plain(**batch).logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cm(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-6)  # no users needed
    # fit: user u's SGD step is -lr * (dg_u/dw)^T dL/dh over u's rows, L = sum of users' mean losses
    from colaft.server import server_step
    step = server_step(cm, batch, users=users)
    want = {}
    for user in cm.users:
        for name, a in cm.user_adapters(user).items():
            ref = copy.deepcopy(a).requires_grad_(True)  # at the weights the step starts from
            for p in step.packets:
                if p.user == user and p.site == name:
                    ref(p.x).backward(p.grad)
            want[user] = {**want.get(user, {}),
                          **{f"{name}.{key}": (w - w.grad).detach() for key, w in ref.named_parameters()}}
    Trainer(cm, optimizer="sgd", lr=1.0).step(batch, users=users)
    for user in cm.users:
        assert max_rel_err(flat_state(cm.user_adapters(user)), want[user]) <= 1e-6


def test_packets_hold_only_their_users_rows():
    cm = k_users("llama", 3)
    batch = batch_of("llama", 0, 6)
    users = ["user.0", "user.1", "user.2", "user.0", "user.1", "user.2"]
    from colaft.server import server_step
    step = server_step(cm, batch, users=users)
    tokens = {u: int(batch["attention_mask"][[i for i, v in enumerate(users) if v == u]].sum()) for u in cm.users}
    for p in step.packets:
        if p.site.endswith("q_proj"):
            assert len(p.x) == tokens[p.user]  # that user's non-padding tokens, nobody else's
    assert {p.user for p in step.packets} == set(cm.users)
    losses = step.user_losses
    assert step.loss.item() == pytest.approx(sum(losses.values()), rel=1e-6)


def test_users_are_added_and_removed_and_memory_released():
    cm = k_users("llama", 1)
    base_params = cm.adapter_parameters()
    cm.add_user("late", ColaConfig(target_modules=["q_proj"], adapter="linear"))
    assert cm.adapter_parameters() > base_params
    trainer = Trainer(cm, optimizer="sgd", lr=0.1)
    batch = batch_of("llama", 0, 4)
    trainer.step(batch, users=["late", "user.0", "late", "user.0"])
    trainer.remove_user("late")
    assert cm.adapter_parameters() == base_params and cm.users == ["user.0"]
    assert all("late" not in s.keys for s in cm.sites.values())
    with pytest.raises(ValueError, match="unknown user"):
        trainer.step(batch, users=["late"] * 4)
    trainer.step(batch)  # one user again: no users needed
    with pytest.raises(ValueError, match="already exists"):
        cm.add_user("user.0")


def test_bad_user_input_is_refused_clearly():
    cm = k_users("llama", 2)
    batch = batch_of("llama", 0, 4)
    with pytest.raises(ValueError, match="pass users"):
        Trainer(cm).step(batch)
    with pytest.raises(ValueError, match="one per row"):
        cm(**batch, users=["user.0"] * 3)
    with pytest.raises(ValueError, match="dropout and merge"):
        cm.add_user("x", ColaConfig(target_modules=["q_proj"], merge=True))
    with pytest.raises(ValueError, match="mode"):
        cm.set_mode("shared")
    with pytest.raises(ValueError, match="one loss per row"):
        Trainer(cm, loss_fn=lambda out, b: out.logits.sum()).step(batch, users=["user.0", "user.1"] * 2)
