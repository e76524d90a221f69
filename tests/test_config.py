"""colaft.config: ColaConfig's defaults, its validation, and its round trip through a dict and JSON."""
from __future__ import annotations

import json

import pytest

from colaft import DEFAULT_USER, ColaConfig


def test_config_is_validated():
    with pytest.raises(ValueError, match="target_modules is empty"):
        ColaConfig(target_modules=[])
    with pytest.raises(ValueError, match="rnak"):
        ColaConfig(target_modules=["q_proj"], rnak=4)
    cfg = ColaConfig(target_modules="all-linear", adapter="mlp", hidden=16, heads=["head"])
    assert ColaConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults_are_peft_like_and_the_default_user_is_named():
    cfg = ColaConfig(target_modules=["q_proj", "v_proj"])
    assert (cfg.adapter, cfg.rank, cfg.alpha, cfg.dropout, cfg.merge) == ("lowrank", 8, 16.0, 0.0, False)
    assert (cfg.hidden, cfg.layers, cfg.activation, cfg.bias) == (128, 2, "relu", False)
    assert cfg.heads == ["classifier", "score"]
    assert cfg.heads is not ColaConfig(target_modules=["q_proj"]).heads  # each config its own list
    assert DEFAULT_USER == "default"


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("hidden", 0), ("layers", 1), ("dropout", -0.1), ("dropout", 1.0), ("activation", "swish"),
    ("rank", "four"), ("target_modules", 3),
])
def test_each_field_refuses_values_out_of_range(field, value):
    with pytest.raises(ValueError, match=rf"validation errors? for ColaConfig\n{field}\b"):
        ColaConfig(**{"target_modules": ["q_proj"], field: value})


def test_merge_needs_no_dropout():
    with pytest.raises(ValueError, match="dropout needs merge=False"):
        ColaConfig(target_modules=["q_proj"], merge=True, dropout=0.1)
    assert ColaConfig(target_modules=["q_proj"], merge=True).merge


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q|v)_proj", adapter="linear", bias=True, merge=True, heads=[]),
    dict(target_modules="all-linear", adapter="mlp", hidden=16, layers=3, activation="tanh", dropout=0.2),
])
def test_json_round_trip_gives_the_same_config(config):
    cfg = ColaConfig(**config)
    assert cfg.to_dict() == {**ColaConfig(target_modules=["x"]).to_dict(), **config}
    assert ColaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
