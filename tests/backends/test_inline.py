"""The inline backend's delayed mode: the server runs exactly S steps ahead, which is delayed gradient descent."""
from __future__ import annotations

import pytest
from backend_helpers import build, states
from conftest import ARCHS, Backprop, flat_state, make_opt, max_rel_err, randomize_, text_batch

from colaft import ColaConfig, ColaModel, Trainer
from colaft.backends import make_backend


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_delayed_inline_runs_exactly_s_steps_ahead(staleness):
    trainer = Trainer(build(["user.0"]), "sgd", lr=0.1, backend=make_backend("inline", delayed=True),
                      staleness=staleness)
    for t in range(1, 5):
        trainer.step(text_batch(t))
        assert trainer.stats["version"] == max(0, t - staleness)  # the update of step t is used from t + S + 1
    trainer.flush()
    assert trainer.stats["version"] == 4
    if staleness == 0:  # nothing held back: plain inline
        plain = Trainer(build(["user.0"]), "sgd", lr=0.1)
        for t in range(1, 5):
            plain.step(text_batch(t))
        assert max_rel_err(states(trainer), states(plain)) == 0.0


def test_one_step_late_updates_are_delayed_gradient_descent():
    """S = 1 with linear adapters and SGD, against plain autograd: step t's gradient is taken
    at the weights the server had (those after step t - 2) and applied to the owner's (after
    step t - 1). For a linear adapter dg/dw does not depend on w, so ColA's fit is exactly that."""
    factory, targets, _ = ARCHS["llama"]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets, adapter="linear"))
    for i, adapter in enumerate(cm.adapters().values()):
        randomize_(adapter, seed=i)
    ref = Backprop(factory(), dict(cm.adapters()), make_opt("sgd", 0.0))  # its forward and gradients only
    versions = [{n: {k: v.detach().clone() for k, v in a.state_dict().items()} for n, a in ref.adapters.items()}]
    lr = 0.5
    trainer = Trainer(cm, "sgd", lr=lr, backend=make_backend("inline", delayed=True), staleness=1)
    for t in range(1, 7):
        trainer.step(text_batch(t))
        for n, a in ref.adapters.items():
            a.load_state_dict(versions[max(0, t - 2)][n])  # the server's weights at step t
            a.zero_grad(set_to_none=True)
        ref.loss(text_batch(t)).backward()
        versions.append({n: {k: versions[-1][n][k] - lr * p.grad for k, p in a.named_parameters()}
                         for n, a in ref.adapters.items()})
    trainer.flush()
    want = {f"{n}.{k}": v for n, state in versions[-1].items() for k, v in state.items()}
    assert max_rel_err(flat_state(cm.adapters()), want) <= 1e-6
    assert max_rel_err(flat_state(cm.adapters()), {f"{n}.{k}": v for n, state in versions[-2].items()
                                                    for k, v in state.items()}) > 1e-3  # it did move
