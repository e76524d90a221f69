"""A saved classifier comes back exactly in a fresh process, whatever the seed there.

A task head (BERT's classifier) is newly initialised each time the base model is loaded, so a
head's delta means something only on top of the head it was trained on; checkpoints keep that
head (colaft.io.adapters' heads.safetensors; PEFT keeps it whole in modules_to_save). Each
reload below runs in a new Python process seeded differently from the training one.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from colaft import ColaConfig, ColaModel, Trainer

LABELS = 3
RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification
from colaft import ColaModel
how, base_dir, saved, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
inputs = {k: torch.tensor(v) for k, v in json.loads(sys.stdin.read()).items()}
torch.manual_seed(seed)  # a head unlike the training run's
if how == "merged":  # transformers alone
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    users = None
else:
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    if how == "peft-package":
        from peft import PeftModel
        model, users = PeftModel.from_pretrained(base, saved), None
    elif how == "peft":
        model, users = ColaModel.from_peft(base, saved, user="alice"), None
    else:
        model = ColaModel.from_pretrained(base, saved)
        users = ["alice", "bob"] * (len(inputs["input_ids"]) // 2) if len(model.users) > 1 else None
model.eval()
with torch.no_grad():
    logits = model(**inputs, **({"users": users} if users else {})).logits
print(json.dumps(logits.tolist()))
"""


def reload(how: str, base_dir, saved, inputs: dict, seed: int = 1234) -> torch.Tensor:
    out = subprocess.run([sys.executable, "-c", RELOAD, how, str(base_dir), str(saved), str(seed)],
                         input=json.dumps({k: v.tolist() for k, v in inputs.items()}),
                         capture_output=True, text=True, check=True)
    return torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))


def trained(base_dir, users: list[str]) -> tuple[ColaModel, dict]:
    torch.manual_seed(0)  # the training run's head
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=LABELS)
    config = ColaConfig(target_modules=["query", "value"], rank=2, alpha=4)
    cola = ColaModel(base, config, user=users[0])
    for u in users[1:]:
        cola.add_user(u, ColaConfig(target_modules=["query", "value"], rank=4, alpha=4))
    trainer = Trainer(cola, lr=5e-2)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1, 100, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=int)}
    for _ in range(3):
        trainer.step({**inputs, "labels": torch.randint(0, LABELS, (4,), generator=g)},
                     users=[users[i % len(users)] for i in range(4)])
    trainer.close()
    return cola.eval(), inputs


def logits(model, inputs, users=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **({"users": users} if users else {})).logits.float()


def test_one_user_reloads_exactly_through_colaft_peft_and_merged_weights(tiny_bert_dir, tmp_path):
    cola, inputs = trained(tiny_bert_dir, ["alice"])
    want = logits(cola, inputs)
    cola.save_pretrained(tmp_path / "adapters")
    cola.export_peft(tmp_path / "peft")
    assert torch.equal(reload("colaft", tiny_bert_dir, tmp_path / "adapters", inputs), want)
    # PEFT keeps a head whole (W + dW, modules_to_save), and the merged model every site: their
    # products round differently from W x + dW x, so these agree to round-off
    torch.testing.assert_close(reload("peft", tiny_bert_dir, tmp_path / "peft", inputs), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reload("peft-package", tiny_bert_dir, tmp_path / "peft", inputs), want,
                               rtol=1e-5, atol=1e-6)
    cola.merge_and_unload().save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reload("merged", tiny_bert_dir, tmp_path / "merged", inputs), want,
                               rtol=1e-5, atol=1e-6)


def test_several_users_reload_exactly(tiny_bert_dir, tmp_path):
    cola, inputs = trained(tiny_bert_dir, ["alice", "bob"])
    want = logits(cola, inputs, users=["alice", "bob"] * 2)
    cola.save_pretrained(tmp_path / "adapters")
    assert torch.equal(reload("colaft", tiny_bert_dir, tmp_path / "adapters", inputs), want)


def test_the_reload_differs_without_the_saved_head(tiny_bert_dir, tmp_path):
    """What the saved head prevents: the same deltas on another seed's head give other logits."""
    cola, inputs = trained(tiny_bert_dir, ["alice"])
    cola.save_pretrained(tmp_path / "adapters")
    (tmp_path / "adapters" / "heads.safetensors").unlink()  # a checkpoint written before heads were kept
    assert not torch.allclose(reload("colaft", tiny_bert_dir, tmp_path / "adapters", inputs), logits(cola, inputs))


def test_a_head_shared_with_other_users_keeps_its_weights_and_the_loaded_user_its_logits(tiny_bert_dir, tmp_path):
    cola, inputs = trained(tiny_bert_dir, ["alice"])
    want = logits(cola, inputs)
    cola.save_pretrained(tmp_path / "alice")
    torch.manual_seed(77)  # another head, already adapted by another user
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=LABELS)
    other = ColaModel(base, ColaConfig(target_modules=["query"], rank=2), user="carol").eval()
    head = base.classifier.weight.clone()
    carol = logits(other, inputs)
    other.load_adapters(tmp_path / "alice")
    assert torch.equal(base.classifier.weight, head)  # carol's head is untouched
    assert torch.equal(logits(other, inputs, users=["carol"] * 4), carol)
    torch.testing.assert_close(logits(other, inputs, users=["alice"] * 4), want, rtol=1e-5, atol=1e-6)


def test_a_head_of_another_shape_is_refused_before_anything_changes(tiny_bert_dir, tmp_path):
    cola, _ = trained(tiny_bert_dir, ["alice"])
    cola.save_pretrained(tmp_path / "adapters")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=LABELS + 1)
    with pytest.raises(ValueError, match="classifier"):
        ColaModel.from_pretrained(base, tmp_path / "adapters")
    assert not hasattr(base.classifier, "__dict__") or "forward" not in base.classifier.__dict__  # no site left


def test_label_names_are_saved_and_restored_per_user(tiny_bert_dir, tmp_path):
    """ColaModel.labels: each user's names of the head's outputs, in colaft_config.json, next to a PEFT
    export (colaft_labels.json) and in a merged model's config; integer labels stay integers."""
    from colaft.io import adapters as adapter_io
    from colaft.io import peft as peft_io

    cola, _ = trained(tiny_bert_dir, ["alice", "bob"])
    cola.labels = {"alice": ["neg", "pos", "mixed"], "bob": [10, 20, 30]}
    cola.save_pretrained(tmp_path / "colaft")
    index = json.loads((tmp_path / "colaft" / adapter_io.USERS).read_text())
    folders = {e["user"]: e["folder"] for e in index["users"]}
    bob = json.loads((tmp_path / "colaft" / folders["bob"] / adapter_io.CONFIG).read_text())
    assert bob["id2label"] == {"0": 10, "1": 20, "2": 30} and bob["label2id"] == {"10": 0, "20": 1, "30": 2}

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=LABELS)
    assert ColaModel.from_pretrained(base(), tmp_path / "colaft").labels == cola.labels
    assert ColaModel.from_pretrained(base(), tmp_path / "colaft", user="bob").labels == {"bob": [10, 20, 30]}
    other = ColaModel(base(), ColaConfig(target_modules=["query"]), user="carol")
    other.load_adapters(tmp_path / "colaft", user="alice")
    assert other.labels == {"alice": ["neg", "pos", "mixed"]}
    other.remove_user("alice")
    assert other.labels == {}

    cola.export_peft(tmp_path / "peft")  # alice's adapter is the default one; bob's in its folder
    assert peft_io.read_labels(tmp_path / "peft") == ["neg", "pos", "mixed"]
    assert json.loads((tmp_path / "peft" / "bob" / peft_io.LABELS).read_text())["num_labels"] == 3
    assert ColaModel.from_peft(base(), tmp_path / "peft" / "bob", user="b").labels == {"b": [10, 20, 30]}

    cola.remove_user("alice")
    merged = cola.merge_and_unload()
    assert merged.config.id2label == {0: 10, 1: 20, 2: 30} and merged.config.label2id == {"10": 0, "20": 1, "30": 2}
    merged.save_pretrained(tmp_path / "merged")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").config.id2label == \
        {0: 10, 1: 20, 2: 30}


def test_a_model_without_label_names_saves_none(tiny_bert_dir, tmp_path):
    from colaft.io import adapters as adapter_io

    cola, _ = trained(tiny_bert_dir, ["alice"])
    cola.save_pretrained(tmp_path / "colaft")
    assert "id2label" not in json.loads((tmp_path / "colaft" / adapter_io.CONFIG).read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=LABELS)
    assert ColaModel.from_pretrained(base, tmp_path / "colaft").labels == {}
    assert adapter_io.read_labels({"id2label": {"1": "b", "0": "a"}}) == ["a", "b"]
    with pytest.raises(ValueError, match="id2label must number the outputs 0..1"):
        adapter_io.read_labels({"id2label": {"0": "a", "2": "b"}})


IC_RELOAD = r"""
import json, sys, torch
from colaft import ColaModel
from colaft.tasks import get_task
saved, seed = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)  # as the test process: a convolution's sums round by how they are split
records = [{"image": [[0.0] * 8] * 8, "label": i % 10} for i in range(10)]
base = get_task("ic").load("cnn", records, seed=0)  # the run's frozen body (its seed)
torch.manual_seed(seed)
base.classifier.reset_parameters()  # ... under a new head, as a pretrained body would get
model = ColaModel.from_pretrained(base, saved).eval()
pixels = torch.tensor(json.loads(sys.stdin.read()))
with torch.no_grad():
    print(json.dumps(model(pixel_values=pixels).logits.tolist()))
"""


def test_an_image_classifier_reloads_exactly_under_a_new_head(tmp_path):
    from colaft.tasks import get_task

    records = [{"image": [[0.0] * 8] * 8, "label": i % 10} for i in range(10)]
    base = get_task("ic").load("cnn", records, seed=0)
    cola = ColaModel(base, ColaConfig(target_modules=r"conv\d+|fc\d*", rank=2, alpha=4))
    trainer = Trainer(cola, lr=5e-2)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(6, 1, 8, 8, generator=g)
    for _ in range(3):
        trainer.step({"pixel_values": pixels, "labels": torch.randint(0, 10, (6,), generator=g)})
    trainer.close()
    cola.eval()
    want = logits(cola, {"pixel_values": pixels})
    cola.save_pretrained(tmp_path / "adapters")
    out = subprocess.run([sys.executable, "-c", IC_RELOAD, str(tmp_path / "adapters"), "4321"],
                         input=json.dumps(pixels.tolist()), capture_output=True, text=True, check=True)
    assert torch.equal(torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), want)
