"""colaft.tasks.sc, sequence classification: labels, encoding and padding, the metrics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import review_records

from colaft import ColaConfig, ColaModel
from colaft.tasks import get_task


def test_sc_labels_numbered_in_sorted_order(tiny_bert_dir):
    task = get_task("sc")
    records = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "ok", "label": "mid"}]
    model = task.load(str(tiny_bert_dir), records, seed=0)
    assert model.config.id2label == {0: "mid", 1: "neg", 2: "pos"}
    assert [f["labels"] for f in task.encode(records, 16)] == [2, 1, 0]
    with pytest.raises(ValueError, match="label 'other' was not seen"):
        task.encode([{"text": "x", "label": "other"}], 16)


def test_sc_encode_truncates_and_collate_pads(tiny_bert_dir):
    task = get_task("sc")
    records = [{"text": "a " * 40, "label": 1}, {"text": "short", "label": 0}]
    task.load(str(tiny_bert_dir), records, seed=0)
    features = task.encode(records, max_length=10)
    assert [len(f["input_ids"]) for f in features] == [10, 3]  # [CLS] short [SEP]
    batch = task.collate(features)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1] + [0] * 7
    assert batch["labels"].tolist() == [1, 0]


def test_sc_metrics_match_sklearn_definitions(tiny_bert_dir):
    task = get_task("sc")
    records = [{"text": r["review"], "label": r["sentiment"]} for r in review_records(1)]
    model = task.load(str(tiny_bert_dir), records, seed=0)
    cola = ColaModel(model, ColaConfig(target_modules=["query"]))
    batches = [task.collate(task.encode(records[i:i + 5], 16)) for i in range(0, 16, 5)]  # 5, 5, 5, 1
    metrics = task.evaluate(cola, batches)
    with torch.no_grad():
        logits = torch.cat([model(**b).logits for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    predictions = logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx((predictions == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)  # per example
    per_class = [2 * ((predictions == c) & (labels == c)).sum().item() /
                 max(1, (predictions == c).sum().item() + (labels == c).sum().item()) for c in (0, 1)]
    assert metrics["f1"] == pytest.approx(sum(per_class) / 2)
