"""Image classification: a small CNN or MLP built here, randomly initialised and frozen.

ColA then trains only the adapters on top of fixed random features, which is enough for
digits and shows the method on a non-transformer model (Conv2d sites included).

Images are arrays, or image files (a folder of one subfolder per class, or a file's paths):
files are decoded with Pillow to the channels and size the model is built for.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from colaft.formats import image_info, load_image
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
    """Models: "cnn" or "mlp". Labels are integers 0..K-1, or any text, numbered in sorted order.

    Image files are made grey when all of them are, else RGB, and resized to the most common
    size among them (the first such, on a tie): the models take one size, chosen at `load`.
    """

    fields = ("image", "label")
    recipe = Recipe(model="cnn", data="digits", targets=r"conv\d+|fc\d*", lr=1e-2, batch_size=64, epochs=5)
    models = ("cnn", "mlp")
    channels: int | None = None
    size: tuple[int, int] | None = None
    """(width, height) image files are resized to; None: each file's own."""
    label_ids: dict | None = None
    """Text label -> class; None: labels are the class numbers."""

    def load(self, model: str, records: list[dict], seed: int) -> nn.Module:
        labels = sorted({r["label"] for r in records}, key=lambda v: (isinstance(v, str), v))
        if all(isinstance(v, int) for v in labels):
            classes, self.label_ids = max(labels) + 1, None
        else:
            classes, self.label_ids = len(labels), {v: i for i, v in enumerate(labels)}
        files = [r["image"] for r in records if isinstance(r["image"], Path)]
        if files:
            info = [image_info(f) for f in files]
            self.channels = max(c for c, _ in info)
            self.size = Counter(size for _, size in info).most_common(1)[0][0]
            shape = (self.channels, self.size[1], self.size[0])
        else:
            shape = np.shape(records[0]["image"])
        channels, pixels = (shape[0] if len(shape) == 3 else 1), int(np.prod(shape))
        torch.manual_seed(seed)
        if model == "cnn":
            return CNN(classes, channels)
        if model == "mlp":
            return MLP(classes, pixels)
        raise ValueError(f"unknown model {model!r} for task ic; models: {', '.join(self.models)}")

    def encode(self, records: list[dict], max_length: int = 0) -> list[dict]:
        # An image is (H, W) or (C, H, W) (jsonl files give nested lists), or a file's path.
        images = [torch.as_tensor(load_image(r["image"], self.channels, self.size) if isinstance(r["image"], Path)
                                  else np.asarray(r["image"], dtype=np.float32)) for r in records]
        return [{"pixel_values": im.reshape(-1, *im.shape[-2:]), "labels": self._label_id(r["label"]),
                 **user_of(r)} for im, r in zip(images, records)]  # pixel_values (C, H, W)

    def _label_id(self, label) -> int:
        if self.label_ids is None:
            return int(label)
        if label not in self.label_ids:
            raise ValueError(f"label {label!r} was not seen when the model was loaded; labels: {list(self.label_ids)}")
        return self.label_ids[label]

    @keeps_users
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return default_collate(features)  # pixel_values (B, C, H, W), labels (B,)

    def evaluate(self, cola_model: nn.Module, batches: Iterable[dict]) -> dict:
        return classification_metrics(cola_model, batches)
