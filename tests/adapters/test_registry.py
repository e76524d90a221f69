"""The adapter registry x the site kinds: every registered adapter on nn.Linear, GPT-2's
Conv1D, nn.Conv2d and nn.Embedding, and a user's own adapter registered by name."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import Backprop, flat_state, make_opt, max_rel_err, randomize_, text_batch, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import colaft
from colaft import ADAPTERS, ColaConfig, ColaModel, Trainer, server_step
from colaft.adapters import is_mergeable


class One(nn.Module):
    """A single module under test; the loss is <out, probe>, so dL/dh == probe exactly."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.site = module

    def forward(self, x):
        return self.site(x)


def _kind(name: str):
    """(module, input, rows of its packet) for one site kind."""
    torch.manual_seed(0)
    if name == "linear":
        return nn.Linear(6, 5), torch.randn(3, 4, 6), 12
    if name == "conv1d":  # GPT-2: weight stored (in, out)
        m = Conv1D(5, 6)
        nn.init.normal_(m.weight, std=0.2)
        return m, torch.randn(3, 4, 6), 12
    if name == "conv2d":
        return nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 7, 7), 2
    return nn.Embedding(11, 5, padding_idx=0), torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [10, 9, 8, 7]]), 12


KINDS = ["linear", "conv1d", "conv2d", "embedding"]
CONFIG = dict(target_modules=["site"], rank=2, alpha=4.0, hidden=4)


def _probe(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_on_site_kind(adapter, kind):
    module, x, rows = _kind(kind)
    model = One(module)
    with torch.no_grad():
        base_out = model(x)
    cm = ColaModel(model, ColaConfig(adapter=adapter, **CONFIG))
    site = cm.site("site")
    assert cm.trainable_parameters() == 0 and cm.adapter_parameters() > 0

    # the model starts unchanged, bit for bit
    with torch.no_grad():
        assert torch.equal(cm(x), base_out)
        assert site.adapter(x).shape == base_out.shape

    # server step: one packet, x rows and dL/dh rows of the right shapes and values
    probe = _probe(base_out.shape)
    packets = server_step(cm, {"x": x}, lambda out, batch: (out * probe).sum()).packets
    assert [p.site for p in packets] == ["site"]
    p = packets[0]
    if kind == "conv2d":
        assert p.x.shape == x.shape and p.grad.shape == base_out.shape == (2, 5, 4, 4)
        assert torch.equal(p.x, x) and torch.equal(p.grad, probe)
    else:
        d_out = base_out.shape[-1]
        assert p.x.shape == ((rows,) if kind == "embedding" else (rows, x.shape[-1]))
        assert p.grad.shape == (rows, d_out)
        assert torch.equal(p.x, x.reshape(p.x.shape)) and torch.equal(p.grad, probe.reshape(rows, d_out))

    # the owner's backward: the gradient g(x).backward(dL/dh) gives, and the server gets the update
    reference = copy.deepcopy(site.adapter).requires_grad_(True)
    reference(x).backward(probe)
    trainer = Trainer(cm, "sgd", lr=0.1, loss_fn=lambda out, batch: (out * probe).sum())
    before = flat_state(cm.adapters())
    trainer.flush()  # nothing pending: no fit, no update
    assert trainer.stats["version"] == 0
    trainer.step({"x": x})
    owner = trainer.owner_adapters["site"]
    for q, r in zip(owner.parameters(), reference.parameters()):
        assert q.grad.shape == q.shape
        torch.testing.assert_close(q.grad, r.grad, rtol=1e-6, atol=1e-6)
    assert any(q.grad.abs().max() > 0 for q in owner.parameters())
    after = flat_state(cm.adapters())
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert trainer.stats["version"] == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_merged_forward_equals_unmerged(adapter, kind):
    module, x, _ = _kind(kind)
    model = One(module)
    unmerged = ColaModel(copy.deepcopy(model), ColaConfig(adapter=adapter, **CONFIG))
    if not is_mergeable(unmerged.site("site").adapter):
        with pytest.raises(ValueError, match="not mergeable"):
            ColaModel(copy.deepcopy(model), ColaConfig(adapter=adapter, merge=True, **CONFIG))
        return
    merged = ColaModel(copy.deepcopy(model), ColaConfig(adapter=adapter, merge=True, **CONFIG))
    randomize_(unmerged.site("site").adapter, std=0.3)
    merged.load_adapter_state({"site": unmerged.site("site").adapter.state_dict()})
    with torch.no_grad():
        want, got, base = unmerged(x), merged(x), model(x)
    assert not torch.allclose(want, base, atol=1e-3)  # the delta is not trivially zero
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    # merged dL/dh equals unmerged dL/dh too (the backward goes through W + delta_W)
    probe = _probe(want.shape)
    fn = lambda out, batch: (out.tanh() * probe).sum()
    pu, pm = server_step(unmerged, {"x": x}, fn).packets, server_step(merged, {"x": x}, fn).packets
    assert ((pm[0].grad - pu[0].grad).abs().max() / pu[0].grad.abs().max()).item() <= 1e-5


def test_unknown_adapter_lists_the_registered_ones():
    module, _, _ = _kind("linear")
    with pytest.raises(ValueError, match="unknown adapter 'nope'; registered: linear, lowrank, mlp"):
        ColaModel(One(module), ColaConfig(adapter="nope", target_modules=["site"]))


def test_lowrank_rejects_grouped_convolutions():
    with pytest.raises(ValueError, match="adapter 'lowrank' does not support conv2d sites"):
        ColaModel(One(nn.Conv2d(4, 4, 3, groups=2)), ColaConfig(target_modules=["site"]))


# ---------------------------------------------------------------- a user's own adapter type

class Gate(nn.Module):
    """A user's adapter for linear sites: g(x) = V tanh(U x), V zero so the model starts unchanged."""

    def __init__(self, spec, config):
        super().__init__()
        self.u = nn.Linear(spec.in_features, config.rank, bias=False)
        self.v = nn.Linear(config.rank, spec.out_features)
        nn.init.zeros_(self.v.weight)
        nn.init.zeros_(self.v.bias)

    def forward(self, x):
        return self.v(torch.tanh(self.u(x)))


@pytest.fixture
def mine():
    colaft.register_adapter("mine", Gate)
    yield "mine"
    del ADAPTERS["mine"]


def test_custom_adapter_end_to_end(mine):
    base = tiny_llama()
    twin = copy.deepcopy(base)
    batch = text_batch(0)
    with torch.no_grad():
        base_loss = base(**batch).loss.item()
    cm = ColaModel(base, ColaConfig(target_modules=["q_proj", "v_proj"], adapter=mine, rank=3))
    assert all(isinstance(a, Gate) for a in cm.adapters().values()) and len(cm.sites) == 4
    assert cm.trainable_parameters() == 0
    with torch.no_grad():
        assert cm(**batch).loss.item() == base_loss  # starts unchanged
    with pytest.raises(ValueError, match="not mergeable"):
        ColaModel(copy.deepcopy(twin), ColaConfig(target_modules=["q_proj"], adapter=mine, merge=True))
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.1, seed=i)
    ref = Backprop(twin, cm.adapters(), make_opt("adamw", 1e-2))
    trainer = Trainer(cm, "adamw", lr=1e-2)
    losses = []
    for step in range(8):
        b = text_batch(step % 2)
        losses.append(trainer.step(b))
        assert losses[-1] == pytest.approx(ref.step(b), rel=1e-5)
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-5
    assert losses[-1] < losses[0] and losses[-2] < losses[1]


@pytest.mark.parametrize("geometry", [dict(padding="same"), dict(padding=1, padding_mode="reflect"),
                                      dict(padding=(1, 2), padding_mode="circular"),
                                      dict(padding=1, padding_mode="replicate", stride=2), dict(padding=2, dilation=2)])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_conv_adapters_pad_like_their_site(adapter, geometry):
    """An adapter on a conv site has the site's geometry, padding mode included, so the
    output shapes agree and W + delta_W is exact at the borders too."""
    torch.manual_seed(0)
    model, x = One(nn.Conv2d(3, 4, 3, **geometry)), torch.randn(2, 3, 7, 7)
    cm = ColaModel(copy.deepcopy(model), ColaConfig(adapter=adapter, **CONFIG))
    randomize_(cm.site("site").adapter, std=0.3)
    with torch.no_grad():
        base, got = model(x), cm(x)
    assert cm.site("site").adapter(x).shape == base.shape
    if not is_mergeable(cm.site("site").adapter):
        return
    merged = ColaModel(copy.deepcopy(model), ColaConfig(adapter=adapter, merge=True, **CONFIG))
    merged.load_adapter_state({"site": cm.site("site").adapter.state_dict()})
    with torch.no_grad():
        want = merged(x)
        plain = cm.merge_and_unload()(x)
    assert ((got - want).abs().max() / got.abs().max()).item() <= 1e-5
    assert ((plain - got).abs().max() / got.abs().max()).item() <= 1e-5
