"""`colaft bench serve --servers 2`, smallest: a smoke run on a private PostgreSQL cluster (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


def test_servers_smoke(tmp_path):
    """1 and 2 processes, one round each and one kill: every figure is there, the killed jobs all succeed."""
    result = CliRunner().invoke(bench_app, ["serve", "--servers", "2", "--rounds", "1", "--kills", "1", "--jobs", "2",
                                            "--lease-seconds", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "servers.json").read_text())
    if "skipped" in data:  # no PostgreSQL server binaries here: the report says so
        assert "postgresql" in data["skipped"] and "apt-get" in (tmp_path / "servers.md").read_text()
        return
    one, two = data["configs"]["1"], data["configs"]["2"]
    assert one["steps_per_s"] > 0 and two["steps_per_s"] > 0 and one["p99_ms"] > 0 and two["p99_ms"] > 0
    [kill] = two["kills"]
    assert kill["succeeded"] == kill["of"] == 2 and 0 < kill["leased_s"] <= kill["resumed_s"]
    markdown = (tmp_path / "servers.md").read_text()
    assert "| 1 | " in markdown and "| - | - |" in markdown and "nan" not in markdown
