"""The `colaft` command: every error is one line on stderr with a non-zero status, and leaves nothing behind."""
from __future__ import annotations

import subprocess
import sys

import pytest

from colaft.app.cli import main

BAD_INPUT = [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--task", "qa"], "unknown task 'qa'"),
    (["--data", "no-such-set"], "unknown dataset 'no-such-set'"),
    (["--data", "missing.csv"], "does not exist"),
    (["--text-field", "body"], "field 'body' (for text) is not in"),
    (["--data", "EMPTY"], "has no records"),
    (["--targets", "nothing_here"], "--targets: target 'nothing_here' matches no module"),
    (["--targets", "q,v"], "--targets: target 'q' matches no module (nor 'v'); closest: query, value"),
    (["--rank", "0"], "--rank: Input should be greater than 0"),
    (["--targets", ","], "--targets: target_modules is empty"),
    (["--merge", "--dropout", "0.1"], "--merge needs --dropout 0"),
    (["--adapter", "huge"], "--adapter: unknown adapter 'huge'; use one of "),
    (["--adapter", "lowrnak"], "--adapter: unknown adapter 'lowrnak'; closest: lowrank; use one of "),
    (["--optimizer", "lion"], "--optimizer: unknown optimizer 'lion'; use one of adamw, adam, sgd"),
    (["--scheduler", "wiggly"], "--scheduler: unknown scheduler 'wiggly'; use one of linear, cosine"),
    (["--scheduler", "cosin"], "--scheduler: unknown scheduler 'cosin'; closest: cosine"),
    (["--max-steps", "0"], "--max-steps: Input should be greater than 0"),
    (["--batch-size", "0"], "--batch-size: Input should be greater than 0"),
    (["--epochs", "0"], "--epochs: Input should be greater than 0"),
    (["--warmup", "1.5"], "--warmup: Input should be less than 1"),
    (["--lr", "-1"], "--lr: Input should be greater than 0"),
    (["--task", "cs"], "--task: unknown task 'cs'; closest: sc"),
    (["--backend", "procss"], "--backend: unknown backend 'procss'; closest: process"),
    (["--rnak", "3"], "No such option: --rnak"),
    (["--user-field", "who"], "field 'who' (for user) is not in"),
    (["--users", "2", "--user-field", "sentiment"], "--user-field and --users both make users: give one"),
    (["--users", "0"], "cannot deal 48 records out to 0 users"),
    (["--users", "30"], "users 'user19', 'user20', 'user21', 'user22', 'user23' and 7 more have a single record"),
    (["--users", "2", "--mode", "team"], "--mode: unknown mode 'team'; use one of personal, collaborative, shared"),
]



@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_INPUT)])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_args, tmp_path, capsys, extra, message):
    (tmp_path / "EMPTY.jsonl").write_text("")
    extra = [str(tmp_path / (a + ".jsonl")) if a == "EMPTY" else a for a in extra]
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "runs" / "bad"
    status = main([*tiny_args, *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert len(err) == 1 and err[0].startswith("colaft: error: ") and message in err[0]
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no temporary, no runs/ parent



@pytest.mark.slow
def test_console_script_exit_status(tmp_path):
    # A fresh interpreter: imports torch and transformers, ~5 s on an idle machine.
    result = subprocess.run([sys.executable, "-m", "colaft.app.cli", "train", "--data", str(tmp_path / "x.csv"),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"colaft: error: data file '{tmp_path / 'x.csv'}' does not exist"
    assert not (tmp_path / "run").exists()


def test_help_names_are_the_registries():
    """--help's lists of names are constants (no torch); they must stay the registries' names."""
    from colaft.adapters import ADAPTERS
    from colaft.app import options
    from colaft.app.baselines import METHODS
    from colaft.backends import BACKENDS
    from colaft.tasks import TASKS
    assert options.TASK_NAMES == tuple(TASKS) and options.ADAPTER_NAMES == tuple(ADAPTERS)
    assert options.BACKEND_NAMES == tuple(BACKENDS) and options.METHOD_NAMES == tuple(METHODS)


HEAVY = ("torch", "transformers", "matplotlib", "pandas", "peft", "ray", "fastapi", "httpx", "sqlalchemy", "numpy")


def test_help_imports_no_heavy_library():
    """`colaft --help` needs the commands' signatures only (its speed: `colaft bench startup`)."""
    code = ("import os, sys; from colaft.app.cli import main; main(['--help']); main(['train', '--help']); "
            f"print([m for m in {HEAVY!r} if m in sys.modules], os.environ.get('HF_HUB_OFFLINE'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] 1"  # and the hub stays offline for later imports


def test_broken_jsonl_is_one_line(tiny_args, tmp_path, capsys):
    """The data reader's message (where the file breaks) reaches the user as one line."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"review": "good", "sentiment": "pos"}\n{"review": "bad", sentiment: neg}\n')
    args = [str(broken) if a.endswith("reviews.jsonl") else a for a in tiny_args]
    assert main([*args, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"colaft: error: {broken}") and not (tmp_path / "run").exists()
