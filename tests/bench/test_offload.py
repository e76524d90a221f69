"""`colaft bench offload --quick`: a smoke run (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


def test_offload_quick(tmp_path):
    """The offload benchmark end to end on the real task, small: inline and worker processes."""
    args = ["offload", "--quick", "--backends", "inline,process", "--out", str(tmp_path)]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "offload.json").read_text())
    rows = data["throughput"]["rows"]
    assert list(rows) == ["server", "inline S=0", "process S=0", "process S=1"]
    assert all(r["samples_per_s"] > 0 for r in rows.values()) and data["throughput"]["errors"] == {}
    assert rows["process S=1"]["recoveries"] == 0 and rows["process S=1"]["packet_mib"] > 0
    staleness = data["staleness"]
    assert list(staleness["rows"]) == ["S=0", "S=1 (delayed inline)", "S=0, bfloat16 packets",
                                       "S=1 on worker processes"]
    assert staleness["real_vs_delayed_max_abs_diff"] == 0.0  # one user at S = 1: the same trajectory
    markdown = (tmp_path / "offload.md").read_text()
    assert "### Throughput" in markdown and "### Targets" in markdown
