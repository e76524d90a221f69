"""Library traps: a users list must have one id per row; a training step leaves the model's mode as it found it."""
from __future__ import annotations

import pytest
import torch
from conftest import text_batch, tiny_llama

from colaft import ColaConfig, ColaModel, Trainer


def two_users() -> ColaModel:
    cola = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj", "v_proj"], rank=2), user="alice")
    cola.add_user("bob")
    return cola


def test_a_users_list_of_another_length_is_refused_not_broadcast():
    cola, batch = two_users(), text_batch(0)
    rows = batch["input_ids"].shape[0]
    for call in (lambda u: cola(**batch, users=u), lambda u: Trainer(cola).step(batch, users=u)):
        with pytest.raises(ValueError, match=rf"1 id\(s\) for a batch of {rows} rows.*users='alice'"):
            call(["alice"])
        with pytest.raises(ValueError, match=f"for a batch of {rows} rows"):
            call(["alice", "bob"] * rows)


def test_one_user_for_every_row_has_its_own_spelling():
    cola, batch = two_users(), text_batch(0)
    rows = batch["input_ids"].shape[0]
    cola.eval()
    with torch.no_grad():
        assert torch.equal(cola(**batch, users="bob").logits, cola(**batch, users=["bob"] * rows).logits)
    trainer = Trainer(cola, lr=1e-2)
    trainer.step(batch, users="alice")
    assert trainer.last_user_losses.keys() == {"alice"}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_step_leaves_the_model_in_the_mode_it_found(mode):
    cola = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj"], rank=2, dropout=0.1))
    cola.train(mode == "train")
    Trainer(cola, lr=1e-2).step(text_batch(0))
    assert cola.training == (mode == "train") and cola.model.training == (mode == "train")
