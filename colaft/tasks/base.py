"""What a task is: a small Protocol, the defaults of its main job, and the registry."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from transformers.trainer_pt_utils import LengthGroupedSampler

from colaft.server import element_losses


@dataclass(frozen=True)
class Recipe:
    """A task's defaults, chosen by measurement for its built-in model and data."""

    model: str
    """Built-in model name (colaft.assets), or a model kind the task builds itself."""
    data: str
    """Built-in dataset name (colaft.data)."""
    targets: list[str] | str
    """Adapter sites, as ColaConfig.target_modules."""
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 128
    """Token cap per example (text tasks)."""
    epochs: int = 1
    max_steps: int | None = None
    """Cap on training steps; None trains `epochs` full epochs."""
    metric: str = "accuracy"
    """The held-out metric that ranks runs (colaft experiment picks learning rates by it)."""


class Task(Protocol):
    """A kind of model and data: load, encode, batch and evaluate.

    Records are plain dicts with the task's `fields`; features are per-example dicts that
    `collate` stacks into a batch the model's forward takes (labels included). Records of
    data with users carry a "user": features keep it (`user_of`) and `collate` gathers them
    into the batch's "users", one per row (`keeps_users`), which ColaModel and Trainer route by.
    """

    fields: tuple[str, ...]
    """Record fields the task reads."""
    recipe: Recipe

    def load(self, model: str, records: list[dict], seed: int) -> nn.Module:
        """The base model (and its tokenizer, kept on the task), sized for `records`' labels."""

    def encode(self, records: list[dict], max_length: int) -> list[dict]:
        """Records -> features (token ids, pixels, labels)."""

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Features -> one padded batch."""

    def evaluate(self, cola_model: nn.Module, batches: Iterable[dict]) -> dict:
        """Held-out metrics of the adapted model (eval loss included), metric -> float; when
        the batches carry "users", also each user's on its rows: "users" -> user -> metrics."""


TASKS: dict[str, type[Task]] = {}
"""Task name -> task class (instantiated without arguments)."""


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a task available under `name`."""
    def add(cls: type) -> type:
        TASKS[name] = cls
        return cls
    return add


def get_task(name: str) -> Task:
    """A fresh task by name. Raises ValueError naming the registered tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


# ------------------------------------------------------------------ users
def user_of(record: Mapping) -> dict[str, str]:
    """The part of a feature that says whose it is: {"user": ...}, or {} for data without users."""
    return {"user": record["user"]} if "user" in record else {}


def keeps_users(collate: Callable) -> Callable:
    """Decorate a task's `collate(self, features)`: the features' "user" entries become the
    batch's "users" list (one str per row) instead of reaching the tokenizer or the stacking."""
    @functools.wraps(collate)
    def wrapper(self, features: list[dict]):
        if not features or "user" not in features[0]:
            return collate(self, features)
        batch = collate(self, [{k: v for k, v in f.items() if k != "user"} for f in features])
        batch["users"] = [f["user"] for f in features]
        return batch
    return wrapper


def with_users(metrics: dict[str, float], scores: Callable[[list[int]], dict[str, float]],
               users: Sequence[str]) -> dict:
    """`metrics`, plus "users": user -> `scores(that user's row indices)` when rows have users."""
    if not users:
        return metrics
    rows: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        rows.setdefault(u, []).append(i)
    return {**metrics, "users": {u: scores(rows[u]) for u in sorted(rows)}}


# ------------------------------------------------------------------ metrics
def eval_outputs(cola_model: nn.Module, batches: Iterable[dict]):
    """Yield (batch, output) of the adapted model in eval mode, without gradients; a batch's
    "users" route its rows to their users' adapters (ColaModel.forward takes them)."""
    cola_model.eval()
    with torch.no_grad():
        for batch in batches:
            yield batch, cola_model(**batch)


def classification_metrics(cola_model: nn.Module, batches: Iterable[dict]) -> dict:
    """Eval loss (mean per example), accuracy and macro F1 of a model returning .logits (and
    per user, see Task.evaluate); the per-row loss is the one the model's .loss averages."""
    from sklearn.metrics import accuracy_score, f1_score

    losses, predictions, labels, users = [], [], [], []
    for batch, out in eval_outputs(cola_model, batches):
        losses += element_losses(cola_model.model, out, batch)[0].tolist()  # (B,)
        predictions += out.logits.argmax(-1).tolist()  # logits (B, classes)
        labels += batch["labels"].tolist()
        users += batch.get("users", [])

    def scores(rows: list[int]) -> dict[str, float]:
        y, p = [labels[i] for i in rows], [predictions[i] for i in rows]
        return {"loss": sum(losses[i] for i in rows) / len(rows), "accuracy": accuracy_score(y, p),
                "f1": f1_score(y, p, average="macro", zero_division=0)}  # 0 for a class a user lacks, unwarned
    return with_users(scores(list(range(len(labels)))), scores, users)


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
