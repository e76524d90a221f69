"""colaft.io.files: atomic folders and files. A folder or file is replaced whole or not at all, a
failure or Ctrl-C leaves the old one and no temporary behind, and a folder that is not a
checkpoint is never replaced; every checkpoint writer (adapters, trainer, PEFT) is atomic."""
from __future__ import annotations

import copy

import pytest
import torch
from checkpoint_helpers import assert_states_equal, batch, tiny, trained
from conftest import ARCHS, randomize_
from users_helpers import IDS, same_users, users_model

from colaft import ColaModel, Trainer
from colaft.io import adapters as adapter_io
from colaft.io import files
from colaft.io import peft as peft_io
from colaft.io import state as state_io
from colaft.io.files import atomic_dir, build_atomically, require, write_atomic

MARKERS = ("mark.json", "index.json")


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def checkpoint(folder, text: str = "old"):
    """A folder that atomic_dir takes for one of ours (it holds a marker)."""
    folder.mkdir()
    (folder / "mark.json").write_text(text)
    (folder / "data.bin").write_bytes(b"\x00\x01")
    return folder


# ---------------------------------------------------------------- atomic_dir

def test_atomic_dir_replaces_a_checkpoint_when_the_block_succeeds(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target, MARKERS) as tmp:  # no folder yet
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.") and listing(tmp) == []
        assert not target.exists()  # nothing visible until the block is done
        (tmp / "mark.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
    assert listing(tmp_path) == ["ckpt"] and listing(target) == ["mark.json", "sub"]
    assert (target / "sub" / "a.txt").read_text() == "a"
    with atomic_dir(target, MARKERS) as tmp:  # one of ours: replaced whole
        (tmp / "index.json").write_text("2")
    assert listing(tmp_path) == ["ckpt"] and listing(target) == ["index.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty, MARKERS) as tmp:  # an empty folder may be used too
        (tmp / "mark.json").write_text("3")
    assert (empty / "mark.json").read_text() == "3"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path, error):
    target = checkpoint(tmp_path / "ckpt")
    with pytest.raises(type(error)), atomic_dir(target, MARKERS) as tmp:
        (tmp / "mark.json").write_text("new")
        raise error
    assert listing(tmp_path) == ["ckpt"]  # no temporary folder left
    assert listing(target) == ["data.bin", "mark.json"] and (target / "mark.json").read_text() == "old"


def test_atomic_dir_refuses_what_is_not_a_checkpoint(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "mark.json").mkdir()  # a folder named like a marker is no marker
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for target in (mine, a_file):
        with pytest.raises(FileExistsError, match=r"exists and is not a checkpoint \(no mark.json or index.json\): "
                                                  r"refusing to replace it"):
            with atomic_dir(target, MARKERS):
                pytest.fail("the block must not run")
    assert listing(tmp_path) == ["a_file", "mine"] and listing(mine) == ["mark.json", "notes.txt"]
    assert a_file.read_text() == "mine"


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The old folder steps aside before the new one is renamed into place; if that rename
    fails, the old one comes back."""
    target = checkpoint(tmp_path / "ckpt")
    rename = type(target).rename

    def failing(self, destination):
        if self.name.endswith(".tmp"):  # the new folder into place
            raise OSError("rename failed")
        return rename(self, destination)

    monkeypatch.setattr(type(target), "rename", failing)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(target, MARKERS) as tmp:
        (tmp / "mark.json").write_text("new")
    assert listing(tmp_path) == ["ckpt"] and (target / "mark.json").read_text() == "old"


# ---------------------------------------------------------------- build_atomically, write_atomic, require

def fill(text: str):
    return lambda folder: (folder / "f.txt").write_text(text)


def test_build_atomically_puts_every_folder_in_place(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "other" / "b"
    build_atomically([(a, fill("a")), (b, fill("b"))])
    assert (a / "f.txt").read_text() == "a" and (b / "f.txt").read_text() == "b"
    assert listing(tmp_path / "runs") == ["a"] and listing(tmp_path / "other") == ["b"]  # no temporaries


@pytest.mark.parametrize("error", [ValueError("bad data"), KeyboardInterrupt()])
def test_build_atomically_leaves_nothing_when_one_build_fails(tmp_path, error):
    kept = tmp_path / "kept"
    kept.mkdir()

    def fails(folder):
        (folder / "half.txt").write_text("half")
        raise error

    with pytest.raises(type(error)):
        build_atomically([(kept / "a", fill("a")), (tmp_path / "new" / "b", fails)])
    assert listing(tmp_path) == ["kept"]  # the parent it made is gone, the one that was there stays
    assert listing(kept) == []


def test_write_atomic_writes_whole_files_or_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, b"one")  # the parent is made
    assert path.read_bytes() == b"one"
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and listing(path.parent) == ["state.json"]

    def no_space(fd):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", no_space)  # the write fails before the rename
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"three")
    assert path.read_bytes() == b"two"


def test_require_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        require(tmp_path / "nowhere", "a.json")
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "c.bin").mkdir()  # a folder is not the file
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint: missing b.json, c.bin"):
        require(tmp_path, "a.json", "b.json", "c.bin")
    assert require(str(tmp_path), "a.json") == tmp_path

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
