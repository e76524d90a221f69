"""`colaft bench users --quick`: a smoke run (no timing assertions)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from colaft.bench import bench_app


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
