"""colaft.io.adapters: every user's adapters and ColaConfig on disk (ColaModel.save_pretrained,
from_pretrained, load_adapters): exact round trips, and clear errors that leave the model as it was."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import VOCAB, assert_states_equal, no_sites_left, outputs, tiny, trained
from conftest import ARCHS, flat_state
from transformers import GPT2Config, GPT2LMHeadModel
from users_helpers import IDS, KINDS, logits, mixed, rows, same_users, users_model

from colaft import ColaModel
from colaft.io import adapters as adapter_io

# ---------------------------------------------------------------- one user

@pytest.mark.parametrize("name,adapter", [("gpt2", "lowrank"), ("llama", "mlp"), ("bert", "linear")])
def test_save_load_round_trip_is_exact(tmp_path, name, adapter):
    cola = trained(name, adapter)
    cola.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / adapter_io.CONFIG).read_text())
    assert meta["config"] == cola.config.to_dict()
    assert meta["sites"] == list(cola.adapters())
    loaded = ColaModel.from_pretrained(tiny(name), tmp_path / "ckpt").eval()
    assert loaded.config == cola.config
    assert_states_equal(cola.adapters(), loaded.adapters())
    assert torch.equal(outputs(loaded, name), outputs(cola, name))
    assert not torch.allclose(outputs(loaded, name), outputs(tiny(name), name), atol=1e-3)


def test_load_errors_are_clear_and_leave_the_model_clean(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        ColaModel.from_pretrained(tiny("gpt2"), tmp_path / "nowhere")
    cola = trained("gpt2", steps=1)
    cola.save_pretrained(tmp_path / "ckpt")

    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32))
    with pytest.raises(ValueError, match=r"only in the checkpoint: \['transformer.h.1.attn.c_attn'"):
        ColaModel.from_pretrained(other, tmp_path / "ckpt")
    assert no_sites_left(other)

    wider = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=VOCAB, n_positions=32))
    with pytest.raises(ValueError, match=r"lora_A.weight is \(4, 32\) in the checkpoint, \(4, 48\) in the model"):
        ColaModel.from_pretrained(wider, tmp_path / "ckpt")
    assert no_sites_left(wider)

    with pytest.raises(ValueError, match="does not fit this model: target 'c_attn' matches no module"):
        ColaModel.from_pretrained(tiny("llama"), tmp_path / "ckpt")

    (tmp_path / "ckpt" / adapter_io.ADAPTERS).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {adapter_io.ADAPTERS}"):
        ColaModel.from_pretrained(tiny("gpt2"), tmp_path / "ckpt")


# ---------------------------------------------------------------- every user

@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_user_round_trips_exactly(tmp_path, arch):
    cm = users_model(arch, IDS)
    weights = {"a/b c": 2.0}
    cm.set_mode("collaborative", weights)
    cm.save_pretrained(tmp_path / "ckpt")

    index = json.loads((tmp_path / "ckpt" / adapter_io.USERS).read_text())
    assert [e["user"] for e in index["users"]] == IDS and index["mode"] == "collaborative"
    folders = [e["folder"] for e in index["users"]]
    assert len({f.lower() for f in folders}) == len(IDS)  # distinct, even ignoring case
    assert all(f not in (".", "..", adapter_io.USERS) and "/" not in f for f in folders)
    for entry in index["users"]:
        meta = json.loads((tmp_path / "ckpt" / entry["folder"] / adapter_io.CONFIG).read_text())
        assert meta["user"] == entry["user"] and meta["config"] == cm.user_configs[entry["user"]].to_dict()

    loaded = ColaModel.from_pretrained(ARCHS[arch][0](), tmp_path / "ckpt").eval()
    same_users(loaded, cm)
    batch, users = mixed(arch, IDS)
    assert torch.equal(logits(loaded, batch, users), logits(cm, batch, users))
    cm.set_mode("personal")
    loaded.set_mode("personal")
    assert torch.equal(logits(loaded, batch, users), logits(cm, batch, users))

    one = ColaModel.from_pretrained(ARCHS[arch][0](), tmp_path / "ckpt", user="a/b c").eval()
    assert one.users == ["a/b c"] and one.mode == "personal"
    mine = [i for i, u in enumerate(users) if u == "a/b c"]
    assert torch.equal(logits(one, rows(batch, mine)), logits(cm, rows(batch, mine), ["a/b c"] * len(mine)))


def test_one_user_keeps_the_single_user_layout(tmp_path):
    cm = users_model("llama", ["alice"])
    cm.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [adapter_io.ADAPTERS, adapter_io.CONFIG]
    assert ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt").users == ["alice"]

    # a checkpoint written before users had ids loads as the user "default"
    meta = json.loads((tmp_path / "ckpt" / adapter_io.CONFIG).read_text())
    for key in ("user", "mode", "weights"):
        del meta[key]
    (tmp_path / "ckpt" / adapter_io.CONFIG).write_text(json.dumps(meta))
    old = ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt")
    assert old.users == ["default"]
    assert all(torch.equal(v, flat_state(cm.adapters())[k]) for k, v in flat_state(old.adapters()).items())


# ---------------------------------------------------------------- one user into a model that has others

def test_one_users_adapters_load_into_a_model_with_other_users(tmp_path):
    arch = "bert"
    source = users_model(arch, ["user.0", "user.1", "user.2"])
    source.save_pretrained(tmp_path / "one", user="user.1")  # that user alone: the single-user layout
    meta = json.loads((tmp_path / "one" / adapter_io.CONFIG).read_text())
    assert meta["user"] == "user.1" and "mode" not in meta
    source.save_pretrained(tmp_path / "all")

    server = users_model(arch, ["user.0", "user.2", "bob"], kinds=[KINDS[0], KINDS[2], KINDS[1]], seed=7)  # no user.1
    before = {u: flat_state(server.user_adapters(u)) for u in server.users}
    server.load_adapters(tmp_path / "one", user="user.1")  # added
    server.load_adapters(tmp_path / "one", user="copy")  # the same adapters, as another user
    server.load_adapters(tmp_path / "all", user="user.0")  # replaced, picked from several users
    assert server.users == ["user.0", "user.2", "bob", "user.1", "copy"]
    assert server.user_configs["copy"] == source.user_configs["user.1"]
    batch, users = mixed(arch, ["user.0", "user.1"])
    want = logits(source, batch, users)
    assert torch.equal(logits(server, batch, users), want)
    assert torch.equal(logits(server, batch, ["copy" if u == "user.1" else u for u in users]), want)
    for u in ("user.2", "bob"):  # the others are untouched
        assert all(torch.equal(v, before[u][k]) for k, v in flat_state(server.user_adapters(u)).items())

    server.load_adapters(tmp_path / "all")  # every saved user: user.2 replaced too
    for u in source.users:
        assert all(torch.equal(v, flat_state(source.user_adapters(u))[k])
                   for k, v in flat_state(server.user_adapters(u)).items())


def test_failed_loads_leave_the_model_as_it_was(tmp_path):
    arch = "llama"
    users_model(arch, ["user.0", "user.1", "user.2"]).save_pretrained(tmp_path / "all")
    server = users_model(arch, ["user.1", "user.0"], kinds=[KINDS[2], dict(adapter="lowrank", rank=8, alpha=32.0)])
    state = {u: flat_state(server.user_adapters(u)) for u in server.users}
    sites = list(server.sites)

    def unchanged():
        assert server.users == ["user.1", "user.0"] and list(server.sites) == sites
        for u, s in state.items():
            assert all(torch.equal(v, s[k]) for k, v in flat_state(server.user_adapters(u)).items())

    with pytest.raises(ValueError, match="holds no user 'nobody'; its users: 'user.0', 'user.1', 'user.2'"):
        server.load_adapters(tmp_path / "all", user="nobody")
    with pytest.raises(ValueError, match=r"user 'user.1'\): saved with another ColaConfig .*'adapter': "
                                         r"\('linear', 'mlp'\)"):  # an mlp user here, linear there
        server.load_adapters(tmp_path / "all", user="user.1")
    unchanged()
    # user.2 is new and added first; user.0 then fails its check: user.2 goes again
    with pytest.raises(ValueError, match=r"another ColaConfig .*'alpha': \(16.0, 32.0\)"):
        server.load_adapters(tmp_path / "all")
    unchanged()
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        server.load_adapters(tmp_path / "nowhere")
    other = ARCHS["gpt2"][0]()
    with pytest.raises(ValueError, match="does not fit this model"):
        ColaModel.from_pretrained(other, tmp_path / "all")
    assert not any("forward" in m.__dict__ for m in other.modules())  # no site left behind
    index = json.loads((tmp_path / "all" / adapter_io.USERS).read_text())
    (tmp_path / "all" / index["users"][2]["folder"] / adapter_io.ADAPTERS).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {adapter_io.ADAPTERS}"):
        server.load_adapters(tmp_path / "all", user="user.0")
