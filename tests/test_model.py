"""ColaModel: merged running never writes the base weights; merge_and_unload and unload
return the plain model; users are added and removed, the collaborative mode mixes their deltas,
and bad user input is refused."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, flat_state, make_batch, max_rel_err, randomize_, text_batch, tiny_llama
from users_helpers import assignment, batch_of, k_users

from colaft import ColaConfig, ColaModel, Trainer, server_step
from colaft.sites import Site


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_base_unchanged(model, saved):
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "cnn"])
def test_merged_training_and_a_failed_forward_leave_the_base_bit_identical(arch, dtype):
    factory, targets, kind = ARCHS[arch]
    model = factory().to(dtype)
    saved = _base_state(model)
    cm = ColaModel(model, ColaConfig(target_modules=targets, adapter="lowrank", merge=True))
    assert all(a.lora_B.weight.dtype == dtype for a in cm.adapters().values() if hasattr(a, "lora_B"))
    trainer = Trainer(cm, "adamw", lr=1e-2)

    def batch(seed):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_batch(kind, seed).items()}

    losses = [trainer.step(batch(step % 2)) for step in range(4)]
    assert trainer.stats["version"] == 4 and losses[2] < losses[0]
    _assert_base_unchanged(model, saved)

    # an exception raised in the middle of the forward, after some sites ran merged
    last = [m for n, m in model.named_modules() if n == cm.sites[list(cm.sites)[-1]].name][0]

    def boom(mod, args):
        raise RuntimeError("boom")

    handle = last.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        server_step(cm, batch(0))
    handle.remove()
    _assert_base_unchanged(model, saved)
    assert all(s.recorder is None for s in cm.sites.values())
    trainer.step(batch(0))  # and the model still trains
    _assert_base_unchanged(model, saved)


@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "cnn"])
def test_merged_training_equals_unmerged_training(arch, adapter):
    factory, targets, kind = ARCHS[arch]
    runs = []
    for merge in (False, True):
        cm = ColaModel(factory(), ColaConfig(target_modules=targets, adapter=adapter, merge=merge))
        for i, a in enumerate(cm.adapters().values()):
            randomize_(a, std=0.05, seed=i)
        trainer = Trainer(cm, "adamw", lr=1e-2)
        losses = [trainer.step(make_batch(kind, step % 3)) for step in range(10)]
        runs.append((losses, flat_state(trainer.owner_adapters)))
    (losses, unmerged), (merged_losses, merged) = runs
    assert merged_losses == pytest.approx(losses, rel=1e-5)
    # x(W + BA) and xW + (xA)B round differently, and Adam's normalised steps carry that through
    # ten updates: ~1e-5 after them, by the CPU's kernels (AVX2 or AVX-512); a wrong merge is ~1e-1.
    assert max_rel_err(merged, unmerged) <= 5e-5


def _no_wrappers(model) -> bool:
    return not any("forward" in m.__dict__ or isinstance(m, Site) for m in model.modules())


@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "cnn"])
def test_merge_and_unload_returns_the_plain_adapted_model(arch, adapter):
    factory, targets, kind = ARCHS[arch]
    model = factory()
    fresh = factory()
    batch = make_batch(kind, 1)
    cm = ColaModel(model, ColaConfig(target_modules=targets, adapter=adapter))
    assert not _no_wrappers(model)
    trainer = Trainer(cm, "adamw", lr=1e-2)
    for step in range(3):
        trainer.step(make_batch(kind, step))
    adapted = _logits(cm, batch)
    sites = {s.name for s in cm.sites.values()}
    assert not torch.allclose(adapted, _logits(fresh, batch), atol=1e-4)  # training changed the outputs

    plain = cm.merge_and_unload()
    assert plain is model and _no_wrappers(plain) and len(cm.sites) == 0
    assert [type(m) for m in plain.modules()] == [type(m) for m in fresh.modules()]
    got = _logits(plain, batch)
    assert ((got - adapted).abs().max() / adapted.abs().max()).item() <= 1e-5
    changed = [n for n, p in plain.named_parameters() if not torch.equal(p, dict(fresh.named_parameters())[n])]
    assert {n.rsplit(".", 1)[0] for n in changed} == sites  # only the sites' weights (and heads' biases)


def test_unload_returns_the_base_unchanged():
    factory, targets, kind = ARCHS["llama"]
    model, batch = factory(), make_batch("lm", 0)
    want = _logits(model, batch)
    cm = ColaModel(model, ColaConfig(target_modules=targets, adapter="mlp"))
    randomize_(next(iter(cm.adapters().values())))
    assert not torch.equal(_logits(cm, batch), want)
    with pytest.raises(ValueError, match="is not mergeable"):
        cm.merge_and_unload()
    assert len(cm.sites) == len(targets) * 2 - 1  # untouched: still adapted (embed_tokens once)
    plain = cm.unload()
    assert _no_wrappers(plain) and torch.equal(_logits(plain, batch), want)
    assert not any(p.requires_grad for p in plain.parameters())  # frozen stays frozen, as PEFT leaves it


def test_merge_rejects_dropout_and_unmergeable_adapters():
    with pytest.raises(ValueError, match="dropout needs merge=False"):
        ColaConfig(target_modules=["q_proj"], merge=True, dropout=0.1)
    with pytest.raises(ValueError, match="adapter 'mlp' is not mergeable"):
        ColaModel(ARCHS["llama"][0](), ColaConfig(target_modules=["q_proj"], adapter="mlp", merge=True))


def test_merge_refuses_a_tied_weight_until_untied():
    """GPT-2's wte is lm_head's weight: merging the embedding delta would change the logits."""
    model, batch = ARCHS["gpt2"][0](), make_batch("lm", 0)
    assert model.lm_head.weight is model.transformer.wte.weight
    saved = _base_state(model)
    cm = ColaModel(model, ColaConfig(target_modules=["wte", "c_attn"], adapter="lowrank"))
    trainer = Trainer(cm, "adamw", lr=1e-2)
    for step in range(2):
        trainer.step(make_batch("lm", step))
    adapted = _logits(cm, batch)
    with pytest.raises(ValueError, match=r"site transformer\.wte: its weight is shared with lm_head \(tied\)"):
        cm.merge_and_unload()
    _assert_base_unchanged(model, saved)  # nothing was merged
    assert len(cm.sites) == 3 and torch.equal(_logits(cm, batch), adapted)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    plain = cm.merge_and_unload()
    assert ((_logits(plain, batch) - adapted).abs().max() / adapted.abs().max()).item() <= 1e-5


def test_a_failed_construction_leaves_the_model_unwrapped():
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="not mergeable"):
        ColaModel(model, ColaConfig(target_modules=["c_attn", "c_proj"], adapter="mlp", merge=True))
    assert _no_wrappers(model)


def test_naming_only_a_head_says_so():
    with pytest.raises(ValueError, match="match only task heads"):
        ColaModel(ARCHS["bert"][0](), ColaConfig(target_modules=["classifier"]))


# ---------------------------------------------------------------- users: modes, adding and removing, bad input

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


# ---------------------------------------------------------------- traps: users per row, the mode a step leaves

def two_users() -> ColaModel:
    cola = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj", "v_proj"], rank=2), user="alice")
    cola.add_user("bob")
    return cola


def test_a_users_list_of_another_length_is_refused_not_broadcast():
    cola, batch = two_users(), text_batch(0)
    rows = batch["input_ids"].shape[0]
    for call in (lambda u: cola(**batch, users=u), lambda u: Trainer(cola).step(batch, users=u)):
        with pytest.raises(ValueError, match=rf"1 id\(s\) for a batch of {rows} rows.*users='alice'"):
            call(["alice"])
        with pytest.raises(ValueError, match=f"for a batch of {rows} rows"):
            call(["alice", "bob"] * rows)


def test_one_user_for_every_row_has_its_own_spelling():
    cola, batch = two_users(), text_batch(0)
    rows = batch["input_ids"].shape[0]
    cola.eval()
    with torch.no_grad():
        assert torch.equal(cola(**batch, users="bob").logits, cola(**batch, users=["bob"] * rows).logits)
    trainer = Trainer(cola, lr=1e-2)
    trainer.step(batch, users="alice")
    assert trainer.last_user_losses.keys() == {"alice"}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_step_leaves_the_model_in_the_mode_it_found(mode):
    cola = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj"], rank=2, dropout=0.1))
    cola.train(mode == "train")
    Trainer(cola, lr=1e-2).step(text_batch(0))
    assert cola.training == (mode == "train") and cola.model.training == (mode == "train")
