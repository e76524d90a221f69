"""`colaft bench startup`: the report's shape (no timing is asserted: figures are the benchmark's)."""
from __future__ import annotations

import json

from colaft.app.cli import main
from colaft.bench.startup import CASES, import_offenders


def test_startup_report(tmp_path, capsys):
    assert main(["bench", "startup", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "startup.json").read_text())
    assert set(data["medians"]) == set(CASES) and data["runs"] == 2
    assert all(len(times) == 2 and min(times) > 0 for times in data["seconds"].values())
    report = (tmp_path / "startup.md").read_text()
    assert "| `colaft --help` |" in report and "python -X importtime" in report
    assert "report: " in capsys.readouterr().out


def test_import_offenders_are_top_level_modules():
    rows = import_offenders(CASES['python -c "import colaft"'])
    assert rows and rows[0]["cumulative_ms"] >= rows[-1]["cumulative_ms"]
    assert all(0 <= r["self_ms"] <= r["cumulative_ms"] for r in rows)
