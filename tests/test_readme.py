"""README.md cannot drift from the code: its Python blocks run, and its `colaft` command lines parse.

A Python block runs as written, in a fresh namespace in a temporary folder, after the setup
that SETUP names for it (by its first line): what the text around it says it continues from.
A block that needs a running service is in NEEDS_SERVICE (the service's own tests cover it).
A new block with neither runs as it stands.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError

from colaft.app.cli import build_app, main
from colaft.app.options import TrainOptions

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [(m[1], m[2], README.read_text()[:m.start()].count("\n") + 1)
          for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M)]
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]

QUICKSTART = "import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer"
_BASE = """
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from colaft import ColaConfig, ColaModel, Trainer
from colaft.assets import resolve_model
path = resolve_model("minilm-l6")
tok, base = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
"""
SETUP = {  # first line of a block -> the names it uses from the text before it
    "from colaft import ColaConfig, ColaModel, Trainer": _BASE + """
texts = ["a gem of a film", "a tedious mess", "moving", "dull"]
batch = dict(tok(texts, padding=True, return_tensors="pt"), labels=torch.tensor([1, 0, 1, 0]))
inputs = tok(texts[:2], padding=True, return_tensors="pt")
""",
    "trainer = Trainer(model, lr=1e-3, backend=\"process\", backend_options={\"workers\": 2}, staleness=1)": _BASE + """
model = ColaModel(base, ColaConfig(target_modules=["query", "value"]))
batch = dict(tok(["a gem of a film", "a tedious mess"], padding=True, return_tensors="pt"), labels=torch.tensor([1, 0]))
""",
}
NEEDS_SERVICE = ("import json, time\nfrom openai import OpenAI", "job = client.fine_tuning.jobs.create(")


def test_readme_has_the_blocks_this_test_knows():
    firsts = [code.splitlines()[0] for code, _ in PYTHON]
    assert QUICKSTART.splitlines()[0] in firsts
    assert all(any(first.startswith(k.splitlines()[0]) for first in firsts) for k in (*SETUP, *NEEDS_SERVICE))


@pytest.mark.slow
@pytest.mark.parametrize("code, line", PYTHON, ids=[f"line{line}" for _, line in PYTHON])
def test_python_block_runs(code, line, tmp_path, monkeypatch):
    if code.startswith(NEEDS_SERVICE):
        pytest.skip("talks to a running `colaft serve` (tests/serve covers the same calls)")
    monkeypatch.chdir(tmp_path)  # blocks write run/, chat.jsonl...
    namespace: dict = {}
    setup = next((s for first, s in SETUP.items() if code.startswith(first)), "")
    exec(compile(setup, "setup", "exec"), namespace)
    exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)


# ---------------------------------------------------------------- command lines
def _command_lines() -> list[tuple[str, int]]:
    """Every `colaft ...` line of the README's shell blocks, continuation lines joined."""
    found = []
    for lang, code, line in BLOCKS:
        if lang == "python":
            continue
        prompted = any(t.startswith("$ ") for t in code.splitlines())  # a session: the rest is output
        for i, text in enumerate(code.splitlines()):
            if prompted and not text.startswith("$ "):
                continue
            text = text.split("   #")[0].split("  #")[0].strip()
            if found and found[-1][1] == line + i and text.startswith("["):  # a synopsis going on
                found[-1] = (found[-1][0] + " " + text, line + i + 1)
                continue
            if m := re.search(r"(?:^|\$ |\| |bin/)colaft (.*)", text):
                found.append(("colaft " + m[1], line + i + 1))
    return found


COMMAND_LINES = _command_lines()
CHOICES = {"task", "adapter", "optimizer", "scheduler", "mode", "backend", "method", "transfer_dtype"}


def _commands() -> dict[str, dict]:
    """`colaft` command name (and bench's, as "bench server") -> its click command."""
    group = typer.main.get_command(build_app())
    found = {}
    for name, command in group.commands.items():
        found[name] = command
        for sub, inner in getattr(command, "commands", {}).items():
            found[f"{name} {sub}"] = inner
    return found


def test_the_readme_shows_commands():
    assert len(COMMAND_LINES) > 20 and any(c.startswith("colaft train [--task") for c, _ in COMMAND_LINES)


@pytest.mark.parametrize("command, line", COMMAND_LINES, ids=[f"line{line}" for _, line in COMMAND_LINES])
def test_command_line_parses(command, line, capsys):
    commands = _commands()
    command = command.replace("[", " ").replace("]", " ")  # a synopsis' optional parts
    words = command.split()[1:]
    name = " ".join(words[:2]) if " ".join(words[:2]) in commands else words[0]
    assert name in commands, f"README.md line {line}: no command `colaft {name}`"
    assert main([*name.split(), "--help"]) == 0
    capsys.readouterr()
    click = commands[name]
    flags = {o for p in click.params for o in (*p.opts, *p.secondary_opts)}
    shown = [w.split("=")[0] for part in shlex.split(command.replace("|--", " --").replace("/--", " --"), posix=False)
             for w in [part] if w.startswith("--")]
    assert not (unknown := [f for f in shown if f not in flags]), f"README.md line {line}: {unknown} not options"
    if name == "train":  # the choices shown (`--adapter lowrank|linear|mlp`) are valid ones
        for flag, values in re.findall(r"--([a-z-]+) ([a-z0-9|_-]+)", command):
            field = flag.replace("-", "_")
            if field in CHOICES:
                for value in values.split("|"):
                    try:
                        TrainOptions(**{field: value})
                    except ValidationError as e:  # only this field's own check counts (not e.g. shared's users)
                        assert not [x for x in e.errors() if x["loc"] == (field,)], f"README.md line {line}: {e}"
