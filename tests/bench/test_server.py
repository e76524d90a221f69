"""`colaft bench server --quick`: a smoke run (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app
from colaft.bench.models import PRESETS, make_batch
from colaft.bench.server import CONFIGS


def expected_packet_bytes(name: str = "tiny") -> int:
    """q_proj and v_proj of every layer: x (N, hidden) and dL/dh (N, out) in float32, no padding."""
    preset = PRESETS[name]
    c = preset.config
    tokens = make_batch(preset, *preset.cpu_batch)["attention_mask"].sum().item()
    q_out, v_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = (c["hidden_size"] + q_out) + (c["hidden_size"] + v_out)
    return tokens * per_layer * c["num_hidden_layers"] * 4


def test_server_quick(tmp_path):
    result = CliRunner().invoke(bench_app, ["server", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output

    markdown = (tmp_path / "server.md").read_text()
    data = json.loads((tmp_path / "server.json").read_text())
    assert len(list(tmp_path.glob("server-tiny-*.png"))) == 2
    (run,) = data["runs"]
    assert run["errors"] == {}
    assert list(run["rows"]) == CONFIGS
    for name, row in run["rows"].items():
        assert f"| {name} |" in markdown
        assert row["time_s"] > 0 and row["mem_bytes"] is not None
        if name.startswith("cola-"):
            assert row["trainable_server"] == 0  # ColA's server trains nothing
            assert row["packet_bytes"] == expected_packet_bytes()
            assert row["fit_time_s"] > 0 and row["fit_cpu_s"] > 0
    assert run["rows"]["peft-lora"]["trainable_server"] > 0
    assert "server peak memory / PEFT LoRA" in markdown  # the targets table
