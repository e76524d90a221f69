"""`colaft experiment`: learning rates, seeds and resuming; the tables and plots of ColA against the baselines."""
from __future__ import annotations

import json
import statistics

import pytest

from colaft.app.cli import main


def test_experiment_picks_rates_runs_seeds_resumes_and_shows_linear_cola_is_full_training(tmp_path, capsys):
    """On a random frozen CNN, ColA's linear adapters (with bias) on every layer train exactly
    what full training does: the same held-out metrics per seed."""
    out = tmp_path / "ic"
    args = ["experiment", "--task", "ic", "--methods", "full,cola-linear", "--seeds", "0,1", "--lrs", "1e-2,1e-1",
            "--steps", "4", "--batch-size", "32", "--jobs", "2", "--out", str(out), "--train-option=--bias"]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["lrs"]) == {"full", "cola-linear"} and set(report["sweep"]["full"]) == {"0.01", "0.1"}
    assert {(r["method"], r["seed"]) for r in report["runs"]} == {(m, s) for m in ("full", "cola-linear")
                                                                   for s in (0, 1)}
    by = {(r["method"], r["seed"]): r for r in report["runs"]}
    for seed in (0, 1):
        full, cola = by[("full", seed)], by[("cola-linear", seed)]
        assert cola["lr"] == full["lr"]
        assert cola["after"]["loss"] == pytest.approx(full["after"]["loss"], rel=1e-4)
        assert cola["after"]["accuracy"] == full["after"]["accuracy"]
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| cola-linear |" in table and "Learning rates tried on seed 0" in table
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    walls = sorted((out / "logs").glob("*.wall"))
    stamps = [w.stat().st_mtime_ns for w in walls]
    capsys.readouterr()
    assert main(args) == 0  # everything is done: nothing runs again
    assert [w.stat().st_mtime_ns for w in sorted((out / "logs").glob("*.wall"))] == stamps
    assert json.loads((out / "results.json").read_text())["runs"] == report["runs"]


def test_collaboration_experiment_reports_every_user_for_every_mode(tiny_llama_dir, qa, tmp_path):
    out = tmp_path / "users"
    assert main(["experiment", "--task", "clm", "--model", str(tiny_llama_dir), "--train-option", f"--data={qa}",
                 "--user-field", "topic", "--methods", "users-personal,users-collaborative,users-shared",
                 "--seeds", "0,1", "--steps", "2", "--batch-size", "4", "--jobs", "2", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["seed"]) for r in report["runs"]} == {(m, s) for m in ("users-personal",
            "users-collaborative", "users-shared") for s in (0, 1)}
    for run in report["runs"]:
        assert set(run["after"]["users"]) == set(run["before"]["users"]) == {"films", "maths"}
    lines = (out / "results.md").read_text().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[lines.index(next(
        line for line in lines if line.startswith("Held-out loss per user"))):]}
    mean = statistics.mean(r["after"]["users"]["films"]["loss"] for r in report["runs"]
                           if r["method"] == "users-shared")
    assert f"{mean:.4f}" in rows["films"]
    assert rows["best for"].count(" of 2 users") == 3 and rows["films"].count("*") == 1
    maths = statistics.mean(r["after"]["users"]["maths"]["loss"] for r in report["runs"]
                            if r["method"] == "users-shared")
    assert rows["mean over users"].endswith(f" | {(mean + maths) / 2:.4f} |")  # shared is the last column
    assert (out / "users.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_refuses_unknown_methods_and_users_methods_without_users(tmp_path, capsys):
    assert main(["experiment", "--methods", "lora,qlora", "--out", str(tmp_path / "x")]) == 1
    assert "unknown qlora" in capsys.readouterr().err
    assert main(["experiment", "--methods", "users-personal", "--out", str(tmp_path / "x")]) == 1
    assert "need users" in capsys.readouterr().err
