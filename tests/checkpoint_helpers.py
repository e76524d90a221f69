"""Tiny models for the persistence tests (tests/io/): trained until every adapter delta is non-zero.

Imported by name (tests/ is on sys.path): `from checkpoint_helpers import tiny, trained, ...`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from colaft import ColaConfig, ColaModel, Trainer

VOCAB = 64
# CUDA, where there is one: its RNG (dropout) and device moves must round-trip too
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny(name: str, device: str = "cpu") -> nn.Module:
    """A tiny random model, the same for the same name (fixed seed), in eval mode."""
    torch.manual_seed(0)
    if name == "gpt2":  # Conv1D sites
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0, attn_implementation="eager"))
    elif name == "bert":  # sequence classification: the `classifier` head is a site
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                         intermediate_size=64, vocab_size=VOCAB, num_labels=3,
                                                         max_position_embeddings=32))
    else:  # a CNN: conv2d sites
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                              nn.Linear(4 * 3 * 3, 5))
    return model.to(device).eval()


TARGETS = {"gpt2": ["c_attn", "c_fc", "wte"], "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
           "bert": ["query", "value", "word_embeddings"], "cnn": ["0", "2", "4"]}
HEADS = {"gpt2": ["mlp.c_proj"], "bert": ["classifier"]}  # GPT-2: Conv1D modules as heads (PEFT modules_to_save)


def batch(name: str, seed: int, device: str | torch.device = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return {"input": torch.randn(2, 3, 8, 8, generator=g).to(device)}
    ids = torch.randint(1, VOCAB, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding, dropped from the packets
    labels = torch.randint(0, 3, (2,), generator=g) if name == "bert" else ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def cnn_loss(out, b):
    return out.pow(2).mean()


def trained(name: str, adapter: str = "lowrank", steps: int = 3, device: str = "cpu", **config) -> ColaModel:
    """A ColaModel whose adapters (heads included) took `steps` large steps: every delta is non-zero."""
    cola = ColaModel(tiny(name, device), ColaConfig(target_modules=TARGETS[name], adapter=adapter, rank=4, alpha=8,
                                            **config))
    trainer = Trainer(cola, lr=5e-2, loss_fn=cnn_loss if name == "cnn" else None)
    for i in range(steps):
        trainer.step(batch(name, i, device))
    for site, a in cola.adapters().items():
        for k, v in a.state_dict().items():
            assert v.abs().sum() > 0, f"{site}.{k} is still zero"
    return cola.eval()


def outputs(model: nn.Module, name: str) -> torch.Tensor:
    b = {k: v for k, v in batch(name, 99, next(model.parameters()).device).items() if k != "labels"}
    with torch.no_grad():
        out = model(**b)
    return out if name == "cnn" else out.logits


def assert_states_equal(a: dict[str, nn.Module], b: dict[str, nn.Module]) -> None:
    assert sorted(a) == sorted(b)
    for site in a:
        sa, sb = a[site].state_dict(), b[site].state_dict()
        assert list(sa) == list(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{site}.{k}"


def no_sites_left(model: nn.Module) -> bool:
    return not any("forward" in m.__dict__ for m in model.modules())
