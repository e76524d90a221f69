"""What a task is: a small Protocol, the defaults of its main job, and the registry."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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


class Task(Protocol):
    """A kind of model and data: load, encode, batch and evaluate.

    Records are plain dicts with the task's `fields`; features are per-example dicts that
    `collate` stacks into a batch the model's forward takes (labels included).
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

    def evaluate(self, cola_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out metrics of the adapted model (eval loss included)."""


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


def eval_outputs(cola_model: nn.Module, batches: Iterable[dict]):
    """Yield (batch, output) of the adapted model in eval mode, without gradients."""
    cola_model.eval()
    with torch.no_grad():
        for batch in batches:
            yield batch, cola_model(**batch)


def classification_metrics(cola_model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    """Eval loss (mean per example), accuracy and macro F1 of a model returning .loss and .logits."""
    from sklearn.metrics import accuracy_score, f1_score

    loss_sum, predictions, labels = 0.0, [], []
    for batch, out in eval_outputs(cola_model, batches):
        loss_sum += out.loss.item() * len(batch["labels"])
        predictions += out.logits.argmax(-1).tolist()  # logits (B, classes)
        labels += batch["labels"].tolist()
    return {"loss": loss_sum / len(labels), "accuracy": accuracy_score(labels, predictions),
            "f1": f1_score(labels, predictions, average="macro")}
