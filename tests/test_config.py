"""colaft.config: ColaConfig validates its fields and round-trips through a dict."""
from __future__ import annotations

import pytest

from colaft import ColaConfig


def test_config_is_validated():
    with pytest.raises(ValueError, match="target_modules is empty"):
        ColaConfig(target_modules=[])
    with pytest.raises(ValueError, match="rnak"):
        ColaConfig(target_modules=["q_proj"], rnak=4)
    cfg = ColaConfig(target_modules="all-linear", adapter="mlp", hidden=16, heads=["head"])
    assert ColaConfig.from_dict(cfg.to_dict()) == cfg
