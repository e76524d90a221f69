"""Trainer: the interval (ColA's I), skipped fits on non-finite packets, schedules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, image_batch, make_opt, max_rel_err, randomize_, text_batch

from colaft import ColaConfig, ColaModel, Trainer


def _setup(arch: str, adapter: str, seed: int = 0):
    factory, targets, _ = ARCHS[arch]
    base = factory()
    twin = copy.deepcopy(base)
    cm = ColaModel(base, ColaConfig(target_modules=targets, adapter=adapter, hidden=8))
    for i, a in enumerate(cm.adapters().values()):
        randomize_(a, std=0.05, seed=seed + i)
    return cm, Backprop(twin, cm.adapters(), make_opt("adamw", 1e-2))


@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp"])
def test_interval_two_is_gradient_accumulation_over_two_batches(adapter):
    cm, ref = _setup("llama", adapter)
    trainer = Trainer(cm, "adamw", lr=1e-2, interval=2)
    batches = [text_batch(seed) for seed in range(9)]
    for i, b in enumerate(batches[:8]):
        server_before = flat_state(cm.adapters())
        trainer.step(b)
        if i % 2 == 0:  # mid-interval: packets buffered, nothing fitted, the server unchanged
            assert trainer.stats["version"] == i // 2
            assert max_rel_err(flat_state(cm.adapters()), server_before) == 0.0
        else:
            ref.step(batches[i - 1], b)
            assert trainer.stats["version"] == (i + 1) // 2
            assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-5
    # a partial interval fitted by flush() averages over the steps it holds (here one)
    trainer.step(batches[8])
    assert trainer.stats["version"] == 4
    trainer.flush()
    ref.step(batches[8])
    assert trainer.stats["version"] == 5
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-5


def _snapshot(trainer):
    return (flat_state(trainer.owner_adapters), flat_state(trainer.model.adapters()),
            copy.deepcopy(trainer.optimizer.state_dict()))


def _assert_same(a, b):
    assert max_rel_err(a[0], b[0]) == 0.0 and max_rel_err(a[1], b[1]) == 0.0
    assert a[2]["state"].keys() == b[2]["state"].keys()
    for k, s in a[2]["state"].items():
        assert all(torch.equal(v, b[2]["state"][k][n]) for n, v in s.items())


@pytest.mark.parametrize("how", ["nan_loss", "inf_input"])
def test_non_finite_packets_skip_the_fit_and_training_goes_on(how):
    """A poisoned step changes nothing (adapters, server, optimizer state); the run then
    equals backprop on the batches without the poisoned one."""
    arch = "gpt2" if how == "nan_loss" else "cnn"
    cm, ref = _setup(arch, "linear")
    scale = [1.0]
    trainer = Trainer(cm, "adamw", lr=1e-2, loss_fn=lambda out, batch: out.loss * scale[0])
    make = (lambda s: text_batch(s)) if arch == "gpt2" else (lambda s: image_batch(s))
    for s in range(2):
        trainer.step(make(s))
        ref.step(make(s))
    before = _snapshot(trainer)
    poisoned = make(2)
    if how == "nan_loss":
        scale[0] = float("nan")
    else:
        poisoned["pixel_values"][1, 0, 2, 3] = float("inf")
    loss = trainer.step(poisoned)
    assert not math.isfinite(loss)
    assert trainer.stats["skipped_fits"] == 1 and trainer.stats["version"] == 2 and trainer.stats["steps"] == 3
    _assert_same(_snapshot(trainer), before)
    scale[0] = 1.0
    for s in range(3, 5):
        trainer.step(make(s))
        ref.step(make(s))
    assert trainer.stats["skipped_fits"] == 1 and trainer.stats["version"] == 4
    assert max_rel_err(flat_state(trainer.owner_adapters), flat_state(ref.adapters)) <= 1e-5


def test_a_non_finite_step_skips_its_whole_interval():
    cm, _ = _setup("llama", "linear")
    scale = [1.0]
    trainer = Trainer(cm, "sgd", lr=0.1, interval=2, loss_fn=lambda out, batch: out.loss * scale[0])
    before = flat_state(cm.adapters())
    trainer.step(text_batch(0))
    scale[0] = float("inf")
    trainer.step(text_batch(1))
    assert trainer.stats["skipped_fits"] == 1 and trainer.stats["version"] == 0
    assert max_rel_err(flat_state(cm.adapters()), before) == 0.0
    assert trainer.owner().pending == [] and trainer.owner().pending_steps == 0


def test_scheduler_steps_once_per_optimizer_step():
    """total_steps=4, interval=2, fit_steps=3: 2 fits x 3 optimizer steps, linear decay to 0."""
    cm, _ = _setup("llama", "lowrank")
    trainer = Trainer(cm, "sgd", lr=0.6, scheduler="linear", total_steps=4, interval=2, fit_steps=3)
    lrs = []
    for s in range(4):
        trainer.step(text_batch(s))
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.6, 0.3, 0.3, 0.0], abs=1e-12)
    assert trainer.scheduler.last_epoch == 6


def test_trainer_arguments_are_checked():
    cm, _ = _setup("llama", "lowrank")
    with pytest.raises(ValueError, match="interval and fit_steps must be >= 1"):
        Trainer(cm, interval=0)
    with pytest.raises(ValueError, match="needs total_steps"):
        Trainer(cm, scheduler="cosine")
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        Trainer(cm, "lion")
    trainer = Trainer(cm, torch.optim.RMSprop, lr=1e-3, optimizer_kwargs={"alpha": 0.9})
    assert isinstance(trainer.optimizer, torch.optim.RMSprop) and trainer.optimizer.defaults["alpha"] == 0.9


def test_owner_may_fit_in_another_precision():
    """fit_dtype=float64: the owner trains in float64, the server keeps its float32 copies."""
    cm, ref = _setup("llama", "linear")
    trainer = Trainer(cm, "adamw", lr=1e-2, fit_dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in (p for a in trainer.owner_adapters.values() for p in a.parameters()))
    for s in range(3):
        trainer.step(text_batch(s))
        ref.step(text_batch(s))
    assert all(p.dtype == torch.float32 for p in cm.parameters())
    assert max_rel_err(flat_state(cm.adapters()), flat_state(ref.adapters)) <= 1e-5
