"""The training loop of the library: Trainer steps over batches, held-out evaluation, logs.

    features -> DataLoader (shuffled by seed) -> trainer.step(batch) -> loss
             every `eval_every` steps and at both ends: task.evaluate(held-out batches)
             -> metrics.jsonl (one JSON object a line) and loss.png in the run folder
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, works headless (Agg)
from torch.utils.data import DataLoader, RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler
from tqdm import tqdm

from colaft.tasks import Task


def loader(features: Sequence[dict], task: Task, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches of `features`, collated by the task; shuffling is reproducible from `seed`.

    Token sequences are batched with others of similar length, so a batch pads little
    (about half the compute of random batches on short reviews): shuffled within groups by
    transformers' LengthGroupedSampler for training, simply sorted for evaluation.
    """
    generator = torch.Generator().manual_seed(seed)
    if not features or "input_ids" not in features[0]:
        sampler = RandomSampler(features, generator=generator) if shuffle else None
    else:
        lengths = [len(f["input_ids"]) for f in features]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if shuffle else \
            sorted(range(len(features)), key=lengths.__getitem__)
    return DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=task.collate)


def plan_steps(batches_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Training steps: `max_steps` when given (as in transformers' Trainer), else full epochs."""
    steps = max_steps if max_steps is not None else epochs * batches_per_epoch
    if steps < 1:
        raise ValueError(f"nothing to train: {steps} steps")
    return steps


def describe(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(trainer, cola_model, task: Task, batches: DataLoader, eval_batches: list[dict], steps: int,
          out: Path, eval_every: int = 0, log: Callable[[str], None] = tqdm.write) -> dict:
    """Run `steps` Trainer steps, cycling over `batches` as epochs; evaluate and log.

    Args:
        trainer: a colaft.Trainer driving `cola_model`.
        eval_batches: held-out batches for `task.evaluate`.
        out: folder that receives metrics.jsonl and loss.png.
        eval_every: also evaluate every so many steps (0: only before and after).
    Returns:
        {"before": metrics, "after": metrics, "train_seconds": wall time of the steps,
         "skipped_fits": fits skipped for non-finite packets}.
    Raises:
        ValueError: the loss stopped being finite (the learning rate is too high).
    """
    history: list[dict] = []
    with open(out / "metrics.jsonl", "w") as f:
        def record(line: dict) -> None:
            history.append(line)
            f.write(json.dumps(line) + "\n")
            f.flush()

        def evaluate(step: int) -> dict:
            metrics = task.evaluate(cola_model, eval_batches)
            record({"step": step, "split": "eval", **metrics})
            log(f"held-out at step {step}: {describe(metrics)}")
            return metrics

        before = evaluate(0)
        start, smooth = time.perf_counter(), None
        with tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True) as bar:
            for step, (epoch, batch) in zip(range(1, steps + 1), _epochs(batches)):
                lr = trainer.lr  # the rate this step's fit uses
                loss = trainer.step(batch)
                if not math.isfinite(loss):
                    raise ValueError(f"the loss is {loss} at step {step}: lower the learning rate")
                record({"step": step, "split": "train", "epoch": epoch, "loss": loss, "lr": lr,
                        "skipped_fits": trainer.stats["skipped_fits"]})
                smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
                bar.set_postfix(loss=f"{smooth:.4f}", epoch=epoch)
                bar.update()
                if eval_every and step % eval_every == 0 and step < steps:
                    evaluate(step)
        trainer.flush()  # a partial interval at the end still reaches the adapters
        seconds = time.perf_counter() - start
        if skipped := trainer.stats["skipped_fits"]:
            log(f"warning: {skipped} fits skipped: their packets held NaN or Inf (the adapters were left as they were)")
        after = evaluate(steps)
    plot_loss(history, out / "loss.png")
    return {"before": before, "after": after, "train_seconds": seconds, "skipped_fits": skipped}


def _epochs(batches: DataLoader):
    """(epoch, batch) pairs without end; the loader reshuffles at each epoch."""
    if len(batches) == 0:
        raise ValueError("no training batch: the training split is empty")
    for epoch in itertools.count():
        for batch in batches:
            yield epoch, batch


def plot_loss(history: list[dict], path: Path) -> None:
    """Training loss per step, its running mean, and the held-out loss, as a PNG."""
    train = [(r["step"], r["loss"]) for r in history if r["split"] == "train"]
    held_out = [(r["step"], r["loss"]) for r in history if r["split"] == "eval" and "loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 20)
        mean = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()  # (steps - window + 1,)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        ax.plot(steps[window - 1:], mean, color="tab:blue", label=f"train, mean of {window}")
    if held_out:
        ax.plot(*zip(*held_out), "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
