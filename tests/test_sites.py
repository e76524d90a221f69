"""Site selection (PEFT's conventions), task heads, and the packet rows of a site."""
from __future__ import annotations

import pytest
import torch
from conftest import LENGTHS, SEQ, text_batch, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaForSequenceClassification

from colaft import ColaConfig, ColaModel, server_step
from colaft.sites import select_sites, site_spec

HEADS = ["classifier", "score"]


def _gpt2(i: int, kind: str) -> str:
    return f"transformer.h.{i}.{kind}"


def _llama(i: int, proj: str) -> str:
    part = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{i}.{part}.{proj}"


LLAMA_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("targets,want", [
    (["c_attn"], [_gpt2(0, "attn.c_attn"), _gpt2(1, "attn.c_attn")]),  # dotted suffix
    (["transformer.h.1.mlp.c_proj"], [_gpt2(1, "mlp.c_proj")]),  # exact name
    (["attn.c_proj"], [_gpt2(0, "attn.c_proj"), _gpt2(1, "attn.c_proj")]),  # a longer suffix narrows
    (["c_proj"], [_gpt2(0, "attn.c_proj"), _gpt2(0, "mlp.c_proj"), _gpt2(1, "attn.c_proj"), _gpt2(1, "mlp.c_proj")]),
    (["h.0.attn.c_attn", "c_attn"], [_gpt2(0, "attn.c_attn"), _gpt2(1, "attn.c_attn")]),  # no duplicates
    (["wte", "c_fc"], ["transformer.wte", _gpt2(0, "mlp.c_fc"), _gpt2(1, "mlp.c_fc")]),  # in the order of the keys
    (r".*\.1\.(attn|mlp)\.c_.*", [_gpt2(1, "attn.c_attn"), _gpt2(1, "attn.c_proj"), _gpt2(1, "mlp.c_fc"),
                                  _gpt2(1, "mlp.c_proj")]),  # regex, full match
    ("all-linear", [_gpt2(i, k) for i in range(2) for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]),
])
def test_select_on_gpt2(targets, want):
    assert select_sites(tiny_gpt2(), targets, HEADS) == (want, [])


def test_all_linear_excludes_the_output_head_and_the_task_heads():
    # Llama: every projection, not lm_head
    assert select_sites(tiny_llama(), "all-linear", HEADS) == (
        [_llama(i, p) for i in range(2) for p in LLAMA_PROJS], [])
    # Llama for classification: `score` is a head, not a target
    llama_cls = LlamaForSequenceClassification(tiny_llama().config)
    targets, heads = select_sites(llama_cls, "all-linear", HEADS)
    assert heads == ["score"] and "score" not in targets and len(targets) == 14
    # BERT: six linear layers per block and the pooler; the classifier is a head
    per_block = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert select_sites(tiny_bert(), "all-linear", HEADS) == (
        [f"bert.encoder.layer.{i}.{k}" for i in range(2) for k in per_block] + ["bert.pooler.dense"], ["classifier"])
    # a head named explicitly is still a head, not a target
    assert select_sites(tiny_bert(), ["query", "classifier"], HEADS) == (
        [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)], ["classifier"])


def test_heads_inside_a_container_and_user_heads():
    class Roberta(nn.Module):  # RobertaClassificationHead: classifier.dense, classifier.out_proj
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.classifier = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    assert select_sites(Roberta(), "all-linear", HEADS) == (["body"], ["classifier.0", "classifier.2"])
    cm = ColaModel(tiny_cnn(), ColaConfig(target_modules=["conv1"], heads=["fc"]))
    head = cm.site("fc").adapter
    assert type(head).__name__ == "FullDelta" and head.bias is not None and head.weight.shape == (3, 54)
    assert select_sites(tiny_bert(), ["query"], []) == ([f"bert.encoder.layer.{i}.attention.self.query"
                                                         for i in range(2)], [])


CNN_CANDIDATES = "modules by name: conv1, conv2, fc"


@pytest.mark.parametrize("targets,message", [
    (["nope"], f"target 'nope' matches no module; {CNN_CANDIDATES}"),
    (["conv1", "conv3"], "target 'conv3' matches no module; closest: conv2, conv1"),  # every key must match
    (["onv1"], "target 'onv1' matches no module; closest: conv1, conv2"),  # a suffix ends at a dot
    (["act"], f"target 'act' matches no module; it names unsupported modules: act (ReLU); {CNN_CANDIDATES}"),
    ("conv", "target_modules 'conv' match no module; closest: conv1, conv2"),  # a regex matches the whole name
    (["nope", "onv2"], "target 'nope' matches no module (nor 'onv2'); closest: conv2, conv1"),  # all named
])
def test_selection_errors_list_the_candidates(targets, message):
    with pytest.raises(ValueError) as info:
        select_sites(tiny_cnn(), targets, HEADS)
    assert str(info.value) == message


def test_selection_errors_on_a_transformer():
    with pytest.raises(ValueError, match=r"target 'ln_f' matches no module; it names unsupported modules: "
                                         r"transformer\.ln_f \(LayerNorm\); modules by name: wte, wpe, c_attn, "):
        ColaModel(tiny_gpt2(), ColaConfig(target_modules=["ln_f"]))
    with pytest.raises(ValueError, match=r"target_modules \['classifier'\] match only task heads"):
        select_sites(tiny_bert(), ["classifier"], HEADS)
    with pytest.raises(ValueError, match=r"LSTM is not a supported site kind \(Linear, Conv1D, Conv2d, Embedding\)"):
        site_spec(nn.LSTM(4, 4))


def test_padding_rows_are_dropped():
    """Token sites emit one row per attended token (mask.sum()); pooled heads one per sequence."""
    batch = text_batch(0, "cls")
    mask = batch["attention_mask"]
    assert mask.sum().item() == sum(LENGTHS) < mask.numel() == len(LENGTHS) * SEQ
    cm = ColaModel(tiny_bert(), ColaConfig(target_modules=["word_embeddings", "query", "intermediate.dense"]))
    packets = server_step(cm, batch).packets
    rows = {p.site: len(p.x) for p in packets}
    assert rows == {"bert.embeddings.word_embeddings": 18, **{f"bert.encoder.layer.{i}.attention.self.query": 18
                                                              for i in range(2)},
                    **{f"bert.encoder.layer.{i}.intermediate.dense": 18 for i in range(2)}, "classifier": 4}
    assert all(len(p.grad) == len(p.x) for p in packets)
    emb = next(p for p in packets if p.site == "bert.embeddings.word_embeddings")
    assert torch.equal(emb.x, batch["input_ids"][mask.bool()])  # the kept rows are the attended tokens
    # without a mask every position is a row
    del batch["attention_mask"]
    packets = server_step(cm, batch).packets
    assert {len(p.x) for p in packets if p.site != "classifier"} == {len(LENGTHS) * SEQ}


def test_no_match_error_is_short_and_names_the_closest_modules():
    """What a user typed wrong, and what they meant: not every module of the model."""
    with pytest.raises(ValueError) as info:
        select_sites(tiny_bert(), ["q", "v"], HEADS)
    assert str(info.value) == "target 'q' matches no module (nor 'v'); closest: query, value"
    with pytest.raises(ValueError) as info:  # a dotted key is compared with dotted suffixes
        select_sites(tiny_bert(), ["self.qury"], HEADS)
    assert str(info.value) == "target 'self.qury' matches no module; closest: self.query, self.key, self.value"


def test_no_match_error_lists_the_short_names_once():
    with pytest.raises(ValueError, match=r"by name: wte, wpe, c_attn, c_proj, c_fc, lm_head$"):
        ColaModel(tiny_gpt2(), ColaConfig(target_modules=["qkv"]))


class _LongNames(nn.Module):
    """Linear layers whose names invite catastrophic backtracking: 'aaaa…a' then a suffix."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a" * 60 + str(i): nn.Linear(2, 2) for i in range(4)})


def test_a_catastrophic_pattern_is_matched_without_backtracking():
    # with Python's re, (a+)+$ on 60 a's then a digit backtracks through 2**60 splits
    with pytest.raises(ValueError, match="match no module"):
        select_sites(_LongNames(), r"blocks\.(a+)+$", [])


def test_an_invalid_pattern_is_a_value_error_naming_the_pattern():
    with pytest.raises(ValueError, match=r"'blocks\(' is not a valid regex \(RE2 syntax\): missing \)"):
        select_sites(_LongNames(), "blocks(", [])
    targets, _ = select_sites(_LongNames(), r"blocks\.a+[0-3]", [])
    assert len(targets) == 4
