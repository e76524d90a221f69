"""The training loop of colaft train: it drives ColA and the backprop baseline alike; fits skipped for
non-finite packets are reported; user_steps replays the batches."""
from __future__ import annotations

import json

import pytest
import torch

from colaft import ColaConfig, ColaModel, Trainer, data, tasks
from colaft.app import baselines, loop
from colaft.tasks import get_task
from colaft.trainer import TrainerLike, epochs


class _InfGradient(torch.autograd.Function):
    """Identity forward, Inf backward: a finite loss whose dL/dh is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_skipped_fits_are_logged_and_recorded(tmp_path):
    task = get_task("ic")
    records = [{"image": torch.rand(8, 8).numpy(), "label": i % 10} for i in range(16)]
    model = task.load("mlp", records, seed=0)
    cola = ColaModel(model, ColaConfig(target_modules="all-linear", adapter="linear"))
    poisoned = {"armed": True}

    def loss_fn(output, batch):
        logits = _InfGradient.apply(output.logits) if poisoned.pop("armed", False) else output.logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    trainer = Trainer(cola, lr=1e-2, loss_fn=loss_fn)
    features = task.encode(records, max_length=0)
    batches = tasks.loader(features, task, batch_size=8, shuffle=True)
    messages = []
    result = loop.train(trainer, cola, task, batches, list(tasks.loader(features, task, 8, False)), steps=3,
                        out=tmp_path, log=messages.append)
    assert result["skipped_fits"] == 1 and trainer.stats["version"] == 2  # the 1st fit skipped, 2 applied
    assert any("1 fits skipped" in m for m in messages)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_fits"] for r in lines if r["split"] == "train"] == [1, 1, 1]


def test_user_steps_counts_batches_per_user_and_leaves_the_order_alone():
    task = get_task("ic")
    records = data.assign_users([{"image": torch.rand(8, 8).numpy(), "label": i % 10} for i in range(30)], 4)
    features = task.encode(records)

    def order(batches, steps):  # the users of each batch over `steps` batches (epochs reshuffle)
        return [b["users"] for _, (_, b) in zip(range(steps), epochs(batches))]
    plain = order(tasks.loader(features, task, 4, shuffle=True, seed=5), 20)
    counted = tasks.loader(features, task, 4, shuffle=True, seed=5)
    steps = loop.user_steps(counted, 20)
    assert order(counted, 20) == plain  # counting did not consume the shuffling
    assert steps == {u: sum(u in users for users in plain) for u in ("user1", "user2", "user3", "user4")}
    assert 20 > min(steps.values())  # batches of 4 from 4 users: some miss some users


@pytest.mark.parametrize("method", ["cola", "full"])
def test_the_loop_drives_cola_and_the_backprop_baseline_alike(method, tmp_path):
    task = get_task("ic")
    records = [{"image": torch.rand(8, 8).numpy(), "label": i % 10} for i in range(16)]
    torch.manual_seed(0)
    base = task.load("mlp", records, seed=0)
    if method == "cola":
        model = ColaModel(base, ColaConfig(target_modules="all-linear", adapter="linear"))
        trainer = Trainer(model, lr=1e-2)
    else:
        model = baselines.build("full", base, "ic", "all-linear")
        trainer = baselines.BackpropTrainer(model, lr=1e-2)
    assert isinstance(trainer, TrainerLike)
    features = task.encode(records, max_length=0)
    batches = tasks.loader(features, task, batch_size=8, shuffle=True)  # two batches a pass
    held_out = list(tasks.loader(features, task, 8, False))
    result = loop.train(trainer, model, task, batches, held_out, steps=3, out=tmp_path, log=[].append)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r.get("epoch")) for r in lines] == [
        (0, "eval", None), (1, "train", 0), (2, "train", 0), (3, "train", 1), (3, "eval", None)]
    assert all(r["lr"] == pytest.approx(1e-2) for r in lines if r["split"] == "train")
    assert trainer.stats["steps"] == trainer.stats["version"] == 3  # every step's update applied
    assert result["after"] == task.evaluate(model, held_out) != result["before"]
    trained = [p for a in model.adapters().values() for p in a.parameters()] if method == "cola" else \
        list(model.net.parameters())  # ColA: the adapters; full fine-tuning: every weight
    assert trainer.trainable_parameters() == sum(p.numel() for p in trained) > 0


def test_the_progress_bar_draws_only_inside_its_interrupt_guard():
    """Ctrl-C right after the bar first appeared left it half-drawn before the command's last word:
    the bar drew in its constructor, before the guard that wipes it was entered."""
    import io

    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with loop._progress_bar(total=10, desc="train", file=stream, mininterval=0) as bar:
            assert stream.getvalue() == ""  # nothing drawn before the guard is in place
            bar.update()
            assert "train:" in stream.getvalue()
            raise KeyboardInterrupt
    assert stream.getvalue().split("\r")[-1] == ""  # the bar is wiped: the next line starts clean
