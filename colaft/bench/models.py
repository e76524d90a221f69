"""Benchmark models: built from a config with random weights, and a synthetic batch.

Speed and memory do not depend on weight values, so every benchmark model is built from
its architecture config with random initialisation: nothing is downloaded or read from
disk, and the same code runs on a machine without the asset packages. The configs of the
built-in models are copied here (smollm2-135m's from the config transformers derives from
its GGUF file, minilm-l6's from its config.json).

A model spec is a name, optionally with config overrides: "llama-large:num_hidden_layers=8".
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

_SMOLLM2 = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_act": "silu",
    "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
_MINILM = {
    "model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
    "num_attention_heads": 12, "hidden_act": "gelu", "vocab_size": 30522, "max_position_embeddings": 512,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": 0, "num_labels": 2,
}


@dataclass(frozen=True)
class Preset:
    """A benchmark model: its architecture and the defaults of its benchmark."""

    task: str
    """"clm" (causal LM, loss over tokens) or "sc" (sequence classification, 2 labels)."""
    config: dict
    """transformers config fields; model_type picks the class."""
    targets: list[str] | str
    """Adapter sites (ColaConfig.target_modules): the task recipe's choice for the model."""
    cpu_batch: tuple[int, int]
    """(batch size, sequence length) on CPU."""
    cuda_batch: tuple[int, int]
    """(batch size, sequence length) on CUDA."""


PRESETS: dict[str, Preset] = {
    # a few seconds per configuration: the smoke run
    "tiny": Preset("clm", {**_SMOLLM2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
                           "max_position_embeddings": 256},
                   ["q_proj", "v_proj"], (4, 32), (4, 32)),
    "smollm2-135m": Preset("clm", _SMOLLM2, ["q_proj", "v_proj"], (4, 64), (16, 128)),
    "minilm-l6": Preset("sc", _MINILM, "all-linear", (16, 64), (32, 64)),
    # ~0.8B parameters: the scale point (hidden 2048, 16 layers, grouped-query attention)
    "llama-large": Preset("clm", {**_SMOLLM2, "hidden_size": 2048, "intermediate_size": 5632,
                                  "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "head_dim": 64},
                          ["q_proj", "v_proj"], (1, 64), (8, 512)),
}


def parse_spec(spec: str) -> tuple[str, Preset]:
    """ "name" or "name:key=value,key=value" -> (label, preset with the overrides applied)."""
    name, _, overrides = spec.partition(":")
    if name not in PRESETS:
        raise ValueError(f"unknown benchmark model {name!r}; built in: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not overrides:
        return name, preset
    config = copy.deepcopy(preset.config)
    for item in overrides.split(","):
        key, eq, value = item.partition("=")
        if not eq or key not in config:
            raise ValueError(f"bad override {item!r} for {name}: use key=value with a key of {sorted(config)}")
        config[key] = json.loads(value)
    return spec, Preset(preset.task, config, preset.targets, preset.cpu_batch, preset.cuda_batch)


def build_model(preset: Preset, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> nn.Module:
    """The preset's model with random weights, built directly on `device`, in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    fields = dict(preset.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cls = AutoModelForCausalLM if preset.task == "clm" else AutoModelForSequenceClassification
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls.from_config(config, dtype=dtype)
    return model.train()


def make_batch(preset: Preset, batch_size: int, seq_len: int, device: str | torch.device = "cpu",
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids, a full attention mask (no padding), and the task's labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, preset.config["vocab_size"], (batch_size, seq_len), generator=g)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if preset.task == "clm" else torch.randint(0, 2, (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def share_weights(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are new Parameter objects on the same storage.

    Each configuration of a benchmark gets its own copy, so it can set requires_grad, wrap
    or hook its modules freely, while the weights are held once. Tied weights stay tied.
    """
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)
