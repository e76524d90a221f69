"""The backprop baselines (full fine-tuning, the real `peft` package's methods), `colaft train
--method`, `--mode shared`, and the `colaft experiment` runner."""
from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch
from tiny_models import QA, review_records, write_jsonl

from colaft import ColaModel, Trainer, data, tasks
from colaft.app import baselines
from colaft.app.cli import main
from colaft.tasks import get_task

FIELDS = ["--text-field", "review", "--label-field", "sentiment"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def reviews(tmp_path):
    return write_jsonl(tmp_path / "reviews.jsonl", review_records(3))


@pytest.fixture
def qa(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a, "topic": t}
                                               for t in ("films", "maths") for q, a in QA * 2])


def test_cola_lowrank_trains_exactly_as_peft_lora(tiny_bert_dir, reviews, tmp_path):
    """ColA low-rank adapters started from a PEFT LoRA adapter follow PEFT's own backprop
    training step for step: same losses, same model after (AdamW, linear schedule, the head too)."""
    job = get_task("sc")
    records = data.load(str(reviews), {"text": "review", "label": "sentiment"}, job.fields, None)
    base = job.load(str(tiny_bert_dir), records, 0)
    batches = list(tasks.loader(job.encode(records, 32), job, 8, shuffle=True, seed=0))
    lora = baselines.build("lora", copy.deepcopy(base), "sc", ["query", "value"], rank=4, alpha=8.0, steps=6)
    torch.manual_seed(1)
    for name, p in lora.net.named_parameters():
        if "lora_B" in name:  # LoRA starts at B = 0; start elsewhere so that A's updates count from step 1
            p.data.normal_(0, 0.2)
    lora.save_pretrained(tmp_path / "init")
    cola = ColaModel.from_peft(copy.deepcopy(base), tmp_path / "init")
    fit = dict(lr=1e-2, scheduler="linear", warmup_ratio=0.2, total_steps=6)
    reference, trainer = baselines.BackpropTrainer(lora, **fit), Trainer(cola, **fit)
    for batch in batches[:6]:
        assert trainer.step(batch) == pytest.approx(reference.step(batch), abs=1e-6)
    assert trainer.lr == pytest.approx(reference.lr)
    lora.eval(), cola.eval()
    with torch.no_grad():
        for batch in batches[6:]:
            torch.testing.assert_close(cola(**batch).logits, lora(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_every_baseline_trains_a_classifier_and_a_causal_lm_through_the_cli(
        method, tiny_bert_dir, tiny_llama_dir, reviews, qa, tmp_path):
    runs = {"sc": ["--model", str(tiny_bert_dir), "--data", str(reviews), *FIELDS],
            "clm": ["--model", str(tiny_llama_dir), "--data", str(qa)]}
    for task, args in runs.items():
        out = tmp_path / task
        assert main(["train", "--task", task, *args, "--method", method, "--batch-size", "8", "--lr", "1e-2",
                     "--max-steps", "4", "--out", str(out)]) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["options"]["method"] == method and run["cola_config"] is None
        assert 0 < run["trainable_parameters"]
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert run["after"]["loss"] != run["before"]["loss"]  # it trained
        saved = {p.name for p in (out / "adapters").iterdir()}
        assert ("model.safetensors" in saved) if method == "full" else ("adapter_model.safetensors" in saved)
        assert main(["eval", str(out), "--out", str(tmp_path / f"{task}.json")]) == 0  # the saved model reloads
        again = json.loads((tmp_path / f"{task}.json").read_text())["metrics"]
        assert again["loss"] == pytest.approx(run["after"]["loss"], abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--method", "qlora"], "--method 'qlora': use cola or one of full, lora"),
    (["--method", "lora", "--users", "2"], "--user-field/--users: options of ColA, not of --method lora"),
    (["--method", "full", "--backend", "process", "--interval", "2"], "--backend, --interval: options of ColA"),
    (["--mode", "shared"], "--mode shared needs users"),
])
def test_bad_method_options_are_refused_before_anything_is_written(extra, message, tiny_bert_dir, reviews,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(reviews), *FIELDS, "--max-steps", "2",
                 "--out", str(out), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_peft_methods_need_a_transformers_task(capsys, tmp_path):
    assert main(["train", "--task", "ic", "--method", "lora", "--out", str(tmp_path / "r")]) == 1
    assert "task ic compares ColA with --method full" in capsys.readouterr().err


def test_shared_mode_trains_one_adapter_and_reports_every_user(tiny_llama_dir, qa, tmp_path):
    out = tmp_path / "shared"
    assert main(["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(qa), "--user-field", "topic",
                 "--mode", "shared", "--batch-size", "4", "--max-steps", "3", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert set(run["after"]["users"]) == {"films", "maths"}
    assert not (out / "adapters" / "colaft_users.json").exists()  # one adapter set, the single-user layout
    assert "| films |" in (out / "users.md").read_text()
    assert main(["eval", str(out), "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert again["users"]["films"]["loss"] == pytest.approx(run["after"]["users"]["films"]["loss"], abs=1e-6)


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


def test_collaborative_mode_weighs_users_by_their_training_rows(tiny_llama_dir, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a, "topic": t}
                                             for t, copies in (("films", 3), ("maths", 1)) for q, a in QA * copies])
    out = tmp_path / "rows"
    assert main(["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(qa), "--user-field", "topic",
                 "--mode", "collaborative", "--user-weights", "rows", "--batch-size", "4", "--max-steps", "2",
                 "--out", str(out)]) == 0
    rows = {line.split(" | ")[0].strip("| "): int(line.split(" | ")[1]) for line in
            (out / "users.md").read_text().splitlines()[2:] if not line.startswith("| all")}
    assert rows["films"] > 2 * rows["maths"] > 0
    saved = json.loads((out / "adapters" / "colaft_users.json").read_text())
    assert saved["mode"] == "collaborative" and saved["weights"] == {u: float(n) for u, n in rows.items()}
    reopened = ColaModel.from_pretrained(get_task("clm").load(str(tiny_llama_dir), [], 0), out / "adapters")
    assert reopened.mode == "collaborative" and reopened.weights == saved["weights"]
    refused = tmp_path / "refused"
    capsys.readouterr()
    assert main(["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(qa), "--user-field", "topic",
                 "--user-weights", "rows", "--out", str(refused)]) == 1  # personal mode has no weights
    assert "--user-weights 'rows': equal, or rows with --mode collaborative" in capsys.readouterr().err
    assert not refused.exists()


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
