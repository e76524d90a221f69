"""Shared fixtures and helpers of the tests: tiny random models, batches, and the references.

Every model here is built from a config with random weights (no download) and every
dropout set to 0, so two runs of the same computation can be compared to float round-off.
The plain-autograd reference (`Backprop`) is written independently of colaft: a deep copy
of the base with trainable copies of the adapters added by forward hooks, trained by
`loss.backward()` and `optimizer.step()`.

tests/ mirrors colaft/ (tests/io/test_peft.py tests colaft/io/peft.py). Test modules import
helpers, never each other; the other helper modules sit beside this one, imported by name:
tiny_models (model folders with real tokenizers, and records), users_helpers (models with
many users), references (the PEFT reference and the exactness tolerances), checkpoint_helpers
(tiny trained models for tests/io/).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from tiny_models import save_tiny_bert, save_tiny_llama
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

# Tiny tensors: one intra-op thread per test process is ~10x faster than two that wait on
# each other (and pytest -n 2 already uses both cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_again():
    """Commands run in-process (colaft train, runtime.set_threads) set torch's threads for the
    whole process: back to one after each test, or a later test's sums would round by however
    many threads the test before it left (xdist orders tests by load, so it would vary by run)."""
    yield
    torch.set_num_threads(1)


VOCAB, DIM, SEQ, BATCH = 40, 16, 6, 4
LENGTHS = (6, 4, 3, 5)  # right padding: rows 1-3 have zeros in attention_mask


# ---------------------------------------------------------------- tiny models

def tiny_gpt2(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=layers, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(cfg)


def tiny_llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=2 * DIM, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      attention_dropout=0.0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def tiny_bert(layers: int = 2, labels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * DIM, max_position_embeddings=SEQ, num_labels=labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(cfg)


@dataclass
class CNNOutput:
    logits: torch.Tensor  # (B, classes)
    loss: torch.Tensor | None = None


class TinyCNN(nn.Module):
    """Two stacked convolutions (the second strided), in-place ReLUs, a linear head."""

    def __init__(self, channels: int = 2, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)  # in place on the sites' outputs, as torchvision's models do
        self.fc = nn.Linear(6 * 3 * 3, classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> CNNOutput:
        h = self.act(self.conv1(pixel_values))  # (B, 4, 6, 6)
        h = self.act(self.conv2(h))  # (B, 6, 3, 3)
        logits = self.fc(h.flatten(1))
        return CNNOutput(logits, None if labels is None else F.cross_entropy(logits, labels))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


# name -> (factory, targets of the exactness tests, batch kind)
ARCHS: dict[str, tuple[Callable[[], nn.Module], list[str], str]] = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "lm"),  # Conv1D sites, attn.c_proj and mlp.c_proj
    "llama": (tiny_llama, ["embed_tokens", "q_proj", "v_proj", "down_proj"], "lm"),  # an Embedding site too
    "bert": (tiny_bert, ["query", "value", "output.dense"], "cls"),  # + the classifier head
    "cnn": (tiny_cnn, ["conv1", "conv2"], "image"),
}


# ---------------------------------------------------------------- batches

def text_batch(seed: int, kind: str = "lm", lengths=LENGTHS) -> dict[str, torch.Tensor]:
    """Right-padded token batch; padding has mask 0 and (for "lm") label -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), SEQ), generator=g)  # (B, T)
    mask = (torch.arange(SEQ) < torch.tensor(lengths)[:, None]).long()  # (B, T)
    ids = ids * mask  # pad id 0
    if kind == "lm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 3, (len(lengths),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def image_batch(seed: int, n: int = BATCH) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 2, 6, 6, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def make_batch(kind: str, seed: int) -> dict[str, torch.Tensor]:
    return image_batch(seed) if kind == "image" else text_batch(seed, kind)


# ---------------------------------------------------------------- helpers

def randomize_(module: nn.Module, std: float = 0.05, seed: int = 1) -> nn.Module:
    """Give every parameter of `module` random non-zero values (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def flat_state(adapters: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """site name -> adapter, flattened to `site.param` -> a detached float32 copy."""
    return {f"{site}.{k}": v.detach().float().clone() for site, a in adapters.items()
            for k, v in a.state_dict().items()}


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|got - want| / max|want| (the keys must agree)."""
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)).item() for k in want)


def max_update_rel_err(got, want, init) -> float:
    """The same, relative to how far training moved the parameters (a stricter measure)."""
    return max(((got[k] - want[k]).abs().max() / (want[k] - init[k]).abs().max().clamp_min(1e-30)).item()
               for k in want)


def _scale(module: nn.Module):
    """An embedding that scales its output (`embed_scale`, BART's) scales its adapter's too, as PEFT's LoRA does."""
    s = getattr(module, "embed_scale", None) if isinstance(module, nn.Embedding) else None
    return 1.0 if s is None else s


class Backprop:
    """Ordinary backprop training of the adapted model, written without colaft.

    Args:
        base: the base model, as it was before colaft wrapped it (it is deep-copied).
        adapters: site name -> adapter module with the initial weights (deep-copied, made
            trainable, and added to the site's output by a forward hook; scaled like the
            output at an embedding with `embed_scale`).
        make_optimizer: params -> a torch optimizer.
    """

    def __init__(self, base: nn.Module, adapters: dict[str, nn.Module], make_optimizer):
        self.model = copy.deepcopy(base).requires_grad_(False)
        self.adapters = {n: copy.deepcopy(a).float().requires_grad_(True) for n, a in adapters.items()}
        modules = dict(self.model.named_modules())
        for name, adapter in self.adapters.items():
            modules[name].register_forward_hook(lambda mod, args, out, a=adapter: out + a(args[0]) * _scale(mod))
        self.optimizer = make_optimizer([p for a in self.adapters.values() for p in a.parameters()])

    def loss(self, batch) -> torch.Tensor:
        return self.model(**batch).loss

    def step(self, *batches) -> float:
        """One optimizer step on the mean loss of `batches` (gradient accumulation when > 1)."""
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            loss = self.loss(b) / len(batches)
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        return total


def make_opt(name: str, lr: float, weight_decay: float = 0.0):
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    return lambda params: cls(params, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------- exactness figures in the summary

_FIGURES: list[tuple] = []


@pytest.fixture
def report_error(record_property):
    """Record an exactness figure; the terminal summary prints them all as a table."""

    def record(arch: str, optimizer: str, adapter: str, param_err: float, update_err: float):
        record_property("exactness", (arch, optimizer, adapter, param_err, update_err))

    return record


def pytest_runtest_logreport(report):
    if report.when == "call":  # also runs on the xdist controller, which receives user_properties
        _FIGURES.extend(v for k, v in report.user_properties if k == "exactness")


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    tr = terminalreporter
    tr.section("ColA vs backprop: max relative error of adapter parameters after training")
    tr.write_line(f"{'arch':6} {'optim':6} {'adapter':8} {'reference':9} {'|dw|/|w|':>10} {'|dw|/|w-w0|':>12}")
    for arch, opt, adapter, err, upd in sorted(set(_FIGURES)):
        ref = "peft" if adapter.startswith("lowrank") else "autograd"
        tr.write_line(f"{arch:6} {opt:6} {adapter:8} {ref:9} {err:10.2e} {upd:12.2e}")


# ---------------------------------------------------------------- small real model folders (session-wide)

@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 16-wide BERT with MiniLM's (real, uncased WordPiece) tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer, 16-wide Llama with a tiny BPE tokenizer that has a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
