"""colaft.tasks.ic, image classification: the models it builds, seeding, and records from JSONL."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import digit_records

from colaft.tasks import get_task


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (3, 12, 12)])
def test_ic_models_fit_any_image_shape(kind, shape):
    task = get_task("ic")
    records = [{"image": np.random.default_rng(i).random(shape, dtype=np.float32), "label": i % 4} for i in range(6)]
    model = task.load(kind, records, seed=0)
    batch = task.collate(task.encode(records))
    channels = shape[0] if len(shape) == 3 else 1
    assert batch["pixel_values"].shape == (6, channels, *shape[-2:])
    out = model(**batch)
    assert out.logits.shape == (6, 4)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, batch["labels"]).item())
    assert model(batch["pixel_values"]).loss is None


def test_ic_initialisation_is_seeded():
    task = get_task("ic")
    records = digit_records(10)
    a, b, c = (task.load("cnn", records, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    with pytest.raises(ValueError, match="unknown model 'resnet' for task ic; models: cnn, mlp"):
        task.load("resnet", records, seed=0)


def test_ic_accepts_nested_lists_from_jsonl():
    task = get_task("ic")
    features = task.encode([{"image": [[0.0, 1.0], [0.5, 0.25]], "label": 1}])
    assert features[0]["pixel_values"].tolist() == [[[0.0, 1.0], [0.5, 0.25]]]


def test_ic_image_files_share_the_models_channels_and_size(tmp_path):
    from PIL import Image

    from colaft.formats import DataError

    paths = []
    for i, (mode, size, value) in enumerate([("L", (8, 6), 255), ("RGB", (4, 4), (255, 0, 0)), ("L", (8, 6), 0)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new(mode, size, value).save(paths[-1])
    records = [{"image": p, "label": label} for p, label in zip(paths, ["dog", "cat", "dog"])]
    task = get_task("ic")
    model = task.load("mlp", records, seed=0)
    assert (task.channels, task.size) == (3, (8, 6))  # one colour image: RGB; the most common size
    assert model.fc1.in_features == 3 * 6 * 8
    batch = task.collate(task.encode(records))
    assert batch["pixel_values"].shape == (3, 3, 6, 8) and batch["labels"].tolist() == [1, 0, 1]  # cat, dog
    assert batch["pixel_values"][0].min() == 1.0 and batch["pixel_values"][2].max() == 0.0
    torch.testing.assert_close(batch["pixel_values"][1, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # resized red
    assert model(**batch).logits.shape == (3, 2)
    with pytest.raises(ValueError, match="label 'bird' was not seen"):
        task.encode([{"image": paths[0], "label": "bird"}])
    paths[1].write_bytes(b"broken")
    with pytest.raises(DataError, match=r"image '.*1.png': cannot read it"):
        task.encode(records)
    with pytest.raises(DataError, match=r"image '.*1.png': cannot read it"):
        get_task("ic").load("cnn", records, seed=0)
