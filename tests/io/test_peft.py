"""colaft.io.peft: PEFT LoRA interop. Exported adapters load in PEFT and compute what colaft does (every
user too); PEFT adapters start colaft's users; what PEFT's LoRA cannot hold is refused by name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import DEVICES, HEADS, TARGETS, VOCAB, no_sites_left, outputs, tiny, trained
from conftest import ARCHS, flat_state
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification
from users_helpers import LOWRANK, logits, mixed, rows, users_model

from colaft import ColaConfig, ColaModel
from colaft.io import peft as peft_io

# ---------------------------------------------------------------- export

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "cnn"])
def test_export_peft_loads_in_peft_with_the_same_outputs(tmp_path, name, device):
    cola = trained(name, device=device, heads=HEADS.get(name, []))
    cola.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny(name, device), tmp_path / "peft").eval()
    expected = outputs(cola, name)
    assert not torch.allclose(expected, outputs(tiny(name, device), name), atol=1e-3)
    assert (outputs(peft_model, name) - expected).abs().max() <= 1e-5
    back = ColaModel.from_peft(tiny(name, device), tmp_path / "peft").eval()  # and back again
    assert (outputs(back, name) - expected).abs().max() <= 1e-5


def test_export_peft_rejects_adapters_that_are_not_lowrank(tmp_path):
    cola = ColaModel(tiny("gpt2"), ColaConfig(target_modules=["c_attn"], adapter="mlp"))
    with pytest.raises(ValueError, match="Sequential adapter has no PEFT LoRA form"):
        peft_io.export_peft(cola, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_head_without_bias_learns_no_bias_and_exports(tmp_path):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=4, num_key_value_heads=2,
                                                       vocab_size=VOCAB, num_labels=3, pad_token_id=0))
    cola = ColaModel(model, ColaConfig(target_modules=["q_proj"]))
    assert cola.site("score").target.bias is None
    assert cola.site("score").adapter.bias is None  # as PEFT's modules_to_save: no bias to learn
    with torch.no_grad():
        cola.site("score").adapter.weight.fill_(0.5)
    peft_io.export_peft(cola, tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    head = [k for k in saved if "score" in k]
    assert len(head) == 1 and torch.equal(saved[head[0]], model.score.weight + 0.5)


@pytest.mark.parametrize("conv, message", [
    (dict(dilation=2), "PEFT's LoRA Conv2d has no dilation"),
    (dict(padding_mode="reflect"), "pads with zeros, this site with reflect"),
])
def test_export_peft_refuses_conv_geometry_peft_cannot_hold(tmp_path, conv, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, **conv))
    cola = ColaModel(model, ColaConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match=message):
        peft_io.export_peft(cola, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------- import

def peft_dir(tmp_path, name: str, device: str = "cpu", **lora) -> tuple[nn.Module, str]:
    """A PEFT LoRA adapter with random non-zero weights, saved by PEFT itself."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[name], "modules_to_save": HEADS.get(name),
              "fan_in_fan_out": name == "gpt2", **lora}
    model = get_peft_model(tiny(name, device), LoraConfig(**config))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "peft")
    return model.eval(), str(tmp_path / "peft")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_load_peft_starts_from_peft_weights(tmp_path, name, device):
    peft_model, directory = peft_dir(tmp_path, name, device)
    expected = outputs(peft_model, name)
    assert not torch.allclose(expected, outputs(tiny(name, device), name), atol=1e-3)
    cola = ColaModel.from_peft(tiny(name, device), directory).eval()
    assert (outputs(cola, name) - expected).abs().max() <= 1e-5
    config = ColaConfig(target_modules=TARGETS[name], rank=4, alpha=8, heads=HEADS.get(name, []))
    cola = ColaModel(tiny(name, device), config)
    cola.load_peft(directory)
    assert (outputs(cola.eval(), name) - expected).abs().max() <= 1e-5


def test_load_peft_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        ColaModel.from_peft(tiny("gpt2"), tmp_path)
    _, directory = peft_dir(tmp_path / "a", "gpt2")
    for config, error in [(dict(rank=8, alpha=8), "r=4, lora_alpha=8 does not fit adapter='lowrank', rank=8"),
                          (dict(rank=4, alpha=16), "alpha=16"),
                          (dict(rank=4, alpha=8, target_modules=["c_attn"]), r"only in the checkpoint: \['transfo")]:
        config = {"target_modules": TARGETS["gpt2"], "heads": HEADS["gpt2"], **config}
        cola = ColaModel(tiny("gpt2"), ColaConfig(**config))
        with pytest.raises(ValueError, match=error):
            cola.load_peft(directory)
    _, directory = peft_dir(tmp_path / "b", "gpt2", use_rslora=True)
    with pytest.raises(ValueError, match="lacks: use_rslora"):
        ColaModel.from_peft(tiny("gpt2"), directory)


def set_options(directory, **options) -> None:
    """Rewrite a saved PEFT adapter's config with `options` set."""
    path = Path(directory) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **options}))


@pytest.mark.parametrize("option", [dict(use_dora=True), dict(use_rslora=True), dict(lora_bias=True), dict(bias="all"),
                                    dict(rank_pattern={"q_proj": 2}), dict(alpha_pattern={"q_proj": 4}),
                                    dict(layer_replication=[[0, 1]]), dict(target_parameters=["mlp.up_proj.weight"])])
def test_each_lora_option_colaft_lacks_is_refused_by_name(tmp_path, option):
    _, directory = peft_dir(tmp_path, "llama")
    set_options(directory, **option)
    name = next(iter(option))
    model = tiny("llama")
    with pytest.raises(ValueError, match=f"LoRA options that colaft's lowrank adapter lacks: {name}$"):
        ColaModel.from_peft(model, directory)
    assert no_sites_left(model)
    cola = ColaModel(tiny("llama"), ColaConfig(target_modules=TARGETS["llama"], rank=4, alpha=8))
    before = flat_state(cola.adapters())
    for user in (None, "new"):  # the existing user, a new one
        with pytest.raises(ValueError, match=f"lacks: {name}$"):
            cola.load_peft(directory, user=user)
    assert cola.users == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in flat_state(cola.adapters()).items())


def test_other_adapter_types_and_missing_weights_are_refused(tmp_path):
    ia3 = get_peft_model(tiny("llama"), IA3Config(target_modules=["q_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    model = tiny("llama")
    with pytest.raises(ValueError, match="IA3 adapter; only LoRA imports"):
        ColaModel.from_peft(model, tmp_path / "ia3")
    assert no_sites_left(model)
    _, directory = peft_dir(tmp_path, "llama")
    (Path(directory) / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        ColaModel.from_peft(model, directory)
    assert no_sites_left(model)


def test_weights_that_are_neither_lora_nor_heads_are_refused(tmp_path):
    _, directory = peft_dir(tmp_path, "llama")
    path = Path(directory) / "adapter_model.safetensors"
    save_file({**load_file(path), "base_model.model.model.norm.weight": torch.ones(32)}, path)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"\['model.norm'\] are not LoRA weights nor task heads of user 'default'"):
        ColaModel.from_peft(model, directory)
    assert no_sites_left(model)


# ---------------------------------------------------------------- every user

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


def test_peft_names_are_safe_distinct_and_keep_the_default_adapter():
    """The user "default" (else the first user) is PEFT's "default" adapter, loaded from the folder
    itself; the others get names PEFT can hold (no dots, not "__base__", not inside "lora_"),
    distinct even ignoring case."""
    assert peft_io.peft_names(["default"]) == {"default": "default"}
    assert peft_io.peft_names(["b", "a.1"]) == {"b": "default", "a.1": "a_1"}
    ids = ["user.0", "default", "User.0", "a", "__base__", "a/b c", "ünï", "lora_x", "Default"]
    assert peft_io.peft_names(ids) == {"default": "default", "user.0": "user_0", "User.0": "User_0-2", "a": "a-2",
                                       "__base__": "__base__-2", "a/b c": "a_b_c", "ünï": "_n_", "lora_x": "lora_x",
                                       "Default": "Default-2"}


def test_every_users_adapters_come_back_from_peft_exactly(tmp_path):
    """Export of several users, then each PEFT adapter loaded into a fresh model as its user: the
    low-rank weights are bit-equal (PEFT stores them as colaft holds them)."""
    ids = ["user.0", "a", "a/b c"]
    cm = users_model("llama", ids, kinds=LOWRANK)
    cm.export_peft(tmp_path / "peft")
    names = json.loads((tmp_path / "peft" / peft_io.PEFT_USERS).read_text())["adapters"]  # PEFT name -> user id
    assert sorted(names.values()) == sorted(ids) and names["default"] == "user.0"
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", peft_io.PEFT_USERS, *(n for n in names if n != "default")])
    back = None
    for name, user in names.items():
        folder = tmp_path / "peft" if name == "default" else tmp_path / "peft" / name
        if back is None:
            back = ColaModel.from_peft(ARCHS["llama"][0](), folder, user=user)
        else:
            back.load_peft(folder, user=user)
    assert sorted(back.users) == sorted(ids)
    for user in ids:
        want, got = flat_state(cm.user_adapters(user)), flat_state(back.user_adapters(user))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), user
        config = back.user_configs[user]
        assert (config.adapter, config.rank, config.alpha) == ("lowrank", cm.user_configs[user].rank,
                                                                cm.user_configs[user].alpha)

