"""The server step: dL/dh at every site, a server that holds nothing trainable, and packets
that hold only their user's rows."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, make_batch, make_opt, max_rel_err, randomize_
from torch import nn
from users_helpers import assert_one_block_per_user, batch_of, k_users

from colaft import ColaConfig, ColaModel, Trainer, server_step


def _reference_grads(base, adapters, batch) -> dict[str, torch.Tensor]:
    """dL/dh at each site by plain autograd: tensor hooks on the adapted outputs.

    A hook registered before an in-place op on the tensor receives the gradient of the
    value it had when registered (PyTorch autograd notes), i.e. dL/dh, not dL/d(relu(h)).
    """
    model = copy.deepcopy(base)
    grads, modules = {}, dict(model.named_modules())

    def hook(name, adapter):
        def add(mod, args, out):
            h = out + adapter(args[0])
            h.register_hook(lambda g: grads.__setitem__(name, g))
            return h
        return add

    for name, a in adapters.items():
        modules[name].register_forward_hook(hook(name, copy.deepcopy(a)))
    model(**batch).loss.backward()
    return grads


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packets_carry_dl_dh_of_backprop(arch):
    """With non-zero mlp adapters (their input Jacobians matter) and, for the CNN, in-place
    ReLUs on the sites' outputs, the first site included."""
    factory, targets, kind = ARCHS[arch]
    base = factory()
    twin = copy.deepcopy(base)
    cm = ColaModel(base, ColaConfig(target_modules=targets, adapter="mlp", hidden=8))
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.2, seed=i)
    batch = make_batch(kind, 0)
    want = _reference_grads(twin, cm.adapters(), batch)
    packets = server_step(cm, batch).packets
    assert sorted(p.site for p in packets) == sorted(want)
    mask = batch.get("attention_mask")
    for p in packets:
        g = want[p.site]
        if kind != "image" and g.dim() == 3:  # token sites: padding rows dropped
            g = g[mask.bool()]
        g = g.reshape(p.grad.shape)
        assert (p.grad - g).abs().max().item() <= 1e-6 * g.abs().max().item(), p.site


@pytest.mark.parametrize("adapter,merge", [("lowrank", False), ("lowrank", True), ("linear", True), ("mlp", False)])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_server_holds_nothing_trainable(arch, adapter, merge):
    factory, targets, kind = ARCHS[arch]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets, adapter=adapter, merge=merge))
    params = list(cm.parameters())  # the base and the server's adapters
    assert len(params) > 0 and cm.trainable_parameters() == 0
    assert not any(p.requires_grad for p in params)
    trainer = Trainer(cm, "adamw", lr=1e-2)
    for step in range(3):
        trainer.step(make_batch(kind, step))
        assert cm.trainable_parameters() == 0
        assert all(p.grad is None for p in params)
    assert trainer.stats["version"] == 3
    # the owner's copies are where gradients live (so the check above can fail)
    assert all(p.grad is not None for a in trainer.owner_adapters.values() for p in a.parameters())
    owned = sum(p.numel() for a in trainer.owner_adapters.values() for p in a.parameters())
    assert owned == cm.adapter_parameters()


def test_loss_must_come_from_the_batch_or_a_loss_fn():
    factory, targets, kind = ARCHS["gpt2"]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets))
    batch = make_batch(kind, 0)
    del batch["labels"]
    with pytest.raises(ValueError, match="the model returned no loss"):
        server_step(cm, batch)
    with pytest.raises(RuntimeError, match="the loss depends on no adapted site"):
        server_step(cm, batch, lambda out, b: torch.tensor(1.0))
    packets = server_step(cm, batch, lambda out, b: out.logits[:, -1].logsumexp(-1).sum()).packets
    assert len(packets) == 4 * 2  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in 2 layers
    with torch.no_grad(), pytest.raises(RuntimeError, match="the loss depends on no adapted site"):
        server_step(cm, make_batch(kind, 0))
    assert all(s.recorder is None for s in cm.sites.values())


def test_site_called_twice_gives_two_packets():
    """A module used twice in one forward (weight sharing) emits one packet per call."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model, x = Twice(), torch.randn(5, 4)
    cm = ColaModel(model, ColaConfig(target_modules=["lin"], adapter="linear"))
    randomize_(cm.site("lin").adapter, std=0.3)
    packets = server_step(cm, {"x": x}, lambda out, b: out.square().sum()).packets
    assert [p.site for p in packets] == ["lin", "lin"]
    # by hand: h1 = lin(x) + a(x); h2 = lin(t) + a(t), t = tanh(h1); L = sum h2^2
    w, b, a = model.lin.weight, model.lin.bias, cm.site("lin").adapter.weight
    h1 = x @ (w + a).T + b
    t = torch.tanh(h1)
    h2 = t @ (w + a).T + b
    g2 = 2 * h2
    g1 = (g2 @ (w + a)) * (1 - t.square())
    torch.testing.assert_close(packets[0].x, x, rtol=0, atol=0)
    torch.testing.assert_close(packets[1].x, t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packets[1].grad, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packets[0].grad, g1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    """Non-reentrant checkpointing keeps the graph, so dL/dh (and training) stay exact; the
    reentrant kind runs the forward without autograd, which the server must say."""
    base = ARCHS["llama"][0]()
    twin = copy.deepcopy(base)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    cm = ColaModel(base, ColaConfig(target_modules=["q_proj", "v_proj"], adapter="linear"))
    trainer = Trainer(cm, "sgd", lr=0.5)
    if reentrant:
        with pytest.raises(RuntimeError, match=r"sites ran without autograd: model\.layers\.0\.self_attn\.q_proj, .*"
                                               r"use the non-reentrant kind \(use_reentrant=False\)"):
            trainer.step(make_batch("lm", 0))
        return
    ref = Backprop(twin, cm.adapters(), make_opt("sgd", 0.5))
    for step in range(3):
        assert trainer.step(make_batch("lm", step)) == pytest.approx(ref.step(make_batch("lm", step)), rel=1e-6)
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-6


# ---------------------------------------------------------------- users

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



@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_each_call_lets_go_of_its_x_and_dl_dh_once_its_packets_are_built(arch, monkeypatch):
    """With several users every packet copies its rows: the step then holds the copies of the
    calls done and the originals of those to come, never both in full. When a call's rows are
    copied, no earlier call's dL/dh is alive, nor its x unless this call reads the same input (q/k/v)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from colaft import packing
    cm = k_users(arch, 3)
    batch = batch_of(arch, 0, 6)
    users = ["user.0", "user.1", "user.2", "user.0", "user.1", "user.2"]
    order: list[tuple[int, StorageWeakRef, int, StorageWeakRef]] = []  # per call: (x address, x, dL/dh address, dL/dh)
    cut, copied = packing.cut, packing._copied

    def watched_cut(call, grad, keep, memo):
        x = call.x.untyped_storage()  # token ids are the batch's own: never let go
        order.append((x.data_ptr(), StorageWeakRef(x) if call.x.is_floating_point() else None,
                      grad.untyped_storage().data_ptr(), StorageWeakRef(grad.untyped_storage())))
        return cut(call, grad, keep, memo)

    checked = []

    def watched_copied(part):
        if isinstance(part, packing._Rows) and part.source is not None:
            here = part.source.untyped_storage().data_ptr()
            now = next(i for i, (xp, _, gp, _) in enumerate(order) if here in (xp, gp))
            x_here = order[now][0]
            for x_ptr, x_ref, _, g_ref in order[:now]:
                assert g_ref.expired(), "an earlier call's dL/dh is still held"
                assert x_ref is None or x_ref.expired() or x_ptr == x_here, "an earlier call's x is still held"
            checked.append(now)
        return copied(part)

    monkeypatch.setattr(packing, "cut", watched_cut)
    monkeypatch.setattr(packing, "_copied", watched_copied)
    step = server_step(cm, batch, users=users)
    assert len(set(checked)) >= 4 and all((x is None or x.expired()) and g.expired() for _, x, _, g in order)
    assert {p.user for p in step.packets} == set(users)


@pytest.mark.parametrize("arch", ["llama", "bert", "cnn"])
def test_each_users_packets_are_copied_into_one_block_of_its_own(arch):
    """Several users: all of a user's packets view one allocation holding its rows and nothing
    else, so a transport that moves storages sends exactly that user's rows, once."""
    cm = k_users(arch, 3)
    batch = batch_of(arch, 0, 6)
    users = ["user.0", "user.1", "user.2", "user.0", "user.1", "user.2"]
    step = server_step(cm, batch, users=users)
    solo = {p.site: p for p in server_step(cm, {k: v[0::3] for k, v in batch.items()}, users="user.0").packets}
    assert_one_block_per_user(step.packets)
    for p in (p for p in step.packets if p.user == "user.0"):  # the same rows as user.0's own step
        assert torch.allclose(p.x.float(), solo[p.site].x.float(), atol=1e-6)
        assert torch.allclose(p.grad, solo[p.site].grad, atol=1e-6)
