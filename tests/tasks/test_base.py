"""colaft.tasks.base: the registry, every registered task end to end on a tiny model (it trains
with its default targets, its rows' users ride through collate and are scored apart), and the loader."""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from tiny_models import digit_records, qa_records, review_records

from colaft import ColaConfig, ColaModel, Trainer
from colaft.tasks import TASKS, get_task, loader


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


# ---------------------------------------------------------------- loader
def test_loader_batches_text_of_similar_length_and_shuffles_reproducibly(tiny_bert_dir):
    task = get_task("sc")
    records = [{"text": "word " * n, "label": n % 2} for n in range(1, 25)] * 8  # 24 lengths, 192 examples
    task.load(str(tiny_bert_dir), records, seed=0)
    features = task.encode(records, 64)

    def lengths(batches) -> list[list[int]]:
        return [b["attention_mask"].sum(1).tolist() for b in batches]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(b) * len(b) - sum(b) for b in batches)

    held_out = lengths(loader(features, task, 4, shuffle=False))  # evaluation: sorted by length
    assert [n for b in held_out for n in b] == sorted(len(f["input_ids"]) for f in features)

    def epoch(seed: int) -> list[list[int]]:
        return lengths(loader(features, task, 4, shuffle=True, seed=seed))

    assert epoch(1) == epoch(1) != epoch(2)
    assert sorted(n for b in epoch(1) for n in b) == sorted(n for b in held_out for n in b)  # each example once
    everyone = [n for b in held_out for n in b]
    order = torch.randperm(len(everyone), generator=torch.Generator().manual_seed(1)).tolist()
    random_batches = [[everyone[i] for i in order[k:k + 4]] for k in range(0, len(order), 4)]
    assert padding(epoch(1)) < 0.3 * padding(random_batches)  # shuffled within groups of similar length


def test_loader_keeps_images_in_order_unless_shuffled():
    task = get_task("ic")
    features = task.encode(digit_records(12))
    labels = [f["labels"] for f in features]
    held_out = [b["labels"].tolist() for b in loader(features, task, 5, shuffle=False)]
    assert [len(b) for b in held_out] == [5, 5, 2] and sum(held_out, []) == labels

    def epoch(seed: int) -> list[int]:
        return sum((b["labels"].tolist() for b in loader(features, task, 5, shuffle=True, seed=seed)), [])

    assert epoch(3) == epoch(3) and sorted(epoch(3)) == sorted(labels)
