"""`colaft predict`: a trained run's answers for new, unlabelled inputs.

    classification (sc, ic)  each row's label, by the data's own label names, and the
                             probability of every label
    causal LM (clm)          each question's generated answer (greedy unless --sample)

A run of several users answers each row with its user's adapters: `--user` names one for
every row, or the data's user column (the run's --user-field) routes each row.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:  # the heavy modules load when a prediction runs, not for `colaft --help`
    import torch
    from torch import nn

    from colaft.app import runs

INPUT = {"sc": "text", "ic": "image", "clm": "question"}
"""The field a task reads its input from."""
TARGET = {"sc": "label", "ic": "label", "clm": "answer"}
"""The field a task learns to give: not needed to predict."""
FORMATS = (".jsonl", ".csv")


def predict(
    run: Annotated[Path, typer.Argument(help="A run folder written by colaft train.")],
    stdin: Annotated[Optional[str], typer.Argument(
        metavar="[-]", help="-: one input text per line of stdin.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(
        help="FILE.jsonl / FILE.csv (or a built-in dataset) read with the run's field options; labels "
             "are not needed.")] = None,
    text: Annotated[Optional[list[str]], typer.Option(
        help="An input text (sc) or question (clm); repeat for several. -: one per line of stdin.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write one row per input to FILE.jsonl or FILE.csv instead of a table on stdout.")] = None,
    user: Annotated[Optional[str], typer.Option(
        help="Whose adapters answer every row (runs with several users; else the data's user column "
             "routes each row).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="(default: twice the run's)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="clm: longest answer, in tokens.")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="clm: sample the answers, or take the "
                                                                    "likeliest token each step.")] = False,
    seed: Annotated[int, typer.Option(help="Seeds the sampling.")] = 0,
) -> None:
    """Predict with a run's saved adapters: label and class probabilities (sc, ic), or the answer (clm)."""
    import torch

    from colaft.app import runs
    from colaft.runtime import set_threads

    if [data is not None, bool(text), stdin is not None].count(True) != 1:
        raise ValueError("give the inputs one way: --data FILE, --text T (repeatable), or - (stdin)")
    if stdin is not None and stdin != "-":
        raise ValueError(f"unexpected argument {stdin!r}: the inputs come from --data, --text or - (stdin)")
    if out is not None and out.suffix not in FORMATS:
        raise ValueError(f"--out {str(out)!r}: a .jsonl or .csv file")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    saved = runs.read_run(run)
    task_name = saved["options"].get("task") or "sc"
    records = _records(saved, task_name, data, text, stdin, user)
    set_threads()
    _, setup, model = runs.reopen(run, sample=records[0])
    users = _users(model, records, user, setup.user_field)
    size = batch_size or 2 * setup.resolved["batch_size"]
    print(f"run {run}: task {task_name}, {setup.resolved['model']}; predicting {len(records)} "
          f"row{'s' if len(records) != 1 else ''}" + (f" ({user!r}'s adapters)" if user else ""), file=sys.stderr)
    if task_name == "clm":
        torch.manual_seed(seed)
        answers = answer(setup, model, records, users, size, max_new_tokens=max_new_tokens, do_sample=sample)
        rows = [{"question": r["question"], **_user_cell(u), "answer": a.strip()}
                for r, u, a in zip(records, users or [None] * len(records), answers)]
    else:
        labels = setup.labels or []
        probabilities = classify(setup, model, records, users, size)  # (N, classes)
        rows = []
        for i, (r, p) in enumerate(zip(records, probabilities.tolist())):
            shown = {"text": r["text"]} if task_name == "sc" else {"row": i}
            rows.append({**shown, **_user_cell(users[i] if users else None),
                         "label": labels[max(range(len(p)), key=p.__getitem__)],
                         "probabilities": {str(label): q for label, q in zip(labels, p)}})
    if out is None:
        print(table(rows), end="")
        return
    write_rows(rows, out)
    print(f"{len(rows)} predictions written to {out}", file=sys.stderr)


# ------------------------------------------------------------------ inputs
def _records(saved: dict, task_name: str, data: str | None, text: list[str] | None, stdin: str | None,
             user: str | None) -> list[dict]:
    """The rows to predict, with the task's input field (and "user" from the run's user column)."""
    from colaft import data as datasets
    from colaft.app import runs

    field = INPUT[task_name]
    if data is None:
        if task_name == "ic":
            raise ValueError("an ic run predicts images: give them with --data FILE")
        lines = [t for t in text or [] if t != "-"]
        if stdin is not None or "-" in (text or []):
            lines += sys.stdin.read().splitlines()
        records = [{field: t} for t in lines if t.strip()]
        if not records:
            raise ValueError("nothing to predict: no input text")
        return records
    options = saved["options"]
    target = TARGET[task_name]
    fields = {f: options[f"{f}_field"] for f in runs.FIELDS
              if options.get(f"{f}_field") and f != target}  # the new data needs no label
    user_field = options.get("user_field") if user is None else None  # --user answers every row
    return [{k: v for k, v in r.items() if k != target}
            for r in datasets.load(data, fields, (field,), user_field)]


def _users(model: nn.Module, records: list[dict], user: str | None, user_field: str | None) -> list[str] | None:
    """Each row's user (None: the model has one user, or one adapter answers every row)."""
    from colaft.model import ColaModel

    if not isinstance(model, ColaModel):  # a baseline, or --mode shared: one adapter answers every row
        if user is not None and not hasattr(model, "cola_model"):
            raise ValueError(f"--user {user!r}: the run trained one model for every row; it has no users")
        return None
    known = model.users
    if user is not None:
        if user not in known:
            raise ValueError(f"--user {user!r}: the run has no such user; its users: {', '.join(known[:10])}")
        return [user] * len(records)
    if len(known) <= 1:
        return None
    if not all("user" in r for r in records):
        raise ValueError(f"the run has {len(known)} users: choose whose adapters answer with --user "
                         f"({', '.join(known[:10])}{' ...' if len(known) > 10 else ''})" +
                         (f" or give their column {user_field!r} in --data" if user_field else ""))
    unknown = sorted({r["user"] for r in records} - set(known))
    if unknown:
        raise ValueError(f"users {', '.join(map(repr, unknown[:5]))} of the data have no adapters in the run; "
                         f"its users: {', '.join(known[:10])}")
    return [r["user"] for r in records]


# ------------------------------------------------------------------ model
def classify(setup: runs.Setup, model: nn.Module, records: list[dict], users: list[str] | None,
             batch_size: int) -> torch.Tensor:
    """Class probabilities of every record, in order (N, classes), routed to `users` (one per row)."""
    import torch

    task, filler = setup.task, (setup.labels or [0])[0]  # encode wants a label: any known one, then dropped
    features = task.encode([{k: v for k, v in r.items() if k != "user"} | {"label": filler} for r in records],
                           setup.resolved["max_length"])
    model.eval()
    out = []
    for start in range(0, len(features), batch_size):
        batch = task.collate(features[start:start + batch_size])
        batch.pop("labels")
        routed = {} if users is None else {"users": users[start:start + batch_size]}
        with torch.no_grad():
            out.append(torch.softmax(model(**batch, **routed).logits.float(), -1))  # (B, classes)
    return torch.cat(out)


def answer(setup: runs.Setup, model: nn.Module, records: list[dict], users: list[str] | None, batch_size: int,
           **options) -> list[str]:
    """Generated answers to the records' questions, in order, each through its user's adapters."""
    job, answers = setup.task, []
    for start in range(0, len(records), batch_size):
        prompts = job.prompt_ids([str(r["question"]) for r in records[start:start + batch_size]])
        answers += job.generate(model, prompts, users=None if users is None else users[start:start + batch_size],
                                **options)
    return answers


# ------------------------------------------------------------------ outputs
def _user_cell(user: str | None) -> dict:
    return {} if user is None else {"user": user}


def flat(row: dict) -> dict:
    """A row as table or CSV cells: each label's probability in a column of its own, "p(label)"."""
    cells = {k: v for k, v in row.items() if k != "probabilities"}
    return cells | {f"p({label})": p for label, p in row.get("probabilities", {}).items()}


def table(rows: list[dict], width: int = 60) -> str:
    """A markdown table of the predictions; long inputs are cut to `width` characters."""
    flats = [flat(r) for r in rows]
    names = list(flats[0])

    def cell(v) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else " ".join(str(v).split())
        return (text[:width - 3] + "...") if len(text) > width else text.replace("|", "\\|")
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(f[n]) for n in names) + " |" for f in flats]
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict], path: Path) -> None:
    """One row per input: JSON objects a line (.jsonl, probabilities as an object) or CSV (a column each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return
    flats = [flat(r) for r in rows]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(flats[0]))
        writer.writeheader()
        writer.writerows(flats)
