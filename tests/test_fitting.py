"""Gradient Learning fit: the squared loss, several steps on fixed packets, numerics, and
non-finite packets."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, make_opt, max_rel_err, randomize_, text_batch, tiny_llama
from torch import nn

from colaft import ColaConfig, ColaModel, Packet, Trainer, fit, server_step
from colaft.adapters import SiteSpec, build_adapter

SPEC = SiteSpec("linear", 6, 5)


def _adapter(name: str, seed: int = 0, std: float = 0.2) -> nn.Module:
    a = build_adapter(name, SPEC, ColaConfig(target_modules=["x"], adapter=name, rank=3, hidden=8))
    return randomize_(a, std=std, seed=seed).requires_grad_(True)


def _packet(n: int = 10, seed: int = 0, grad_scale: float = 1.0) -> Packet:
    g = torch.Generator().manual_seed(seed)
    return Packet("s", torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g) * grad_scale)


def _objective(adapter, adapter0, p: Packet) -> float:
    """0.5 * || g(x; w) - (g(x; w0) - grad) ||^2, in float64 from float32 weights."""
    with torch.no_grad():
        r = p.grad.double() + adapter(p.x).double() - adapter0(p.x).double()
    return 0.5 * r.square().sum().item()


def test_several_sgd_steps_follow_the_closed_form():
    """For g(x) = x W^T and SGD the residual after k steps is (I - lr X X^T)^k grad."""
    p = _packet()
    x, g = p.x.double(), p.grad.double()
    xxt = x @ x.T  # (N, N)
    lr = 1.0 / torch.linalg.eigvalsh(xxt).max().item()  # inside the stable range (< 2 / lambda_max)
    objectives = []
    for k in range(1, 6):
        a0 = _adapter("linear")
        a = copy.deepcopy(a0)
        result = fit({"s": a}, torch.optim.SGD(a.parameters(), lr=lr), [p], steps=k)
        assert not result.skipped and result.rows == 10
        r, dw = g.clone(), torch.zeros(5, 6, dtype=torch.float64)
        for _ in range(k):
            dw -= lr * r.T @ x
            r = r - lr * xxt @ r
        got = (a.weight - a0.weight).double()
        assert ((got - dw).abs().max() / dw.abs().max()).item() <= 1e-5
        objectives.append(_objective(a, a0, p))
        assert objectives[-1] == pytest.approx(0.5 * r.square().sum().item(), rel=1e-4)
    assert all(b < a for a, b in zip(objectives, objectives[1:]))


@pytest.mark.parametrize("adapter", ["lowrank", "mlp"])
def test_more_fit_steps_lower_the_squared_loss(adapter):
    """Functional gradient descent towards the fixed target g(x; w0) - grad."""
    p = _packet(seed=1)
    a0 = _adapter(adapter, seed=2)
    objectives = [_objective(a0, a0, p)]
    for k in range(1, 7):
        a = copy.deepcopy(a0)
        fit({"s": a}, torch.optim.SGD(a.parameters(), lr={"lowrank": 3e-3, "mlp": 1e-2}[adapter]), [p], steps=k)
        objectives.append(_objective(a, a0, p))
    assert objectives[0] == pytest.approx(0.5 * p.grad.double().square().sum().item(), rel=1e-12)
    assert all(b < a for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < 0.85 * objectives[0]


def _literal_fit(adapter, optimizer, p: Packet) -> None:
    """The squared loss as written, 0.5 * ||g - stopgrad(g - grad)||^2: cancels when |g| >> |grad|."""
    optimizer.zero_grad(set_to_none=True)
    y = adapter(p.x)
    target = (y - p.grad).detach()
    (0.5 * (y - target).square().sum()).backward()
    optimizer.step()


def test_residual_is_free_of_cancellation():
    """|g| ~ 1e3, |dL/dh| ~ 1e-4: g - (g - grad) loses grad to round-off (ulp(1e3) ~ 6e-5),
    while colaft's first fit step is g.backward(grad), bit for bit the backprop step."""
    a0 = _adapter("linear", std=300.0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    copies = [copy.deepcopy(a0) for _ in range(3)]  # backprop, colaft, literal
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-3) for a in copies]
    for step in range(12):
        grad = torch.randn(16, 5, generator=torch.Generator().manual_seed(100 + step)) * 1e-4
        p = Packet("s", x, grad)
        assert copies[0](x).abs().max() > 1e3
        opts[0].zero_grad(set_to_none=True)
        copies[0](x).backward(grad)
        opts[0].step()
        fit({"s": copies[1]}, opts[1], [p])
        _literal_fit(copies[2], opts[2], p)
    backprop, cola, literal = (a.weight - a0.weight for a in copies)
    assert torch.equal(cola, backprop)
    drift = ((literal - backprop).abs().max() / backprop.abs().max()).item()
    print(f"literal residual: relative error of the update after 12 AdamW steps = {drift:.2e}; colaft: 0")
    assert drift > 1e-3  # 100x the exactness tolerance


@pytest.mark.parametrize("where", ["grad", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_packet_skips_the_fit(where, bad):
    a = _adapter("mlp")
    before = copy.deepcopy(a.state_dict())
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    good, broken = _packet(seed=0), _packet(seed=1)
    getattr(broken, where)[3, 2] = bad
    result = fit({"s": a}, opt, [good, broken])
    assert result.skipped and result.rows == 0
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    assert not opt.state and all(q.grad is None for q in a.parameters())
    assert not fit({"s": a}, opt, [good]).skipped  # a finite packet fits


def test_grad_scale_and_several_packets_sum_like_backprop():
    """Packets of one site accumulate; grad_scale multiplies every dL/dh (1/I for an interval)."""
    a0 = _adapter("mlp", seed=3)
    p1, p2 = _packet(seed=1), _packet(n=7, seed=2)
    ref = copy.deepcopy(a0)
    for p in (p1, p2):
        ref(p.x).backward(p.grad * 0.5)
    a = copy.deepcopy(a0)
    opt = torch.optim.SGD(a.parameters(), lr=1.0)
    assert fit({"s": a}, opt, [p1, p2], grad_scale=0.5).rows == 17
    for (name, q), r in zip(a.named_parameters(), ref.parameters()):
        torch.testing.assert_close(q.grad, r.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("adapter", ["lowrank", "mlp"])
def test_literal_residual_drifts_on_a_tiny_llama(adapter):
    """The same on a model: 12 AdamW steps, colaft within 1e-5 of backprop, the literal form not."""
    base = tiny_llama()
    twin = copy.deepcopy(base)
    cm = ColaModel(base, ColaConfig(target_modules=ARCHS["llama"][1], adapter=adapter, hidden=8))
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.3, seed=i)
    ref = Backprop(twin, cm.adapters(), make_opt("adamw", 1e-2))
    literal = {n: copy.deepcopy(a).requires_grad_(True) for n, a in cm.adapters().items()}
    literal_opt = torch.optim.AdamW([q for a in literal.values() for q in a.parameters()], lr=1e-2)
    literal_cm = ColaModel(copy.deepcopy(twin), ColaConfig(target_modules=ARCHS["llama"][1], adapter=adapter,
                                                          hidden=8))
    literal_cm.load_adapter_state({n: a.state_dict() for n, a in literal.items()})
    trainer = Trainer(cm, "adamw", lr=1e-2)
    for step in range(12):
        batch = text_batch(step % 4)
        trainer.step(batch)
        ref.step(batch)
        packets = server_step(literal_cm, batch).packets
        literal_opt.zero_grad(set_to_none=True)
        for p in packets:
            y = literal[p.site](p.x)
            (0.5 * (y - (y - p.grad).detach()).square().sum()).backward()
        literal_opt.step()
        literal_cm.load_adapter_state({n: a.state_dict() for n, a in literal.items()})
    want = flat_state(ref.adapters)
    cola_err = max_rel_err(flat_state(trainer.owner_adapters), want)
    literal_err = max_rel_err(flat_state(literal), want)
    print(f"tiny Llama, {adapter}, 12 AdamW steps: colaft {cola_err:.2e}, literal residual {literal_err:.2e}")
    assert cola_err <= 1e-5 and literal_err > 1e-3


def test_the_public_fit_is_the_function_even_once_its_module_is_loaded():
    """`colaft` imports its names lazily: a submodule called `fit` would shadow the function."""
    import colaft
    import colaft.users  # loads colaft.fitting

    assert callable(colaft.fit) and colaft.fit.__module__ == "colaft.fitting"
