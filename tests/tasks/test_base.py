"""colaft.tasks.base: the registry, and every registered task end to end on a tiny model: it trains
with its default targets, and its rows' users ride through collate and are scored apart."""
from __future__ import annotations

import pytest
from conftest import randomize_
from tiny_models import digit_records, qa_records, review_records

from colaft import ColaConfig, ColaModel, Trainer
from colaft.tasks import TASKS, get_task


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
