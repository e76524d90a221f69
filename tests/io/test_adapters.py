"""Checkpoints of many users: per-user save/load, loading into a model with other users, PEFT per user, resume."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, flat_state, randomize_
from peft import LoraConfig, PeftModel, get_peft_model
from users_helpers import IDS, KINDS, LOWRANK, logits, mixed, rows, same_users, users_model

from colaft import ColaConfig, ColaModel, Trainer
from colaft.io import adapters as adapter_io
from colaft.io import peft as peft_io

# ---------------------------------------------------------------- save / load every user

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


# ---------------------------------------------------------------- PEFT per user

def peft_model_of(arch: str, directory) -> tuple[PeftModel, dict[str, str]]:
    """PEFT's own loading of a multi-user export: the root, then every other adapter by name."""
    names = json.loads((directory / peft_io.PEFT_USERS).read_text())["adapters"]  # PEFT name -> user id
    model = PeftModel.from_pretrained(ARCHS[arch][0](), directory)
    for name in names:
        if name != "default":
            model.load_adapter(directory / name, adapter_name=name)
    return model.eval(), {u: n for n, u in names.items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_peft_of_every_user_computes_what_colaft_does(tmp_path, arch):
    ids = ["user.0", "a", "a/b c", "default"]  # "a" lies in PEFT's "lora_" prefix
    cm = users_model(arch, ids, kinds=LOWRANK)
    cm.export_peft(tmp_path / "peft")
    peft_model, names = peft_model_of(arch, tmp_path / "peft")
    assert names["default"] == "default" and len(set(names.values())) == len(ids)
    assert all("." not in n and n not in "lora_" for n in names.values())
    batch, users = mixed(arch, ids)
    want = logits(cm, batch, users)
    for user in ids:  # each user alone
        mine = [i for i, u in enumerate(users) if u == user]
        peft_model.set_adapter(names[user])
        got = logits(peft_model, rows(batch, mine))
        assert (got - want[mine]).abs().max() <= 1e-5, user
    # one mixed batch, PEFT routing rows by adapter_names (its inference-only mixed batches)
    got = logits(peft_model, batch, adapter_names=[names[u] for u in users])
    assert (got - want).abs().max() <= 1e-5

    cm.export_peft(tmp_path / "one", user="a/b c")  # one user: a plain PEFT adapter directory
    assert not (tmp_path / "one" / peft_io.PEFT_USERS).exists()
    alone = PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path / "one").eval()
    mine = [i for i, u in enumerate(users) if u == "a/b c"]
    assert (logits(alone, rows(batch, mine)) - want[mine]).abs().max() <= 1e-5


def test_export_peft_names_the_users_that_cannot_export(tmp_path):
    cm = users_model("bert", ["user.0", "user.1", "user.2"])  # lowrank, linear, mlp
    with pytest.raises(ValueError, match=r"cannot export as PEFT LoRA: user 'user.1': .*a FullDelta adapter.*; "
                                         r"user 'user.2': .*Sequential.*\(export the others one by one"):
        cm.export_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ValueError, match="user 'user.2': site"):
        cm.export_peft(tmp_path / "peft", user="user.2")
    cm.export_peft(tmp_path / "peft", user="user.0")
    batch, _ = mixed("bert", ["user.0"])
    peft_model = PeftModel.from_pretrained(ARCHS["bert"][0](), tmp_path / "peft").eval()
    assert (logits(peft_model, batch) - logits(cm, batch, ["user.0"] * 2)).abs().max() <= 1e-5


def saved_by_peft(tmp_path, arch: str) -> tuple[PeftModel, str]:
    factory, targets, _ = ARCHS[arch]
    model = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "from_peft")
    return model.eval(), tmp_path / "from_peft"


def test_load_peft_starts_a_new_or_existing_user(tmp_path):
    arch = "llama"
    peft_model, directory = saved_by_peft(tmp_path, arch)
    cm = users_model(arch, ["user.0", "user.1"],
                     kinds=[dict(adapter="lowrank", rank=4, alpha=8.0), dict(adapter="mlp")])
    batch, _ = mixed(arch, ["x"])
    want = logits(peft_model, batch)
    cm.load_peft(directory, user="new")  # created from the adapter's config
    assert cm.users == ["user.0", "user.1", "new"]
    config = cm.user_configs["new"]
    assert (config.adapter, config.rank, config.alpha) == ("lowrank", 4, 8)
    cm.load_peft(directory, user="user.0")  # an existing lowrank user of the same rank and alpha
    for user in ("new", "user.0"):
        assert (logits(cm, batch, [user] * len(want)) - want).abs().max() <= 1e-5

    state = {u: flat_state(cm.user_adapters(u)) for u in cm.users}
    with pytest.raises(ValueError, match="name the one to load"):
        cm.load_peft(directory)
    with pytest.raises(ValueError, match=r"does not fit adapter='mlp'.*\(user 'user.1'\)"):
        cm.load_peft(directory, user="user.1")
    gpt2 = users_model("gpt2", ["user.0"])
    with pytest.raises(ValueError, match="does not fit this model: target 'model.embed_tokens' matches no module"):
        gpt2.load_peft(directory, user="other")
    assert gpt2.users == ["user.0"]
    assert cm.users == ["user.0", "user.1", "new"]
    for u, s in state.items():
        assert all(torch.equal(v, s[k]) for k, v in flat_state(cm.user_adapters(u)).items())


def test_load_peft_removes_a_new_user_whose_check_fails(tmp_path):
    _, directory = saved_by_peft(tmp_path, "llama")
    cm = users_model("llama", ["user.0"], kinds=[dict(adapter="lowrank", rank=4)])
    with torch.no_grad():  # not the base whose embedding PEFT saved with the adapter
        cm.model.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(ValueError, match="carries base weights of its own"):
        cm.load_peft(directory, user="new")
    assert cm.users == ["user.0"] and len(cm.sites) == len(cm.user_adapters("user.0"))


# ---------------------------------------------------------------- trainer: resume bit for bit, every user

def trainer_of(seed: int) -> Trainer:
    # dropout: the sites draw from torch's RNG, so resuming must restore it
    kinds = [{**k, "dropout": 0.1} for k in KINDS[:3]]
    cm = users_model("llama", ["user.0", "a/b", "ünï"], kinds=kinds, seed=seed)
    return Trainer(cm.train(), optimizer="adamw", lr=2e-2, weight_decay=0.01, scheduler="linear",
                   warmup_ratio=0.2, total_steps=10, interval=2)


def train(trainer: Trainer, steps: range) -> list[float]:
    users = trainer.model.users
    out = []
    for i in steps:
        batch, order = mixed("llama", users, seed=i)
        out.append(trainer.step(batch, users=order))
    return out


def assert_nested_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}/{i}")
    elif hasattr(a, "__dataclass_fields__"):  # packets
        assert_nested_equal(vars(a), vars(b), where)
    else:
        assert a == b, where


def test_resume_of_three_users_is_bit_exact(tmp_path):
    reference = trainer_of(seed=0)
    torch.manual_seed(1)
    ref_losses = train(reference, range(10))

    first = trainer_of(seed=0)
    torch.manual_seed(1)
    losses = train(first, range(5))
    assert all(first.owner_state(u)["pending_steps"] == 1 for u in first.model.users)  # one buffered step each
    first.save_checkpoint(tmp_path / "ckpt")

    resumed = trainer_of(seed=50)  # other adapters; the RNG moved on
    torch.manual_seed(2)
    resumed.load_checkpoint(tmp_path / "ckpt")
    losses += train(resumed, range(5, 10))

    assert losses == ref_losses
    for user in reference.model.users:
        assert_nested_equal(resumed.owner_state(user), reference.owner_state(user), user)
        ref, got = flat_state(reference.model.user_adapters(user)), flat_state(resumed.model.user_adapters(user))
        assert all(torch.equal(got[k], v) for k, v in ref.items()), user
    counts = lambda stats: {k: v for k, v in stats.items() if not k.endswith("_seconds")}
    assert counts(resumed.stats) == counts(reference.stats)

    # a trainer checkpoint is an adapter checkpoint of every user too
    loaded = ColaModel.from_pretrained(ARCHS["llama"][0](), tmp_path / "ckpt")
    assert loaded.users == first.model.users


def test_resume_refuses_other_users(tmp_path):
    trainer = trainer_of(seed=0)
    train(trainer, range(1))
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = trainer_of(seed=0)
    other.remove_user("a/b")
    with pytest.raises(ValueError, match=r"saved for users \['a/b', 'user.0', 'ünï'\], this trainer has"):
        other.load_checkpoint(tmp_path / "ckpt")
    other = trainer_of(seed=0)
    other.model.remove_user("ünï")
    other.model.add_user("ünï", ColaConfig(target_modules=ARCHS["llama"][1], adapter="mlp", hidden=16,
                                           dropout=0.1))
    with pytest.raises(ValueError, match=r"user 'ünï' saved with another ColaConfig .*'hidden': \(8, 16\)"):
        other.load_checkpoint(tmp_path / "ckpt")


def test_resume_restores_the_collaborative_mode(tmp_path):
    def make() -> Trainer:
        return Trainer(users_model("bert", ["user.0", "user.1"], kinds=[KINDS[0], KINDS[1]]), optimizer="sgd", lr=0.1)

    trainer = make()
    trainer.model.set_mode("collaborative", {"user.1": 3.0})
    batch, users = mixed("bert", trainer.model.users)
    trainer.step(batch, users=users)
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert (resumed.model.mode, resumed.model.weights) == ("collaborative", {"user.1": 3.0})
    batch, _ = mixed("bert", trainer.model.users, seed=9)  # every row sees the weighted mean: no users needed
    assert torch.equal(logits(resumed.model.eval(), batch), logits(trainer.model.eval(), batch))
