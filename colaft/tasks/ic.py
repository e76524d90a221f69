"""Image classification: a small CNN or MLP built here, randomly initialised and frozen.

ColA then trains only the adapters on top of fixed random features, which is enough for
digits and shows the method on a non-transformer model (Conv2d sites included).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from colaft.tasks.base import Recipe, classification_metrics, keeps_users, register_task, user_of


@dataclass
class Output:
    """What the models return, like transformers' outputs."""

    logits: torch.Tensor  # (B, classes)
    loss: torch.Tensor | None = None


class ImageModel(nn.Module):
    """Shared head: `features` -> `classifier`; cross-entropy when labels are given."""

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.classifier(self.features(pixel_values))  # (B, classes)
        return Output(logits, None if labels is None else F.cross_entropy(logits, labels))


class CNN(ImageModel):
    def __init__(self, classes: int, channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, 128)
        self.classifier = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 4)  # (B, 2w, 4, 4) whatever the image size
        return F.relu(self.fc(x.flatten(1)))  # (B, 128)


class MLP(ImageModel):
    def __init__(self, classes: int, pixels: int, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))  # (B, hidden)


@register_task("ic")
class ImageClassification:
    """Models: "cnn" or "mlp". Labels must be integers 0..K-1."""

    fields = ("image", "label")
    recipe = Recipe(model="cnn", data="digits", targets=r"conv\d+|fc\d*", lr=1e-2, batch_size=64, epochs=5)
    models = ("cnn", "mlp")

    def load(self, model: str, records: list[dict], seed: int) -> nn.Module:
        classes = max(int(r["label"]) for r in records) + 1
        shape = np.shape(records[0]["image"])
        channels, pixels = (shape[0] if len(shape) == 3 else 1), int(np.prod(shape))
        torch.manual_seed(seed)
        if model == "cnn":
            return CNN(classes, channels)
        if model == "mlp":
            return MLP(classes, pixels)
        raise ValueError(f"unknown model {model!r} for task ic; models: {', '.join(self.models)}")

    def encode(self, records: list[dict], max_length: int = 0) -> list[dict]:
        # An image is (H, W) or (C, H, W); jsonl files give nested lists.
        images = [torch.as_tensor(np.asarray(r["image"], dtype=np.float32)) for r in records]
        return [{"pixel_values": im.reshape(-1, *im.shape[-2:]), "labels": int(r["label"]), **user_of(r)}  # (C, H, W)
                for im, r in zip(images, records)]

    @keeps_users
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return default_collate(features)  # pixel_values (B, C, H, W), labels (B,)

    def evaluate(self, cola_model: nn.Module, batches: Iterable[dict]) -> dict:
        return classification_metrics(cola_model, batches)
