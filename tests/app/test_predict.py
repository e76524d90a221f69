"""`colaft predict` on tiny runs, and the label names a run keeps: run.json, the adapters, the PEFT
export and a merged model all name the head's outputs by the data's own labels."""
from __future__ import annotations

import csv
import io
import json

import pytest
from cli_helpers import error_of, run_cli
from tiny_models import BAD, GOOD, QA, review_records, write_jsonl
from transformers import AutoModelForSequenceClassification

from colaft.app import runs
from colaft.app.cli import main
from colaft.model import ColaModel

FIELDS = ["--text-field", "review", "--label-field", "sentiment"]
INT_LABELS = {"neg": 3, "pos": 7}  # integers that are not the head's output indices


@pytest.fixture(scope="module")
def sc_runs(tiny_bert_dir, tmp_path_factory):
    """6-step sc runs: text labels (with a PEFT export), integer labels 3/7, and three users (a column)."""
    folder = tmp_path_factory.mktemp("predict")
    records = review_records(3)
    files = {"text": write_jsonl(folder / "text.jsonl", records),
             "int": write_jsonl(folder / "int.jsonl", [dict(r, sentiment=INT_LABELS[r["sentiment"]])
                                                       for r in records]),
             "users": write_jsonl(folder / "users.jsonl", [dict(r, author=["ann", "bob", "cy"][i % 3])
                                                          for i, r in enumerate(records)])}
    common = ["train", "--model", str(tiny_bert_dir), *FIELDS, "--batch-size", "8", "--lr", "0.01", "--max-steps", "6"]
    assert main([*common, "--data", str(files["text"]), "--out", str(folder / "text"),
                 "--export-peft", str(folder / "peft")]) == 0
    assert main([*common, "--data", str(files["int"]), "--out", str(folder / "int")]) == 0
    assert main([*common, "--data", str(files["users"]), "--user-field", "author", "--out", str(folder / "users")]) == 0
    return folder


def _json(path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- label names
def test_text_labels_are_kept_by_the_run_adapters_export_and_merged_model(sc_runs, tiny_bert_dir, tmp_path):
    run = sc_runs / "text"
    assert _json(run / "run.json")["labels"] == ["neg", "pos"]
    config = _json(run / "adapters" / "colaft_config.json")
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    exported = _json(sc_runs / "peft" / "colaft_labels.json")
    assert exported == {"num_labels": 2, "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}
    # the side file names the outputs of the base model a PEFT adapter goes on
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=exported["num_labels"],
        id2label={int(i): label for i, label in exported["id2label"].items()}, label2id=exported["label2id"])
    assert base.config.id2label == {0: "neg", 1: "pos"}
    assert ColaModel.from_peft(base, sc_runs / "peft").labels == {"default": ["neg", "pos"]}
    # reopened from the folder: the adapters name their outputs, and so does a merged model's config.json
    _, setup, cola_model = runs.reopen(run)
    assert setup.labels == ["neg", "pos"] and cola_model.labels == {"default": ["neg", "pos"]}
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert ColaModel.from_pretrained(fresh, run / "adapters").labels == {"default": ["neg", "pos"]}
    cola_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert _json(tmp_path / "merged" / "config.json")["id2label"] == {"0": "neg", "1": "pos"}
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").config.label2id == \
        {"neg": 0, "pos": 1}


def test_integer_labels_stay_integers(sc_runs, capsys, tmp_path):
    run = sc_runs / "int"
    assert _json(run / "run.json")["labels"] == [3, 7]
    assert _json(run / "adapters" / "colaft_config.json")["id2label"] == {"0": 3, "1": 7}  # JSON keys are text
    assert runs.reopen(run)[2].labels == {"default": [3, 7]}
    assert main(["predict", str(run), "--text", GOOD[0], "--out", str(tmp_path / "p.jsonl")]) == 0
    row = _json(tmp_path / "p.jsonl")
    assert row["label"] in (3, 7) and row["probabilities"].keys() == {"3", "7"}


# ---------------------------------------------------------------- predict
def test_predict_prints_label_names_and_probabilities(sc_runs, capsys):
    status, stdout, err = run_cli(capsys, "predict", sc_runs / "text", "--text", GOOD[0], "--text", BAD[0])
    assert status == 0 and "predicting 2 rows" in err[0]
    lines = stdout.splitlines()
    assert lines[0] == "| text | label | p(neg) | p(pos) |" and len(lines) == 4
    for line, text in zip(lines[2:], (GOOD[0], BAD[0])):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == text and cells[1] in ("neg", "pos")
        assert float(cells[2]) + float(cells[3]) == pytest.approx(1, abs=2e-4)
        assert cells[1] == ("neg" if float(cells[2]) >= float(cells[3]) else "pos")


def test_predict_writes_jsonl_and_csv_that_read_back(sc_runs, tmp_path, capsys, monkeypatch):
    texts = GOOD[:3] + BAD[:3]
    data = write_jsonl(tmp_path / "new.jsonl", [{"review": t} for t in texts])  # no labels
    assert main(["predict", str(sc_runs / "text"), "--data", str(data), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert r["label"] in ("neg", "pos") and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert main(["predict", str(sc_runs / "text"), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    with (tmp_path / "p.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["text"] for r in table] == texts and [r["label"] for r in table] == [r["label"] for r in rows]
    for got, want in zip(table, rows):
        assert float(got["p(pos)"]) == pytest.approx(want["probabilities"]["pos"], rel=1e-6)
    # - reads one text a line from stdin; blank lines are skipped
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts[:2]) + "\n\n"))
    assert main(["predict", str(sc_runs / "text"), "-", "--out", str(tmp_path / "stdin.jsonl")]) == 0
    assert [json.loads(line) for line in (tmp_path / "stdin.jsonl").read_text().splitlines()] == rows[:2]


def test_predict_routes_rows_to_their_users(sc_runs, tmp_path, capsys):
    run = sc_runs / "users"
    data = write_jsonl(tmp_path / "new.jsonl", [{"review": t, "author": a} for t in GOOD[:2] + BAD[:2]
                                                for a in ("ann", "bob", "cy")])
    assert main(["predict", str(run), "--data", str(data), "--out", str(tmp_path / "all.jsonl")]) == 0
    routed = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [r["user"] for r in routed] == ["ann", "bob", "cy"] * 4
    for user in ("ann", "bob", "cy"):  # each row answered as by its user's adapters alone
        assert main(["predict", str(run), "--data", str(data), "--user", user,
                     "--out", str(tmp_path / f"{user}.jsonl")]) == 0
        alone = [json.loads(line) for line in (tmp_path / f"{user}.jsonl").read_text().splitlines()]
        assert {r["user"] for r in alone} == {user}
        for got, want in zip([r for r in routed if r["user"] == user], alone[["ann", "bob", "cy"].index(user)::3]):
            assert got["probabilities"] == pytest.approx(want["probabilities"], rel=1e-5)
    assert any(a["probabilities"] != b["probabilities"] for a, b in zip(routed[::3], routed[1::3]))  # users differ
    capsys.readouterr()
    assert "the run has 3 users: choose whose adapters answer with --user (ann, bob, cy) or give their column " \
           "'author'" in error_of(capsys, "predict", run, "--text", GOOD[0])
    assert "--user 'dan': the run has no such user" in error_of(capsys, "predict", run, "--text", "x", "--user", "dan")


def test_predict_refuses_what_it_cannot_do(sc_runs, tmp_path, capsys):
    run = sc_runs / "text"
    assert "give the inputs one way" in error_of(capsys, "predict", run)
    assert "give the inputs one way" in error_of(capsys, "predict", run, "--text", "a", "-")
    assert "--out" in error_of(capsys, "predict", run, "--text", "a", "--out", tmp_path / "p.txt")
    assert "does not exist" in error_of(capsys, "predict", tmp_path / "nowhere", "--text", "a")


def test_eval_points_unlabelled_data_to_predict(sc_runs, tmp_path, capsys):
    run = sc_runs / "text"
    data = write_jsonl(tmp_path / "new.jsonl", [{"review": t} for t in GOOD])
    message = error_of(capsys, "eval", run, "--data", data)
    assert f"has no labels (column 'sentiment') to score the run against: to label it, run colaft predict {run} " \
           f"--data {data}" in message


def test_eval_reports_each_label_by_name(sc_runs, tmp_path, capsys):
    status, stdout, _ = run_cli(capsys, "eval", sc_runs / "int", "--out", tmp_path / "m.json")
    assert status == 0 and "| label | rows | predicted | precision | recall | f1 |" in stdout
    per_label = _json(tmp_path / "m.json")["per_label"]
    assert per_label.keys() == {"3", "7"}
    assert sum(f["rows"] for f in per_label.values()) == sum(f["predicted"] for f in per_label.values()) == 5


# ---------------------------------------------------------------- clm
def test_predict_answers_questions_of_a_clm_run(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in QA * 2])
    run = tmp_path / "clm"
    assert main(["train", "--task", "clm", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4",
                 "--lr", "0.01", "--max-steps", "2", "--out", str(run)]) == 0
    assert _json(run / "run.json")["labels"] is None
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": q} for q, _ in QA[:3]])
    assert main(["predict", str(run), "--data", str(questions), "--max-new-tokens", "5",
                 "--out", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [q for q, _ in QA[:3]] and all(r["answer"] for r in rows)
    # the answers colaft generate gives, greedily
    capsys.readouterr()
    for r in rows:
        status, stdout, _ = run_cli(capsys, "generate", "--adapter", run, "--prompt", r["question"],
                                    "--max-new-tokens", "5")
        assert status == 0 and stdout.strip() == r["answer"]


# ---------------------------------------------------------------- ic
def test_predict_labels_images_of_an_ic_run(tmp_path, capsys):
    from colaft import data

    run = tmp_path / "digits"
    assert main(["train", "--task", "ic", "--max-steps", "3", "--out", str(run)]) == 0
    assert _json(run / "run.json")["labels"] == list(range(10))
    images = [{"image": r["image"].tolist()} for r in data.load("digits")[:4]]
    new = write_jsonl(tmp_path / "images.jsonl", images)
    assert main(["predict", str(run), "--data", str(new), "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2, 3] and all(r["label"] in range(10) for r in rows)
    assert all(r["probabilities"].keys() == {str(d) for d in range(10)} for r in rows)
    capsys.readouterr()
    assert "an ic run predicts images: give them with --data FILE" in error_of(capsys, "predict", run, "--text", "7")
