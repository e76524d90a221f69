"""colaft.adapters.merging: W + delta_W formed once per site and per adapter version.

Collaborative mode adds the weighted mean of K users' deltas with one fused product per site
(lowrank's `merged_sum`): it must equal the old sum of each user's delta_W to round-off, in the
output and in dL/dx. The merge cache must never serve a weight older than the adapters, the
base weight, the collaborative weights or the autograd and autocast modes it was made under.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import ARCHS, randomize_
from users_helpers import batch_of, build_users, logits, mixed, users_of

from colaft import ColaConfig, ColaModel, Trainer, server_step
from colaft.adapters import SiteSpec, build_adapter
from colaft.adapters.lowrank import LowRankEmbedding, LowRankLinear
from colaft.adapters.merging import MergeCache, merged

# lowrank users of other ranks and scales, among full-rank linear and mlp users
KINDS = [dict(adapter="lowrank", rank=8), dict(adapter="linear"), dict(adapter="lowrank", rank=4, alpha=4.0),
         dict(adapter="mlp", hidden=8), dict(adapter="lowrank", rank=2, alpha=8.0)]
WEIGHTS = {"user.0": 2.0, "user.2": 0.5, "user.4": 3.0}


def collaborative(arch: str, k: int = 5, seed: int = 0) -> ColaModel:
    cm = build_users(arch, users_of(k), KINDS, seed)
    cm.set_mode("collaborative", WEIGHTS)
    return cm


@pytest.fixture
def per_user_sum(monkeypatch):
    """Turn the fused product off: every lowrank user adds its own delta_W, as before it existed."""
    def off():
        monkeypatch.delattr(LowRankLinear, "merged_sum")
        monkeypatch.delattr(LowRankEmbedding, "merged_sum")
    return off


def spy(monkeypatch, cls) -> list[int]:
    """Count the calls of `cls.merged_sum` (and the users each call fused)."""
    calls, real = [], cls.merged_sum

    def counted(adapters, coefs, weight, transposed):
        calls.append(len(adapters))
        return real(adapters, coefs, weight, transposed)
    monkeypatch.setattr(cls, "merged_sum", staticmethod(counted))
    return calls


# ---------------------------------------------------------------- the fused collaborative product

@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "cnn"])
def test_fused_collaborative_step_equals_the_per_user_sum(arch, monkeypatch, per_user_sum):
    """Loss, logits and every packet's dL/dh (so dL/dx through every site) as with each user's delta summed."""
    cm = collaborative(arch)
    batch, users = mixed(arch, cm.users)
    calls = spy(monkeypatch, LowRankLinear)
    fused = server_step(cm, batch, users=users)
    out = logits(cm, batch, users)
    lowrank_sites = sum(any(isinstance(a, LowRankLinear) for a in s.adapters.values()) for s in cm.sites.values())
    assert len(calls) == 2 * lowrank_sites and set(calls) == {3}  # one call per site and forward, all 3 users
    per_user_sum()
    plain = server_step(cm, batch, users=users)
    torch.testing.assert_close(logits(cm, batch, users), out, rtol=1e-5, atol=1e-6)
    assert abs(fused.loss - plain.loss) <= 1e-5 * abs(plain.loss)
    assert [(p.site, p.user) for p in fused.packets] == [(p.site, p.user) for p in plain.packets]
    for a, b in zip(fused.packets, plain.packets):
        torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch, name", [("gpt2", "transformer.h.0.attn.c_attn"),  # Conv1D: W stored (in, out)
                                        ("llama", "model.layers.0.self_attn.q_proj")])
def test_fused_site_output_and_dx_equal_the_per_user_sum(arch, name, per_user_sum):
    cm = collaborative(arch)
    site = cm.site(name)
    x = torch.randn(3, 5, site.spec.in_features, generator=torch.Generator().manual_seed(0))
    r = torch.randn(3, 5, site.spec.out_features, generator=torch.Generator().manual_seed(1))

    def run():
        xg = x.clone().requires_grad_(True)
        h = site.run(xg)
        return h.detach(), torch.autograd.grad((h * r).sum(), xg)[0]
    h, dx = run()
    per_user_sum()
    h_ref, dx_ref = run()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(h, site._base_forward(x))  # the deltas are there


@pytest.mark.parametrize("kind, transposed", [("linear", False), ("linear", True), ("embedding", False)])
def test_merged_sum_is_w_plus_the_weighted_deltas(kind, transposed):
    """In float64, against W + sum_u c_u delta_W_u from each adapter's own delta_weight."""
    spec = SiteSpec(kind, 7, 5)
    configs = [ColaConfig(target_modules=["x"], rank=r, alpha=a) for r, a in [(3, 6.0), (1, 1.0), (4, 2.0)]]
    adapters = [randomize_(build_adapter("lowrank", spec, c), seed=i).double() for i, c in enumerate(configs)]
    coefs = [0.5, 0.2, 0.3]
    w = torch.randn(7 if kind == "embedding" else 5, 5 if kind == "embedding" else 7, dtype=torch.float64)
    w = w.T.contiguous() if transposed else w
    want = sum(c * a.delta_weight()[0] for a, c in zip(adapters, coefs))
    got, db = merged(w, adapters, coefs, transposed)
    torch.testing.assert_close(got, w + (want.T if transposed else want), rtol=1e-12, atol=1e-12)
    assert db is None
    conv = build_adapter("lowrank", SiteSpec("conv2d", 3, 4, (3, 3), (1, 1), (1, 1), (1, 1)), configs[0])
    assert LowRankLinear.merged_sum([conv], [1.0], torch.zeros(4, 3, 3, 3), False) is None  # conv2d: declined


# ---------------------------------------------------------------- the cache

def merged_model(arch: str = "llama", seed: int = 0) -> ColaModel:
    factory, targets, _ = ARCHS[arch]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets, merge=True))
    for j, adapter in enumerate(cm.adapters().values()):
        randomize_(adapter, seed=seed + j)
    return cm.eval()


def counts(cm: ColaModel) -> set[tuple[int, int]]:
    return {(s.merges.computed, s.merges.hits) for s in cm.sites.values()}


def new_states(cm: ColaModel, user: str | None, seed: int) -> dict:
    states = {}
    for j, (name, a) in enumerate(cm.adapters(user).items()):
        b = randomize_(copy.deepcopy(a), seed=seed + j)
        states[name] = b.state_dict()
    return states


def test_a_merged_weight_is_kept_at_its_second_use_without_grad_and_then_reused():
    cm = merged_model()
    batch = batch_of("llama", 1, 4)
    outs = [logits(cm, batch) for _ in range(4)]
    assert counts(cm) == {(2, 2)}  # formed by the first two forwards, reused by the last two
    assert all(torch.equal(o, outs[0]) for o in outs)
    server_step(cm, batch)  # a training step of the same version reuses it
    assert counts(cm) == {(2, 3)}
    assert pickle.loads(pickle.dumps(cm.sites[next(iter(cm.sites))].merges)).kept is None  # travels empty


class _Uncached(MergeCache):
    def merged(self, weight, adapters, coefs, transposed):
        self.computed += 1
        return merged(weight, adapters, coefs, transposed)


def test_training_keeps_the_merged_weight_only_where_no_adapter_changes_every_step():
    """Interval 1 changes every adapter every step: nothing is kept. With interval 3 the Trainer
    has the sites keep W + delta_W, formed once per version (v0 for steps 1-3, v1 for 4-6) and
    reused by the interval's other steps, and training is bit for bit as without the cache."""
    batch = batch_of("llama", 2, 4)
    states = {}
    for interval, cached in ((1, True), (3, False), (3, True)):
        cm = merged_model()
        trainer = Trainer(cm, optimizer="sgd", lr=0.5, interval=interval)
        if not cached:  # what the forward did before the cache: every result formed anew
            for s in cm.sites.values():
                s.merges = _Uncached()
        for _ in range(6):
            trainer.step(batch)
        assert all(s.merges.under_grad == (interval > 1) for s in cm.sites.values())
        assert counts(cm) == ({(2, 4)} if cached and interval > 1 else {(6, 0)})
        assert all((s.merges.kept is not None) == (cached and interval > 1) for s in cm.sites.values())
        states[interval, cached] = {n: {k: v.clone() for k, v in a.state_dict().items()}
                                    for n, a in cm.adapters().items()}
    for name, state in states[3, False].items():
        assert all(torch.equal(state[k], states[3, True][name][k]) for k in state)
    assert any(not torch.equal(v, states[3, True][n][k]) for n, a in merged_model().adapters().items()
               for k, v in a.state_dict().items())  # training changed the adapters


@pytest.mark.parametrize("mode", ["merged", "collaborative"])
def test_an_update_is_used_by_the_next_forward(mode):
    """After `load_adapter_state` (in-place copies) the next forward equals a model that never cached."""
    make = merged_model if mode == "merged" else collaborative
    cm, fresh = make("llama"), make("llama")
    batch = batch_of("llama", 3, 4)
    users = None if mode == "merged" else mixed("llama", cm.users)[1][:4]
    before = [logits(cm, batch, users) for _ in range(3)]
    assert all(h >= 1 for _, h in counts(cm))
    user = cm.users[0]
    states = new_states(cm, user, seed=50)
    cm.load_adapter_state(states, user)
    fresh.load_adapter_state(states, user)
    after = logits(cm, batch, users)
    assert not torch.equal(after, before[0])
    assert torch.equal(after, logits(fresh, batch, users))


def test_collaborative_weights_base_weights_and_swapped_tensors_are_seen():
    cm, fresh = collaborative("llama"), collaborative("llama")
    batch, users = batch_of("llama", 4, 4), users_of(5)[:4]

    def warm_then_check():
        for _ in range(3):
            out = logits(cm, batch, users)
        assert torch.equal(out, logits(fresh, batch, users))
        return out
    first = warm_then_check()
    for m in (cm, fresh):  # new collaborative weights
        m.set_mode("collaborative", {"user.1": 4.0})
    assert not torch.equal(warm_then_check(), first)
    with torch.no_grad():  # the base weight written in place, and a parameter's data swapped (no version bump)
        for m in (cm, fresh):
            m.site("model.layers.0.self_attn.q_proj").target.weight.mul_(1.5)
            a = m.site("model.layers.1.self_attn.v_proj").get("user.0")
            a.lora_B.weight.data = a.lora_B.weight.data * 2 + 0.01
    warm_then_check()
    for m in (cm, fresh):  # a parameter replaced
        a = m.site("model.layers.1.self_attn.q_proj").get("user.2")
        a.lora_A.weight = torch.nn.Parameter(a.lora_A.weight.detach() * -1, requires_grad=False)
    warm_then_check()
    site = cm.site("model.layers.0.self_attn.q_proj")
    assert site.merges.kept is not None
    cm.remove_user("user.3")  # a removed user's result goes at once
    assert site.merges.kept is None


def test_inference_mode_and_autocast_get_their_own_results():
    cm = merged_model()
    batch = batch_of("llama", 5, 4)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.inference_mode():
        for _ in range(3):
            cm(**inputs)
    assert counts(cm) == {(2, 1)}
    server_step(cm, batch)  # an inference tensor cannot be saved for the backward: formed anew
    assert counts(cm) == {(3, 1)}
    logits(cm, batch), logits(cm, batch)
    assert counts(cm) == {(5, 1)}  # kept, in float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cm(**inputs)
    assert counts(cm) == {(6, 1)}  # not served the float32 result


def test_an_empty_cache_is_what_a_new_one_is():
    cache = MergeCache(under_grad=True)
    again = pickle.loads(pickle.dumps(cache))
    assert again.under_grad and again.kept is None and again.computed == 0
