"""colaft.io: adapter save/load, atomic writes, bit-exact resume, PEFT LoRA export/import."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from checkpoint_helpers import (
    DEVICES,
    HEADS,
    TARGETS,
    VOCAB,
    assert_states_equal,
    batch,
    no_sites_left,
    outputs,
    tiny,
    trained,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

from colaft import ColaConfig, ColaModel, Trainer
from colaft.io import adapters as adapter_io
from colaft.io import peft as peft_io
from colaft.io import state as state_io

# ---------------------------------------------------------------- save / load adapters

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


# ---------------------------------------------------------------- atomic writes

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


# ---------------------------------------------------------------- resume bit for bit

def make_trainer(device: str = "cpu") -> tuple[ColaModel, dict]:
    # lowrank dropout: the site dropout draws from torch's RNG, so resuming must restore it
    config = ColaConfig(target_modules=["q_proj", "v_proj", "gate_proj"], rank=4, alpha=8, dropout=0.2)
    cola = ColaModel(tiny("llama", device), config)
    return cola, dict(optimizer="adamw", lr=2e-2, weight_decay=0.01, scheduler="linear", warmup_ratio=0.2,
                      total_steps=10)


def run(trainer: Trainer, steps: range) -> list[float]:
    device = next(trainer.model.parameters()).device
    return [trainer.step(batch("llama", i, device)) for i in steps]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interval", [1, 2])
def test_resume_is_bit_exact(tmp_path, interval, device):
    cola, kw = make_trainer(device)
    reference = Trainer(cola, interval=interval, **kw)
    torch.manual_seed(1)
    ref_losses = run(reference, range(10))

    cola, kw = make_trainer(device)
    first = Trainer(cola, interval=interval, **kw)
    torch.manual_seed(1)
    losses = run(first, range(5))
    assert len(first.owner().pending) == (0 if interval == 1 else len(cola.sites))  # one buffered step
    first.save_checkpoint(tmp_path / "ckpt")

    cola, kw = make_trainer(device)  # fresh: new random adapters, RNG moved on
    resumed = Trainer(cola, interval=interval, **kw)
    resumed.load_checkpoint(tmp_path / "ckpt")
    losses += run(resumed, range(5, 10))

    assert losses == ref_losses
    assert_states_equal(resumed.owner_adapters, reference.owner_adapters)
    assert_states_equal(resumed.model.adapters(), reference.model.adapters())
    counts = lambda stats: {k: v for k, v in stats.items() if not k.endswith("_seconds")}
    assert counts(resumed.stats) == counts(reference.stats)  # timings differ run to run
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()
    for p, q in zip((p for a in resumed.owner_adapters.values() for p in a.parameters()),
                    (p for a in reference.owner_adapters.values() for p in a.parameters())):
        for k, v in reference.optimizer.state[q].items():
            assert torch.equal(resumed.optimizer.state[p][k], v), k

    # the RNG is what made the dropout masks agree: without it the run differs
    cola, kw = make_trainer(device)
    unseeded = Trainer(cola, interval=interval, **kw)
    unseeded.load_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(2)
    assert run(unseeded, range(5, 10)) != ref_losses[5:]


def test_load_checkpoint_refuses_another_config(tmp_path):
    cola, kw = make_trainer()
    trainer = Trainer(cola, interval=2, **kw)
    run(trainer, range(1))
    trainer.save_checkpoint(tmp_path / "ckpt")
    cola = ColaModel(tiny("llama"), ColaConfig(target_modules=["q_proj", "v_proj", "gate_proj"], rank=4, alpha=16,
                                               dropout=0.2))
    with pytest.raises(ValueError, match=r"another ColaConfig .*'alpha': \(8.0, 16.0\)"):
        Trainer(cola, **kw).load_checkpoint(tmp_path / "ckpt")
    cola, kw = make_trainer()
    with pytest.raises(ValueError, match="holds 1 pending server steps, but this trainer fits every 1"):
        Trainer(cola, interval=1, **kw).load_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- PEFT

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
