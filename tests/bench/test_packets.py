"""`colaft bench packets --quick`: a smoke run; the bytes must agree across the ways they are counted."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


def test_packets_quick(tmp_path):
    result = CliRunner().invoke(bench_app, ["packets", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "packets.json").read_text())
    before, shared, small = (data["rows"][n] for n in ("before (float32)", "shared (float32)", "shared (bfloat16)"))
    assert len(data["steps"]) == 2 and all(s["inputs"] < s["packets"] for s in data["steps"])
    for b, s, h in zip(before["count"], shared["count"], small["count"]):
        assert h * 2 == s < b  # q/k/v share one x; bfloat16 halves every float
    for row in (before, shared, small):  # each transport moves what is counted (plus headers, alignment)
        for way in ("safetensors", "shared_memory", "ray"):
            assert all(0 <= got - n < 64 * 1024 for got, n in zip(row[way], row["count"])), way
    assert 0.85 < shared["x_before"] < 0.9  # MiniLM: q/k/v's 3 x 384 of 6912 floats per token and layer
    assert "| shared (bfloat16) |" in (tmp_path / "packets.md").read_text()
