"""The training loop of the library: Trainer steps over batches, held-out evaluation, logs.

    features -> DataLoader (shuffled by seed) -> train_steps: trainer.step(batch) -> loss
             every `eval_every` steps and at both ends: task.evaluate(held-out batches)
             -> metrics.jsonl (one JSON object a line) and loss.png in the run folder

Batches of data with users mix every user's rows; the log then also holds each user's
training loss and held-out metrics, and users.md tabulates them before and after.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, works headless (Agg)
from torch.utils.data import DataLoader
from tqdm import tqdm

from colaft.tasks import Task
from colaft.trainer import TrainerLike, epochs, train_steps


def plan_steps(batches_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """Training steps: `max_steps` when given (as in transformers' Trainer), else full epochs."""
    steps = max_steps if max_steps is not None else epochs * batches_per_epoch
    if steps < 1:
        raise ValueError(f"nothing to train: {steps} steps")
    return steps


def user_steps(batches: DataLoader, steps: int) -> dict[str, int]:
    """Of the first `steps` batches `batches` will give, how many hold rows of each user.

    A user's owner fits only on steps with its rows, so this is the length of its schedule.
    The sampler's generator is put back as it was: training then sees the same batches.
    """
    users = [f["user"] for f in batches.dataset]
    generator = getattr(batches.sampler, "generator", None)
    state = generator.get_state() if generator is not None else None
    counts: Counter = Counter()
    try:
        for _, (_, indices) in zip(range(steps), epochs(batches.batch_sampler)):
            counts.update({users[i] for i in indices})
    finally:
        if state is not None:
            generator.set_state(state)
    return {u: counts[u] for u in sorted(set(users))}


class OneAdapter(torch.nn.Module):
    """A ColaModel with one user seen by every row: held-out batches of several users then run
    through that one adapter while the task still reports each user's metrics (--mode shared)."""

    def __init__(self, cola_model):
        super().__init__()
        self.cola_model, self.model = cola_model, cola_model.model

    def forward(self, *args, users=None, **kwargs):
        return self.cola_model(*args, **kwargs)

    def generate(self, *args, users=None, **kwargs):
        return self.cola_model.generate(*args, **kwargs)


def describe(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "users")


def plural(n: int, noun: str) -> str:
    """'1 user', '3 users': counts in the lines a run prints."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def train(trainer: TrainerLike, cola_model, task: Task, batches: DataLoader, eval_batches: list[dict], steps: int,
          out: Path, eval_every: int = 0, log: Callable[[str], None] = tqdm.write) -> dict:
    """Run `steps` trainer steps (colaft.trainer.train_steps), cycling over `batches` as epochs;
    evaluate and log.

    Args:
        trainer: ColA's Trainer or a backprop baseline, driving `cola_model`.
        eval_batches: held-out batches for `task.evaluate`.
        out: folder that receives metrics.jsonl and loss.png.
        eval_every: also evaluate every so many steps (0: only before and after).
    Batches with "users" (one per row) are logged per user too: training loss per user
    (trainer.last_user_losses; "loss" is then their mean) and held-out metrics per user,
    tabulated in out/users.md. Every step logs its packets' size ("bytes").
    Returns:
        {"before": metrics, "after": metrics, "train_seconds": wall time of the steps,
         "skipped_fits": fits skipped for non-finite packets}; with users the metrics hold
         "users": user -> metrics (Task.evaluate).
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
        with _progress_bar(total=steps, desc="train", unit="step", dynamic_ncols=True) as bar:
            for step in train_steps(trainer, batches, steps):  # ends with a flush: a partial interval counts
                loss = step.loss
                if not math.isfinite(loss):
                    raise ValueError(f"the loss is {loss} at step {step.number}: lower the learning rate")
                per_user = {"users": dict(trainer.last_user_losses)} if "users" in step.batch else {}
                if per_user:  # the step's loss sums the users' losses: their mean keeps the held-out loss's scale
                    loss = sum(per_user["users"].values()) / len(per_user["users"])
                record({"step": step.number, "split": "train", "epoch": step.epoch, "loss": loss, "lr": step.lr,
                        "skipped_fits": trainer.stats["skipped_fits"], "bytes": trainer.stats["packet_bytes"],
                        **per_user})
                smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
                bar.set_postfix(loss=f"{smooth:.4f}", epoch=step.epoch)
                bar.update()
                if eval_every and step.number % eval_every == 0 and step.number < steps:
                    evaluate(step.number)
        seconds = time.perf_counter() - start
        if skipped := trainer.stats["skipped_fits"]:
            log(f"warning: {skipped} fits skipped: their packets held NaN or Inf (the adapters were left as they were)")
        after = evaluate(steps)
    plot_loss(history, out / "loss.png")
    if "users" in after:
        table = users_table(before, after, _rows_per_user(batches, eval_batches))
        (out / "users.md").write_text(table)
        log(f"held-out per user, before -> after:\n{table}")
    return {"before": before, "after": after, "train_seconds": seconds, "skipped_fits": skipped}


@contextmanager
def _progress_bar(**kwargs) -> Iterator[tqdm]:
    """A tqdm bar that Ctrl-C wipes as it closes (no half-drawn line before the command's last word).

    The bar draws nothing until its first update (`delay`): every draw happens inside the `try`,
    so an interrupt can never land between a first draw and the guard that wipes it.
    """
    bar = tqdm(delay=1e-9, **kwargs)
    try:
        yield bar
    except KeyboardInterrupt:
        bar.leave = False
        raise
    finally:
        bar.close()


def _rows_per_user(batches: DataLoader, eval_batches: list[dict]) -> dict[str, tuple[int, int]]:
    """user -> (training rows, held-out rows)."""
    train = Counter(f["user"] for f in batches.dataset)
    held_out = Counter(u for b in eval_batches for u in b["users"])
    return {u: (train[u], held_out[u]) for u in sorted(train.keys() | held_out.keys())}


def users_table(before: dict | None, after: dict, rows: dict[str, tuple[int, int]],
                counts: tuple[str, str] = ("train rows", "held-out rows")) -> str:
    """A markdown table: each user's rows and held-out metrics before -> after, then all users'.

    `before` None: the `after` metrics alone. `rows`: user -> the two row counts named by `counts`.
    """
    names = [k for k in after if k in next(iter(after["users"].values()))]  # the metrics users have
    lines = [f"| user | {counts[0]} | {counts[1]} | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]

    def cells(b: dict | None, a: dict) -> str:
        return " | ".join((f"{b[k]:.4f} -> " if b is not None else "") + f"{a[k]:.4f}" for k in names)
    for user, (n_first, n_second) in rows.items():
        b, a = (before or {}).get("users", {}).get(user), after["users"].get(user)
        lines.append(f"| {user} | {n_first} | {n_second} | " +
                     (cells(b, a) if a is not None else " | ".join(["-"] * len(names))) + " |")
    totals = [sum(r) for r in zip(*rows.values())]
    lines.append(f"| all | {totals[0]} | {totals[1]} | {cells(before, after)} |")
    return "\n".join(lines) + "\n"


def plot_loss(history: list[dict], path: Path) -> None:
    """Training loss per step, its running mean, and the held-out loss, as a PNG; with users,
    a second panel has each user's (running-mean training loss, held-out loss)."""
    train = [(r["step"], r["loss"]) for r in history if r["split"] == "train"]
    held_out = [(r["step"], r["loss"]) for r in history if r["split"] == "eval" and "loss" in r]
    users = sorted({u for r in history for u in r.get("users", {})})
    fig = Figure(figsize=(7 + 7 * bool(users) + 2 * (len(users) > 6), 4), dpi=100)
    ax = fig.add_subplot(1, 2 if users else 1, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
        _running_mean(ax, steps, losses, color="tab:blue", label="train, mean of {}")
    if held_out:
        ax.plot(*zip(*held_out), "o-", color="tab:orange", label="held-out")
    _finish(ax, "all users" if users else None)
    if users:
        ax = fig.add_subplot(1, 2, 2)
        colors = matplotlib.colormaps["tab20"] if len(users) > 10 else matplotlib.colormaps["tab10"]
        for i, user in enumerate(users):
            color = colors(i % colors.N)
            mine = [r for r in history if user in r.get("users", {})]
            trained = [(r["step"], r["users"][user]) for r in mine if r["split"] == "train"]
            if trained:
                _running_mean(ax, *zip(*trained), color=color, label=f"{user} (mean of {{}})")
            held = [(r["step"], r["users"][user]["loss"]) for r in mine if r["split"] == "eval"]
            if held:
                ax.plot(*zip(*held), "o--", color=color, markersize=4)
        _finish(ax, "per user: training (lines), held-out (dashed, dots)", many=len(users) > 6)
    fig.tight_layout()
    fig.savefig(path)


def _running_mean(ax, steps: Sequence[int], losses: Sequence[float], color, label: str) -> None:
    """The mean of the last len/20 losses, drawn from the step where the first window is full."""
    window = max(1, len(losses) // 20)
    mean = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()  # (steps - window + 1,)
    ax.plot(steps[window - 1:], mean, color=color, label=label.format(window))


def _finish(ax, title: str | None, many: bool = False) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize="medium")
    if many:  # a long legend goes beside the curves, not over them
        columns = 2 if len(ax.get_legend_handles_labels()[1]) > 16 else 1
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns)
    else:
        ax.legend()
    ax.grid(alpha=0.3)
