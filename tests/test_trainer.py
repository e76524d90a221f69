"""Trainer: the interval (ColA's I), skipped fits on non-finite packets, schedules; the TrainerLike protocol
and the training loop (train_steps, epochs)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, image_batch, make_opt, max_rel_err, randomize_, text_batch

from colaft import ColaConfig, ColaModel, Trainer
from colaft.trainer import TrainerLike, epochs, train_steps


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


# ---------------------------------------------------------------- the protocol and the loop

class Recording:
    """A TrainerLike that records what the loop asks of it; its learning rate halves at every step."""

    def __init__(self):
        self.model = torch.nn.Identity()
        self.stats = {"steps": 0, "version": 0, "skipped_fits": 0, "packet_bytes": 0}
        self.last_user_losses: dict[str, float] = {}
        self.calls: list[tuple] = []
        self._lr = 1.0

    @property
    def lr(self) -> float:
        return self._lr

    def step(self, batch, users=None) -> float:
        self.calls.append(("step", batch["id"]))
        self._lr /= 2
        return 10.0 * batch["id"]

    def flush(self, users=None) -> None:
        self.calls.append(("flush",))

    def trainable_parameters(self) -> int:
        return 0

    def close(self, wait: bool = True) -> None:
        self.calls.append(("close",))


class Passes:
    """Three batches a pass, counting the passes begun and the batches drawn (a DataLoader reshuffles
    when a pass begins: the loop must not begin one it does not use)."""

    def __init__(self, size: int = 3):
        self.size, self.passes, self.drawn = size, 0, 0

    def __iter__(self):
        self.passes += 1
        for i in range(self.size):
            self.drawn += 1
            yield {"id": i}


def test_trainer_and_anything_with_its_members_are_trainer_likes():
    cm, _ = _setup("llama", "lowrank")
    trainer = Trainer(cm)
    assert isinstance(trainer, TrainerLike) and isinstance(Recording(), TrainerLike)
    assert trainer.last_user_losses == {}  # before any step, as the loop may read it
    assert trainer.trainable_parameters() == cm.adapter_parameters() > 0  # on the owners; the server trains none
    assert cm.trainable_parameters() == 0

    class StepOnly:  # a step alone: the loop would miss its lr, flush, stats...
        def step(self, batch, users=None) -> float:
            return 0.0
    assert not isinstance(StepOnly(), TrainerLike)


def test_train_steps_cycles_the_batches_as_epochs_and_ends_with_one_flush():
    trainer, batches = Recording(), Passes()
    steps = list(train_steps(trainer, batches, 7))
    assert [s.number for s in steps] == [1, 2, 3, 4, 5, 6, 7]
    assert [s.epoch for s in steps] == [0, 0, 0, 1, 1, 1, 2]
    assert [s.batch["id"] for s in steps] == [0, 1, 2, 0, 1, 2, 0]
    assert [s.loss for s in steps] == [0.0, 10.0, 20.0, 0.0, 10.0, 20.0, 0.0]  # what each step returned
    assert [s.lr for s in steps] == [0.5 ** i for i in range(7)]  # the rate before the step: the one it used
    assert trainer.calls == [("step", i % 3) for i in range(7)] + [("flush",)]
    assert (batches.passes, batches.drawn) == (3, 7)  # the third pass only as far as step 7


def test_train_steps_stops_without_drawing_another_batch():
    trainer, batches = Recording(), Passes()
    assert len(list(train_steps(trainer, batches, 3))) == 3
    assert (batches.passes, batches.drawn) == (1, 3)  # no second pass begun (nor reshuffled)


def test_train_steps_without_a_count_is_one_pass_and_flush_is_optional():
    trainer = Recording()
    assert [s.batch["id"] for s in train_steps(trainer, Passes(), flush=False)] == [0, 1, 2]
    assert ("flush",) not in trainer.calls


def test_no_batch_is_an_error():
    with pytest.raises(ValueError, match="no training batch"):
        list(train_steps(Recording(), [], 5))
    with pytest.raises(ValueError, match="no training batch"):
        next(epochs([]))


def test_train_steps_trains_as_steps_and_a_flush_do():
    """ColA with interval 2 over 3 batches, 5 steps: two fits and the flushed partial interval."""
    batches = [text_batch(s) for s in range(3)]
    runs = []
    for use_loop in (True, False):
        cm, _ = _setup("llama", "lowrank")
        trainer = Trainer(cm, "adamw", lr=1e-2, interval=2)
        if use_loop:
            losses = [s.loss for s in train_steps(trainer, batches, 5)]
        else:
            losses = [trainer.step(batches[i % 3]) for i in range(5)]
            trainer.flush()
        assert trainer.stats["version"] == 3
        runs.append((losses, flat_state(cm.adapters())))
    assert runs[0][0] == runs[1][0] and max_rel_err(runs[0][1], runs[1][1]) == 0.0
