"""`colaft bench serve --quick`: a smoke run (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


def test_serve_quick(tmp_path):
    """8 users (2 of them with fit clients) against the real server: no request fails, the report has its fields."""
    result = CliRunner().invoke(bench_app, ["serve", "--quick", "--backend", "inline", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "serve.json").read_text())
    markdown = (tmp_path / "serve.md").read_text()
    assert data["requests"]["failed"] == 0, data["requests"]["errors"]
    assert data["requests"]["load_requests"] > 0 and data["requests"]["load_rps"] > 0
    status = data["status_latency"]
    assert status["n"] > 0 and status["failed"] == 0 and 0 < status["p50_ms"] <= status["p99_ms"]
    assert [w["phase"] for w in data["windows"]] == ["quiet", "load"]
    assert all(w["steps"] > 0 and w["rows_per_s"] > 0 for w in data["windows"])  # training ran in both
    assert data["throughput"]["ratio"] > 0 and set(data["targets"]) == {
        "no_failed_request", "status_p99_under_100ms", "throughput_within_20pct"}
    assert len(data["clients"]) == 2 and all(c.get("status") == "cancelled" for c in data["clients"].values())
    assert "p99" in markdown and "load / quiet" in markdown


def test_serve_quick_abuse(tmp_path):
    """--abuse with a few hostile slots: the report has its fields, no good request failed, no hostile one got a 5xx."""
    result = CliRunner().invoke(bench_app, ["serve", "--quick", "--abuse", "--backend", "inline", "--client-every", "0",
                                            "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["requests"]["failed"] == 0, data["requests"]["errors"]
    abuse = data["abuse"]
    assert abuse["good_jobs"] == 16 and abuse["good_jobs_not_succeeded"] == 0, abuse["bad_jobs"]
    for probed in ("health_latency", "status_latency"):  # from the probing process
        assert abuse[probed]["n"] > 0 and abuse[probed]["failed"] == 0, abuse[probed]
    assert abuse["memory"]["peak_mb"] >= abuse["memory"]["baseline_mb"] > 0
    assert abuse["hostile_requests"] > 0 and abuse["hostile_5xx"] == 0, abuse["outcomes"]
    assert abuse["attacker_niceness"] == 10 and "from one process at niceness 10" in (tmp_path / "serve.md").read_text()
    assert {"oversized", "malformed", "invalid keys", "multipart", "flood", "long polls"} <= abuse["outcomes"].keys()
    assert {"good_jobs_all_succeeded", "health_p99_under_100ms", "probed_status_p99_under_100ms",
            "rss_growth_under_200mb"} <= data["targets"].keys()
    assert "Under attack" in (tmp_path / "serve.md").read_text()
