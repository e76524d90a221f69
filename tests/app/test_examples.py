"""The example files of examples/data (README "Data formats") each train through `colaft train`,
with the command the README shows, on a tiny model for 2 steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from colaft.app.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
# example -> (its options after --data, the model: a tiny folder fixture or a built-in kind, records)
CASES = {
    "chat.jsonl": (["--task", "clm"], "tiny_llama_dir", 8),
    "prompt.jsonl": (["--task", "clm"], "tiny_llama_dir", 8),
    "reviews.csv": ([], "tiny_bert_dir", 16),
    "reviews.jsonl": ([], "tiny_bert_dir", 16),
    "images": (["--task", "ic"], "cnn", 8),
    "images.csv": (["--task", "ic", "--image-field", "file", "--label-field", "class"], "mlp", 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_example_trains_through_the_command_line(name, request, tmp_path, capsys):
    options, model, n_records = CASES[name]
    model = str(request.getfixturevalue(model)) if model.endswith("_dir") else model
    out = tmp_path / "run"
    assert main(["train", "--data", str(EXAMPLES / name), *options, "--model", model, "--max-steps", "2",
                 "--batch-size", "4", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resolved"]["data"] == str(EXAMPLES / name)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    assert run["after"]["loss"] == pytest.approx(run["after"]["loss"])  # a number, not NaN
    held = round(0.1 * n_records)
    assert f"({n_records - held} train, {held} held out)" in capsys.readouterr().out  # every record read
