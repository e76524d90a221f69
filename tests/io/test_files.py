"""colaft.io.files: atomic folders and files. Every checkpoint writer (adapters, trainer, PEFT) keeps
the old checkpoint when it fails half way, and never replaces a folder that is not a checkpoint."""
from __future__ import annotations

import copy

import pytest
import torch
from checkpoint_helpers import assert_states_equal, batch, tiny, trained
from conftest import ARCHS, randomize_
from users_helpers import IDS, same_users, users_model

from colaft import ColaModel, Trainer
from colaft.io import adapters as adapter_io
from colaft.io import peft as peft_io
from colaft.io import state as state_io

# ---------------------------------------------------------------- every writer is atomic

def crash_on_call(monkeypatch, n: int, module) -> None:
    """Make the n-th safetensors write of `module` die half way, as a full disk or a kill would."""
    calls = []

    def writer(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == n:
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)
            raise OSError("disk full")
        save_file(tensors, path, metadata)

    save_file = module.save_file
    monkeypatch.setattr(module, "save_file", writer)


@pytest.mark.parametrize("writer", ["adapters", "trainer", "peft"])
def test_a_crash_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch, writer):
    cola = trained("gpt2", steps=1)
    trainer = Trainer(cola, lr=5e-2)
    save = {"adapters": lambda d: adapter_io.save_adapters(cola, d), "trainer": lambda d: trainer.save_checkpoint(d),
            "peft": lambda d: peft_io.export_peft(cola, d)}[writer]
    reader = ColaModel.from_peft if writer == "peft" else ColaModel.from_pretrained

    def load(d):
        return reader(tiny("gpt2"), d).adapters()

    save(tmp_path / "ckpt")
    old = copy.deepcopy(load(tmp_path / "ckpt"))
    trainer.step(batch("gpt2", 7))  # new adapter values
    assert not torch.equal(cola.adapters()["transformer.h.0.attn.c_attn"].lora_B.weight,
                           old["transformer.h.0.attn.c_attn"].lora_B.weight)

    with monkeypatch.context() as m:
        # the last tensor file: all others are complete by then
        crash_on_call(m, 1, {"adapters": adapter_io, "trainer": state_io, "peft": peft_io}[writer])
        with pytest.raises(OSError, match="disk full"):
            save(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left
    assert_states_equal(load(tmp_path / "ckpt"), old)

    save(tmp_path / "ckpt")  # a successful save replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_states_equal(load(tmp_path / "ckpt"), cola.adapters())


def test_never_replaces_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        adapter_io.save_adapters(trained("gpt2", steps=1), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_save_of_many_users_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    cm = users_model("llama", IDS[:3])
    cm.save_pretrained(tmp_path / "ckpt")
    old = ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt")
    randomize_(cm.user_adapters("a/b c")["model.layers.0.self_attn.q_proj"], seed=99)
    calls = []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, path, metadata)

    save_file = adapter_io.save_file
    monkeypatch.setattr(adapter_io, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        cm.save_pretrained(tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    same_users(ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt"), old)
