"""`colaft eval` and `colaft generate` on tiny runs trained by `colaft train`."""
from __future__ import annotations

import io
import json

import pytest
from cli_helpers import error_of, run_cli
from tiny_models import QA, review_records, write_jsonl

from colaft import data
from colaft.app.cli import main
from colaft.tasks import get_task

FIELDS = ["--text-field", "review", "--label-field", "sentiment"]


# ---------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def sc_run(tiny_bert_dir, tmp_path_factory):
    """A 6-step sc run of three users (ann, bob, cy: a column of the data) and its data file."""
    tmp_path = tmp_path_factory.mktemp("sc")
    path = write_jsonl(tmp_path / "authored.jsonl", [dict(r, author=["ann", "bob", "cy"][i % 3])
                                                     for i, r in enumerate(review_records(3))])
    out = tmp_path / "sc"
    assert main(["train", "--model", str(tiny_bert_dir), "--data", str(path), *FIELDS, "--user-field", "author",
                 "--batch-size", "8", "--lr", "0.01", "--max-steps", "6", "--out", str(out)]) == 0
    return out, path


def test_eval_reproduces_the_runs_after_metrics(sc_run, tmp_path, capsys):
    run, _ = sc_run
    status, stdout, _ = run_cli(capsys, "eval", run, "--out", tmp_path / "eval" / "m.json")
    assert status == 0
    after = json.loads((run / "run.json").read_text())["after"]
    saved = json.loads((tmp_path / "eval" / "m.json").read_text())
    assert saved["data"] == "held-out" and saved["rows"] == 6 and saved["batch_size"] == 16
    users = saved["metrics"].pop("users")
    assert saved["metrics"] == pytest.approx({k: v for k, v in after.items() if k != "users"}, rel=1e-6)
    assert users.keys() == after["users"].keys()
    for user, metrics in after["users"].items():
        assert users[user] == pytest.approx(metrics, rel=1e-6)
    assert "evaluating on held-out (6 rows); 3 users, personal mode" in stdout
    assert f"held-out: loss {after['loss']:.4f}  accuracy {after['accuracy']:.4f}" in stdout
    assert f"| ann | 14 | 2 | {after['users']['ann']['loss']:.4f} | " in stdout  # the per-user table


def test_eval_on_a_data_file(sc_run, tmp_path, capsys):
    """--data reads a file with the run's field options: its held-out rows, written out, give its metrics."""
    run, path = sc_run
    task = get_task("sc")
    held_out = data.split(data.load(str(path), {"text": "review", "label": "sentiment"}, task.fields, "author"),
                          0.1, seed=0)[1]
    file = write_jsonl(tmp_path / "held.jsonl", [{"review": r["text"], "sentiment": r["label"], "author": r["user"]}
                                                 for r in held_out[::-1]])  # another order: other batches
    status, stdout, _ = run_cli(capsys, "eval", run, "--data", file, "--batch-size", "4", "--out", tmp_path / "m.json")
    assert status == 0 and f"evaluating on {file} (6 rows)" in stdout
    assert "| user | train rows | rows | loss | accuracy | f1 |" in stdout
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    after = json.loads((run / "run.json").read_text())["after"]
    assert metrics["loss"] == pytest.approx(after["loss"], rel=1e-5) and metrics["accuracy"] == after["accuracy"]
    # a file without the run's user column is refused, naming it
    plain = write_jsonl(tmp_path / "plain.jsonl", review_records(1))
    assert "field 'author' (for user) is not in" in error_of(capsys, "eval", run, "--data", plain)


def test_eval_errors_are_one_line(sc_run, tmp_path, capsys):
    assert "run folder" in error_of(capsys, "eval", tmp_path / "nowhere") and "does not exist" in \
        error_of(capsys, "eval", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "has no run.json: not a run folder of colaft train" in error_of(capsys, "eval", tmp_path / "empty")
    assert "--batch-size must be >= 1" in error_of(capsys, "eval", sc_run[0], "--batch-size", "0")


# ---------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def clm_runs(tiny_llama_dir, tmp_path_factory):
    """Tiny-Llama clm runs of 3 steps, each with its PEFT export: one user, and two users (topics films, maths)."""
    folder = tmp_path_factory.mktemp("clm")
    path = write_jsonl(folder / "qa.jsonl", [{"question": q, "answer": a, "topic": t}
                                             for t in ("films", "maths") for q, a in QA * 2])
    common = ["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(path), "--batch-size", "4",
              "--lr", "0.01", "--max-steps", "3"]
    assert main([*common, "--out", str(folder / "one"), "--export-peft", str(folder / "peft")]) == 0
    assert main([*common, "--user-field", "topic", "--out", str(folder / "two"),
                 "--export-peft", str(folder / "peft-two")]) == 0
    return folder


def test_generate_answers_greedily_and_reproducibly(clm_runs, tiny_llama_dir, capsys):
    run = clm_runs / "one"
    args = ["generate", "--adapter", run, "--prompt", "what is ai", "--max-new-tokens", "6"]
    status, first, err = run_cli(capsys, *args)
    assert status == 0 and first.strip() and first.count("\n") == 1  # one answer, one line
    assert err == [f"{tiny_llama_dir} with the adapters of 'default' from {run}"]
    assert run_cli(capsys, *args)[1] == first  # greedy: the same answer again
    # the adapters folder, and the PEFT export (which names its base model), hold the same adapters
    assert run_cli(capsys, *[a if a != run else run / "adapters" for a in args])[1] == first
    assert run_cli(capsys, *[a if a != run else clm_runs / "peft" for a in args])[1] == first
    # the base model alone
    status, base, err = run_cli(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "what is ai",
                                "--max-new-tokens", "6")
    assert status == 0 and base.strip() and err == [f"{tiny_llama_dir} (no adapters)"]
    # sampling, seeded
    sampled = [run_cli(capsys, *args, "--sample", "--temperature", "1.5", "--seed", "3")[1] for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].strip()


def test_generate_several_prompts_and_stdin(clm_runs, capsys, monkeypatch):
    run = clm_runs / "one"
    status, stdout, _ = run_cli(capsys, "generate", "--adapter", run, "--prompt", "what is ai", "--prompt",
                                "who are you", "--max-new-tokens", "4")
    assert status == 0
    blocks = stdout.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["> what is ai", "> who are you"]
    monkeypatch.setattr("sys.stdin", io.StringIO("what is ai\n\nwho are you\n"))
    assert run_cli(capsys, "generate", "--adapter", run, "--prompt", "-", "--max-new-tokens", "4")[1] == stdout
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert "--prompt: nothing to answer" in error_of(capsys, "generate", "--adapter", run, "--prompt", "-")


def test_generate_picks_a_user_of_a_run_with_several(clm_runs, capsys):
    run = clm_runs / "two"
    message = error_of(capsys, "generate", "--adapter", run, "--prompt", "hi")
    assert "holds 2 users' adapters: choose one with --user (films, maths)" in message
    status, stdout, err = run_cli(capsys, "generate", "--adapter", run, "--user", "maths", "--prompt", "what is ai",
                                  "--max-new-tokens", "4")
    assert status == 0 and stdout.strip() and "the adapters of 'maths'" in err[0]
    peft = run_cli(capsys, "generate", "--adapter", clm_runs / "peft-two", "--user", "maths", "--prompt", "what is ai",
                   "--max-new-tokens", "4")
    assert peft[1] == stdout and "the adapters of 'maths'" in peft[2][0]  # PEFT's multi-adapter layout
    assert "holds no user 'cooking'; its users: films, maths" in \
        error_of(capsys, "generate", "--adapter", run, "--user", "cooking", "--prompt", "hi")


def test_generate_refuses_what_it_cannot_answer(clm_runs, sc_run, tmp_path, capsys):
    message = error_of(capsys, "generate", "--adapter", sc_run[0], "--prompt", "a great film")
    assert "a causal LM (task clm), not an sc model: evaluate it with colaft eval RUN_DIR" in message
    assert "does not exist" in error_of(capsys, "generate", "--adapter", tmp_path / "nowhere", "--prompt", "hi")
    (tmp_path / "empty").mkdir()
    assert "is not a run folder, a colaft adapters folder or a PEFT adapter folder" in \
        error_of(capsys, "generate", "--adapter", tmp_path / "empty", "--prompt", "hi")
    assert "--model: name the base model" in error_of(capsys, "generate", "--prompt", "hi")
    assert "--temperature: a number > 0, with --sample" in \
        error_of(capsys, "generate", "--adapter", clm_runs / "one", "--prompt", "hi", "--temperature", "0.5")
    assert "Missing option '--prompt'" in error_of(capsys, "generate", "--adapter", clm_runs / "one")


def test_eval_of_a_clm_run_reproduces_its_rouge(clm_runs, tmp_path, capsys):
    status, stdout, _ = run_cli(capsys, "eval", clm_runs / "two", "--out", tmp_path / "m.json")
    after = json.loads((clm_runs / "two" / "run.json").read_text())["after"]
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert status == 0 and metrics["rougeL"] == after["rougeL"]  # the same greedy answers
    assert metrics["loss"] == pytest.approx(after["loss"], rel=1e-6)
    for user, m in after["users"].items():
        assert metrics["users"][user] == pytest.approx(m, rel=1e-6)
    assert "| user | train rows | held-out rows | loss | perplexity |" in stdout
