"""colaft.tasks: every registered task end to end on a tiny model, then each task's details."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from tiny_models import QA, digit_records, qa_records, review_records, save_tiny_llama

from colaft import ColaConfig, ColaModel, Trainer
from colaft.tasks import TASKS, get_task
from colaft.tasks.clm import IGNORE


@pytest.fixture
def setups(tiny_bert_dir, tiny_llama_dir):
    """task name -> (model to load, records)."""
    reviews = [{"text": r["review"], "label": r["sentiment"]} for r in review_records(1)]
    return {"sc": (str(tiny_bert_dir), reviews), "clm": (str(tiny_llama_dir), qa_records()),
            "ic": ("cnn", digit_records())}


def test_registry_holds_the_three_tasks():
    assert set(TASKS) == {"sc", "clm", "ic"}
    with pytest.raises(ValueError, match="unknown task 'qa'; tasks: "):
        get_task("qa")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_trains_with_its_default_targets(name, setups):
    task = get_task(name)
    model_name, records = setups[name]
    model = task.load(model_name, records, seed=0)
    assert all(f in records[0] for f in task.fields)
    cola = ColaModel(model, ColaConfig(target_modules=task.recipe.targets))
    assert len(cola.sites) >= 2  # the targets matched, plus the head where there is one
    batch = task.collate(task.encode(records[:8], max_length=48))
    before = task.evaluate(cola, [batch])
    trainer = Trainer(cola, lr=1e-2)
    losses = [trainer.step(batch) for _ in range(4)]
    assert losses[-1] < losses[0]  # the same batch, learnt
    after = task.evaluate(cola, [batch])
    assert after["loss"] < before["loss"] == pytest.approx(losses[0], rel=1e-4)  # no dropout in these models
    assert set(after) == {"loss", "accuracy", "f1"} if name != "clm" else {"loss", "perplexity", "rougeL"}



# ---------------------------------------------------------------- users
@pytest.mark.parametrize("name", sorted(TASKS))
def test_users_ride_through_collate_and_are_scored_apart(name, setups):
    task = get_task(name)
    model_name, records = setups[name]
    records = [dict(r, user=["ann", "bob", "cy"][i % 3]) for i, r in enumerate(records[:12])]
    cola = ColaModel(task.load(model_name, records, seed=0), ColaConfig(target_modules=task.recipe.targets), user="ann")
    for user in ("bob", "cy"):
        cola.add_user(user)
    for i, user in enumerate(cola.users):  # distinct non-zero adapters: a user's rows depend on whose they are
        for j, adapter in enumerate(cola.user_adapters(user).values()):
            randomize_(adapter, std=0.2, seed=10 * i + j)
    features = task.encode(records, max_length=48)
    batch = task.collate(features)
    assert [f["user"] for f in features] == batch["users"] == [r["user"] for r in records]
    assert "users" not in task.collate([{k: v for k, v in f.items() if k != "user"} for f in features])

    mixed = task.evaluate(cola, [batch])
    assert set(mixed["users"]) == {"ann", "bob", "cy"}
    assert set(mixed["users"]["ann"]) == ({"loss", "perplexity"} if name == "clm" else {"loss", "accuracy", "f1"})
    for user in cola.users:  # a user's metrics in the mixed batch are those of its rows alone
        mine = [f for f in features if f["user"] == user]
        alone = task.evaluate(cola, [task.collate(mine)])
        assert alone["users"][user] == pytest.approx(mixed["users"][user], rel=1e-5)
        other = task.evaluate(cola, [task.collate([dict(f, user="ann" if user != "ann" else "bob") for f in mine])])
        assert other["loss"] != alone["loss"]  # rows ran on their own user's adapters


# ---------------------------------------------------------------- sc
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


# ---------------------------------------------------------------- clm
def test_clm_loss_only_on_answer_tokens(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    prompt, answer = task.prompt_and_answer("who are you", "i am a tiny bot")
    assert prompt == "<|im_start|>user\nwho are you<|im_end|>\n<|im_start|>assistant\n"
    assert answer == "i am a tiny bot<|im_end|>\n"
    features = task.encode(qa_records()[1:3], max_length=64)
    batch = task.collate(features)
    tok = task.tokenizer
    for row, (ids, labels, mask) in enumerate(zip(batch["input_ids"], batch["labels"], batch["attention_mask"])):
        learnt = labels != IGNORE
        assert tok.decode(labels[learnt]) == f"{qa_records()[1 + row]['answer']}<|im_end|>\n"
        assert (labels[learnt] == ids[learnt]).all()
        assert tok.decode(ids[~learnt & mask.bool()]).endswith("<|im_start|>assistant\n")
        assert (labels[mask == 0] == IGNORE).all()  # padding is never learnt
    assert (batch["attention_mask"] == 0).any()  # the two examples differ in length


def test_clm_without_chat_template_uses_plain_prompt(tmp_path):
    task = get_task("clm")
    task.load(str(save_tiny_llama(tmp_path, chat_template=False)), qa_records(), seed=0)
    assert task.prompt_and_answer("who are you", "a bot") == ("Question: who are you\nAnswer:", " a bot<|im_end|>")


def test_clm_truncation_drops_examples_without_answer(tiny_llama_dir):
    task = get_task("clm")
    task.load(str(tiny_llama_dir), qa_records(), seed=0)
    prompt_len = len(task.tokenizer(task.prompt_and_answer("who are you", "x")[0])["input_ids"])
    features = task.encode(qa_records(), max_length=prompt_len + 2)
    assert all(len(f["input_ids"]) <= prompt_len + 2 for f in features)
    assert all(sum(label != IGNORE for label in f["labels"]) >= 1 for f in features)
    with pytest.raises(ValueError, match="leaves no answer token"):
        task.encode(qa_records(), max_length=3)


def test_clm_metrics(tiny_llama_dir, monkeypatch):
    task = get_task("clm")
    model = task.load(str(tiny_llama_dir), qa_records(), seed=0)
    cola = ColaModel(model, ColaConfig(target_modules=["q_proj"]))
    batches = [task.collate(task.encode(qa_records()[i:i + 3], 64)) for i in (0, 3)]
    metrics = task.evaluate(cola, batches)
    with torch.no_grad():  # the token-weighted mean of the shifted next-token loss
        nll = [F.cross_entropy(model(**b).logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE, reduction="sum") for b in batches]
    tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    assert metrics["loss"] == pytest.approx(sum(nll).item() / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert 0.0 <= metrics["rougeL"] <= 1.0
    answers = task.generate(cola, [task.tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]] * 2)
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: same prompt, same answer

    # ROUGE-L is computed against the held-out answers, in order.
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: [a for _, a in QA[:len(prompts)]])
    assert task.rouge(cola, batches) == 1.0
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: ["zebra"] * len(prompts))
    assert task.rouge(cola, batches) == 0.0
    monkeypatch.setattr(task, "rouge_examples", 2)  # spread out: rows 0 and 3 of the 6
    monkeypatch.setattr(task, "generate", lambda cm, prompts, users=None: [QA[0][1], QA[3][1]])
    assert task.rouge(cola, batches) == 1.0


# ---------------------------------------------------------------- ic
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
