"""`colaft train` end to end on tiny models: the run folder, users and modes, offload options, failures."""
from __future__ import annotations

import json

import pytest
from backend_helpers import new_children
from tiny_models import QA, review_records, write_jsonl

from colaft import ColaModel, data, tasks
from colaft.app.cli import main
from colaft.app.train import parse_targets
from colaft.tasks import get_task

FIELDS = ["--text-field", "review", "--label-field", "sentiment"]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_targets():
    assert parse_targets("query,value") == ["query", "value"]
    assert parse_targets("attention.self.query") == ["attention.self.query"]  # a dotted suffix, not a regex
    assert parse_targets(r".*\.(query|value)") == r".*\.(query|value)"
    assert parse_targets("all-linear") == "all-linear"


def test_train_writes_a_complete_run_that_reloads(tiny_args, tiny_bert_dir, reviews, tmp_path, capsys):
    out, peft = tmp_path / "runs" / "r1", tmp_path / "peft"
    assert main([*tiny_args, "--out", str(out), "--export-peft", str(peft), "--eval-every", "4"]) == 0
    stdout = capsys.readouterr().out
    assert "(43 train, 5 held out)" in stdout and "6 steps" in stdout
    assert "held-out before: loss" in stdout and "held-out after:  loss" in stdout

    assert sorted(p.name for p in out.iterdir()) == ["adapters", "loss.png", "metrics.jsonl", "run.json"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = lines(out / "metrics.jsonl")
    assert all(r["bytes"] > 0 and "users" not in r for r in log if r["split"] == "train")
    assert "users" not in log[0] and "user_steps" not in json.loads((out / "run.json").read_text())["resolved"]
    assert [(r["step"], r["split"]) for r in log] == [(0, "eval")] + [(s, "train") for s in range(1, 5)] + \
        [(4, "eval"), (5, "train"), (6, "train"), (6, "eval")]
    assert log[1]["lr"] == 0.01 and log[6]["lr"] < 0.01  # warm-up of 0 steps, then linear decay
    run = json.loads((out / "run.json").read_text())
    assert run["before"] == {k: v for k, v in log[0].items() if k not in ("step", "split")}
    assert run["after"] == {k: v for k, v in log[-1].items() if k not in ("step", "split")}
    assert run["resolved"]["steps"] == 6 and run["options"]["text_field"] == "review"
    assert run["cola_config"]["target_modules"] == "all-linear"  # the task's default

    # The saved adapters on a freshly loaded base reproduce the held-out metrics.
    task = get_task("sc")
    records = data.load(str(reviews), {"text": "review", "label": "sentiment"}, task.fields)
    held_out = data.split(records, 0.1, seed=0)[1]
    cola = ColaModel.from_pretrained(task.load(str(tiny_bert_dir), records, seed=0), out / "adapters")
    batches = list(tasks.loader(task.encode(held_out, 128), task, 16, shuffle=False))
    assert task.evaluate(cola, batches) == pytest.approx(run["after"], rel=1e-5)

    # A run started from the PEFT export begins where the first one ended.
    again = tmp_path / "r2"
    assert main([*tiny_args, "--out", str(again), "--init-adapter", str(peft), "--max-steps", "1"]) == 0
    assert lines(again / "metrics.jsonl")[0]["accuracy"] == run["after"]["accuracy"]
    assert lines(again / "metrics.jsonl")[0]["loss"] == pytest.approx(run["after"]["loss"], rel=1e-5)


def test_train_image_task_on_digits(tmp_path, capsys):
    out = tmp_path / "ic"
    assert main(["train", "--task", "ic", "--max-steps", "60", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["model"] == "cnn" and run["resolved"]["data"] == "digits"
    assert run["before"]["accuracy"] < 0.2  # ten classes, random frozen CNN
    assert run["after"]["accuracy"] > 0.8
    epochs = [r["epoch"] for r in lines(out / "metrics.jsonl") if r["split"] == "train"]
    assert epochs == [0] * 26 + [1] * 26 + [2] * 8  # 1617 images in batches of 64: 26 a pass


def test_image_file_with_renamed_fields(tmp_path):
    digits = data.load("digits")[:40]
    path = write_jsonl(tmp_path / "d.jsonl", [{"pixels": r["image"].tolist(), "digit": r["label"]} for r in digits])
    out = tmp_path / "run"
    assert main(["train", "--task", "ic", "--model", "mlp", "--data", str(path), "--image-field", "pixels",
                 "--label-field", "digit", "--max-steps", "3", "--out", str(out)]) == 0
    assert [r["step"] for r in lines(out / "metrics.jsonl")] == [0, 1, 2, 3, 3]


# ---------------------------------------------------------------- users
@pytest.fixture
def authored(tmp_path):
    """The reviews with an "author" column: ann, bob, cy in turn (16 records each)."""
    return write_jsonl(tmp_path / "authored.jsonl", [dict(r, author=["ann", "bob", "cy"][i % 3])
                                                     for i, r in enumerate(review_records(3))])


def test_train_with_a_user_field_reports_every_user(tiny_bert_dir, authored, tmp_path, capsys):
    out = tmp_path / "users"
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(authored), *FIELDS, "--user-field", "author",
                 "--batch-size", "8", "--lr", "0.01", "--max-steps", "6", "--eval-every", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "(42 train, 6 held out); 3 users, personal mode;" in stdout  # 2 held out per user
    assert "| ann | 14 | 2 | " in stdout

    assert sorted(p.name for p in out.iterdir()) == ["adapters", "loss.png", "metrics.jsonl", "run.json", "users.md"]
    # each user's adapters under its own name; reloaded, they give each user's held-out metrics
    task = get_task("sc")
    records = data.load(str(authored), {"text": "review", "label": "sentiment"}, task.fields, "author")
    saved = ColaModel.from_pretrained(task.load(str(tiny_bert_dir), records, seed=0), out / "adapters")
    assert saved.users == ["ann", "bob", "cy"]
    batches = list(tasks.loader(task.encode(data.split(records, 0.1, seed=0)[1], 128), task, 16, shuffle=False))
    reloaded = task.evaluate(saved, batches)["users"]
    after = json.loads((out / "run.json").read_text())["after"]["users"]
    for user in after:
        assert reloaded[user] == pytest.approx(after[user], rel=1e-5)
    log = lines(out / "metrics.jsonl")
    evals, steps = [r for r in log if r["split"] == "eval"], [r for r in log if r["split"] == "train"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert set(r["users"]) == {"ann", "bob", "cy"}
        assert all(set(m) == {"loss", "accuracy", "f1"} for m in r["users"].values())
    for r in steps:  # each step: the losses of the users in its batch, and their mean
        assert r["users"] and set(r["users"]) <= {"ann", "bob", "cy"} and r["bytes"] > 0
        assert r["loss"] == pytest.approx(sum(r["users"].values()) / len(r["users"]))
    run = json.loads((out / "run.json").read_text())
    assert run["after"]["users"] == evals[-1]["users"] and run["options"]["user_field"] == "author"
    # Each user's schedule spans the steps that hold its rows, counted before training ran them.
    assert run["resolved"]["user_steps"] == {u: sum(u in r["users"] for r in steps) for u in ("ann", "bob", "cy")}

    table = (out / "users.md").read_text().splitlines()
    assert table[0] == "| user | train rows | held-out rows | loss | accuracy | f1 |"
    assert [row.split(" | ")[:3] for row in table[2:]] == [["| ann", "14", "2"], ["| bob", "14", "2"],
                                                           ["| cy", "14", "2"], ["| all", "42", "6"]]
    before, after = run["before"]["users"]["bob"], run["after"]["users"]["bob"]
    assert table[3] == "| bob | 14 | 2 | " + " | ".join(f"{before[k]:.4f} -> {after[k]:.4f}" for k in before) + " |"


def test_train_k_users_collaborative(tiny_args, tmp_path, capsys):
    out = tmp_path / "k"
    assert main([*tiny_args, "--users", "3", "--mode", "collaborative", "--out", str(out)]) == 0
    assert "3 users, collaborative mode" in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["after"]["users"]) == ["user1", "user2", "user3"]
    assert (out / "users.md").read_text().count("| user") == 4  # the header and three users


def test_clm_users_in_one_run(tiny_llama_dir, qa, tmp_path):
    out = tmp_path / "clm"
    assert main(["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(qa), "--user-field", "topic",
                 "--batch-size", "4", "--max-steps", "3", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert set(run["after"]) == {"loss", "perplexity", "rougeL", "users"}
    assert {u: set(m) for u, m in run["after"]["users"].items()} == {"films": {"loss", "perplexity"},
                                                                      "maths": {"loss", "perplexity"}}


def test_users_start_from_and_export_to_peft(tiny_args, tmp_path):
    """--init-adapter starts every user from one PEFT adapter; --export-peft writes PEFT's multi-adapter layout."""
    from peft import PeftModel
    first, peft = tmp_path / "r1", tmp_path / "peft"
    assert main([*tiny_args, "--out", str(first), "--export-peft", str(peft), "--max-steps", "2"]) == 0
    again, exported = tmp_path / "r2", tmp_path / "peft-users"
    assert main([*tiny_args, "--out", str(again), "--users", "2", "--init-adapter", str(peft), "--max-steps", "2",
                 "--export-peft", str(exported)]) == 0
    assert (exported / "adapter_config.json").is_file() and (exported / "user2" / "adapter_config.json").is_file()
    run = json.loads((again / "run.json").read_text())
    assert run["before"]["users"]["user1"] != run["after"]["users"]["user1"]
    task = get_task("sc")
    base = task.load(str(tiny_args[2]), data.load(str(tiny_args[4]), {"text": "review", "label": "sentiment"},
                                                  task.fields), seed=0)
    PeftModel.from_pretrained(base, str(exported)).load_adapter(str(exported / "user2"), adapter_name="user2")


# ---------------------------------------------------------------- modes

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


def test_divergence_mid_training_leaves_nothing(tiny_args, tmp_path, capsys):
    before = sorted(tmp_path.rglob("*"))
    assert main([*tiny_args, "--lr", "1e30", "--out", str(tmp_path / "runs" / "nan")]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the error
    assert err[-1].startswith("colaft: error: the loss is nan at step")
    assert sum("error" in line for line in err) == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_existing_out_folder_is_refused(tiny_args, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main([*tiny_args, "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "taken").iterdir()) == []


def test_options_are_checked_as_a_whole_before_anything_loads(tiny_args, tmp_path, capsys, monkeypatch):
    from colaft.app import runs
    monkeypatch.setattr(runs, "load", lambda setup: pytest.fail("loaded before the options were checked"))
    assert main([*tiny_args, "--batch-size", "0", "--epochs", "0", "--warmup", "1", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["colaft: error: --warmup: Input should be less than 1; --batch-size: Input should be greater "
                   "than 0; --epochs: Input should be greater than 0"]  # in --help's order


@pytest.mark.parametrize("flag", ["--out", "--export-peft"])
def test_out_under_a_file_is_one_line_naming_the_flag(tiny_args, tmp_path, capsys, flag):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "run"
    extra = [flag, str(bad)] + (["--out", str(tmp_path / "run")] if flag != "--out" else [])
    assert main([*tiny_args, *extra]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"colaft: error: {flag}: '{bad}': '{tmp_path / 'file'}' is a file, not a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "reviews.jsonl"]


def test_a_failed_write_names_out_and_leaves_no_temporary(tiny_args, tmp_path, capsys, monkeypatch):
    from colaft.app import loop

    def refuse(trainer, model, task, batches, eval_batches, steps, run, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run / "metrics.jsonl"))  # as a read-only disk would

    monkeypatch.setattr(loop, "train", refuse)
    out = tmp_path / "runs" / "r"
    assert main([*tiny_args, "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"colaft: error: --out: '{out}': cannot write there (Permission denied)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.jsonl"]  # no runs/, no hidden temporary


# ---------------------------------------------------------------- where the fits run

@pytest.fixture
def cli_args(tiny_bert_dir, reviews):
    return ["train", "--model", str(tiny_bert_dir), "--data", str(reviews), "--text-field", "review",
            "--label-field", "sentiment", "--batch-size", "8", "--max-steps", "4"]


def test_cli_trains_on_worker_processes_and_stops_them(cli_args, tmp_path, capsys):
    before = new_children()
    out = tmp_path / "run"
    offload = ["--backend", "process", "--workers", "1", "--staleness", "1", "--transfer-dtype", "bfloat16"]
    assert main([*cli_args, "--lr", "0.01", *offload, "--out", str(out)]) == 0
    options = json.loads((out / "run.json").read_text())["options"]
    assert (options["backend"], options["workers"], options["staleness"]) == ("process", 1, 1)
    assert new_children() <= before
    # a run that fails mid-training (the loss diverges) stops its workers too
    assert main([*cli_args, "--lr", "1e30", *offload, "--out", str(tmp_path / "nan")]) == 1
    # with staleness 1 either the loss or a worker's update is the first to turn non-finite (a race)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("colaft: error:") and err.endswith("lower the learning rate"), err
    assert new_children() <= before


@pytest.mark.parametrize("extra, message", [
    (["--backend", "pigeon"], "--backend: unknown backend 'pigeon'; use one of inline, process, ray"),
    (["--workers", "2"], "--workers: a number >= 1, with --backend process or ray"),
    (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --backend ray"),
    (["--staleness", "-1"], "--staleness: Input should be greater than or equal to 0"),
    (["--transfer-dtype", "int8"], "--transfer-dtype: unknown transfer dtype 'int8'; use one of float32, bfloat16"),
])
def test_cli_offload_options_are_checked(cli_args, tmp_path, capsys, extra, message):
    assert main([*cli_args, *extra, "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_main_job_defaults_on_real_minilm(tmp_path, capsys):
    # The real model and data with three steps: checks the defaults, not the accuracy.
    out = tmp_path / "run"
    assert main(["train", "--max-steps", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("task sc: minilm-l6 on rotten-tomatoes (11477 train, 1275 held out)")
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["max_length"] == get_task("sc").recipe.max_length
    assert 0.3 < run["before"]["accuracy"] < 0.7  # an untrained head on two classes


def test_ctrl_c_says_what_was_kept_and_leaves_no_temporary(tiny_args, tmp_path):
    """SIGINT once training runs: the bar is wiped, one line says what was kept, status 130."""
    import signal
    import subprocess
    import sys
    import threading

    out = tmp_path / "runs" / "run"
    args = [a if a != "6" else "1000000" for a in tiny_args]  # --max-steps: longer than the test
    proc = subprocess.Popen([sys.executable, "-m", "colaft.app.cli", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err, started = bytearray(), threading.Event()

    def read() -> None:  # the bar is drawn with \r, no newline: read bytes as they come
        while chunk := proc.stderr.read1(4096):
            err.extend(chunk)
            if b"train:" in err:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(120), err.decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
    reader.join(10)
    lines = err.decode().rstrip("\n").split("\n")
    assert lines[-1].split("\r")[-1] == f"colaft: interrupted: nothing was saved ('{out}' was not written)"
    assert not any("Traceback" in line or "interrupted" in line for line in lines[:-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.jsonl"]  # no runs/, no hidden temporary
