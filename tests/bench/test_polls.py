"""`colaft bench polls --quick`: a smoke run (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


def test_polls_quick(tmp_path):
    """Long polls held open against the real server: every probe answers, every poll is seen waiting
    and answers when the job ends, the report has its figures."""
    result = CliRunner().invoke(bench_app, ["polls", "--quick", "--polls", "40", "--probes", "10",
                                            "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "polls.json").read_text())
    assert data["polls_waiting"] == 40 and data["poll_outcomes"] == {"200": 40} and data["cancel_status"] == 200
    for phase in ("quiet", "load"):
        for kind in ("health", "status"):
            stats = data["probes"][phase][kind]
            assert stats["n"] == 10 and stats["failed"] == 0 and 0 < stats["p50_ms"] <= stats["p99_ms"]
    assert "p99" in (tmp_path / "polls.md").read_text()
