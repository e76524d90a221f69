"""`colaft eval` and `colaft generate`: use a trained run."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from colaft.app import runs


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by colaft train.")],
    data: Annotated[Optional[str], typer.Option(
        help="Evaluate on all of this dataset or FILE.jsonl / FILE.csv (read with the run's field and user "
             "options) instead of the run's held-out split.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="(default: twice the run's, as its evaluation)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the metrics to this JSON file.")] = None,
) -> None:
    """Evaluate a run's saved adapters: on its held-out split (its "after" metrics) or on --data."""
    # torch and the models: imported when the command runs, so that --help is quick
    from colaft.app import loop, runs
    from colaft.runtime import set_threads

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {batch_size}")
    set_threads()
    saved, setup, cola_model = runs.reopen(run)  # the run's task, records, split and base model
    records = setup.held_out if data is None else _labelled(run, setup, data)
    batches = runs.eval_batches(setup, records, batch_size)
    rows = sum(len(b["labels"]) for b in batches)
    where = "held-out" if data is None else data
    print(f"run {run}: task {setup.task_name}, {setup.resolved['model']} on {setup.resolved['data']}; "
          f"evaluating on {where} ({loop.plural(rows, 'row')})" +
          (f"; {loop.plural(len(setup.names), 'user')}, {saved['options'].get('mode')} mode" if setup.multi else ""))
    metrics = setup.task.evaluate(cola_model, batches)
    print(f"{where}: {loop.describe(metrics)}")
    if "users" in metrics:
        trained = Counter(r["user"] for r in setup.train)
        evaluated = Counter(u for b in batches for u in b["users"])
        table = loop.users_table(None, metrics, {u: (trained[u], evaluated[u]) for u in sorted(trained | evaluated)},
                                 counts=("train rows", "held-out rows" if data is None else "rows"))
        print(table, end="")
    per_label = None
    if setup.labels is not None:  # classification: each label's figures, by the data's label names
        per_label = _per_label(setup, cola_model, records, batch_size or 2 * setup.resolved["batch_size"])
        print(_label_table(per_label), end="")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run": str(run), "data": where, "rows": rows,
                                   "batch_size": batch_size or 2 * setup.resolved["batch_size"],
                                   "metrics": metrics, **({"per_label": per_label} if per_label else {})},
                                  indent=2) + "\n")
        print(f"metrics written to {out}")


def _labelled(run: Path, setup: runs.Setup, data: str) -> list[dict]:
    """The records of `data`; data without the run's labels (or answers) is pointed to colaft predict."""
    from colaft import data as datasets
    from colaft.app import predict, runs

    try:
        return runs.read_records(setup, data)
    except ValueError as error:
        target = predict.TARGET[setup.task_name]
        try:  # readable once the target is left out: unlabelled data
            datasets.load(data, {f: c for f, c in setup.fields.items() if f != target},
                          (predict.INPUT[setup.task_name],), setup.user_field)
        except ValueError:
            raise error from None
        column = setup.fields.get(target, target)
        raise ValueError(f"{data} has no {target}s (column {column!r}) to score the run against: to "
                         f"{'label' if target == 'label' else 'answer'} it, run colaft predict {run} --data {data}"
                         ) from None


def _per_label(setup: runs.Setup, model, records: list[dict], batch_size: int) -> dict[str, dict]:
    """Label name -> rows, predicted rows, precision, recall and F1 of that label."""
    from sklearn.metrics import precision_recall_fscore_support

    from colaft.app import predict
    from colaft.model import ColaModel

    cola = model if isinstance(model, ColaModel) else None
    users = [r["user"] for r in records] if cola is not None and len(cola.users) > 1 else None
    predicted = predict.classify(setup, model, records, users, batch_size).argmax(-1).tolist()
    index = {label: i for i, label in enumerate(setup.labels)}
    truth = [index[r["label"]] for r in records]
    ids = list(range(len(setup.labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=ids, zero_division=0)
    return {str(label): {"rows": int(support[i]), "predicted": predicted.count(i), "precision": float(precision[i]),
                         "recall": float(recall[i]), "f1": float(f1[i])} for i, label in enumerate(setup.labels)}


def _label_table(per_label: dict[str, dict]) -> str:
    lines = ["| label | rows | predicted | precision | recall | f1 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {f['rows']} | {f['predicted']} | {f['precision']:.4f} | {f['recall']:.4f} | {f['f1']:.4f} |"
              for name, f in per_label.items()]
    return "\n".join(lines) + "\n"


def generate(
    prompt: Annotated[list[str], typer.Option(
        help="A prompt; repeat for several, answered in one batch. -: one prompt per line of stdin.")],
    adapter: Annotated[Optional[Path], typer.Option(
        help="A run folder of colaft train, its adapters/ folder, or a PEFT adapter folder (--export-peft). "
             "(default: none, the base model answers)")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model: smollm2-135m | a model folder. (default: the run's)")] = None,
    user: Annotated[Optional[str], typer.Option(help="Whose adapters answer (runs with several users).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample the answer, or take the likeliest "
                                                                    "token each step.")] = False,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (with --sample).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the sampling.")] = 0,
) -> None:
    """Answer prompts with a causal LM and a run's adapters, formatted with the model's chat template."""
    import torch

    from colaft.app import runs
    from colaft.runtime import set_threads
    from colaft.serve.commands import model_task
    from colaft.tasks import get_task

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, not {max_new_tokens}")
    if temperature is not None and (not sample or temperature <= 0):
        raise ValueError("--temperature: a number > 0, with --sample")
    found = runs.find_adapters(adapter) if adapter is not None else None
    if found is None and user is not None:
        raise ValueError("--user picks whose adapters answer: give --adapter too")
    model = model or (found and found.model)
    if not model:
        raise ValueError("--model: name the base model (" +
                         (f"{str(adapter)!r} does not name one)" if found else "or give --adapter RUN_DIR)"))
    task = (found.task if found and found.task else None) or ("ic" if model in ("cnn", "mlp") else model_task(model))
    if task != "clm":
        raise ValueError(f"generate answers prompts with a causal LM (task clm), not an {task} model: "
                         "evaluate it with colaft eval RUN_DIR, or label new data with colaft predict RUN_DIR")
    chosen = found.pick(user) if found else None
    questions = [line for p in prompt for line in (sys.stdin.read().splitlines() if p == "-" else [p]) if line.strip()]
    if not questions:
        raise ValueError("--prompt: nothing to answer")
    set_threads()
    job = get_task("clm")
    base = job.load(model, [], seed)
    answerer = found.attach(base, chosen) if found else base
    torch.manual_seed(seed)
    answers = job.generate(answerer, job.prompt_ids(questions), users=[chosen] * len(questions) if found else None,
                           max_new_tokens=max_new_tokens, do_sample=sample,
                           **({"temperature": temperature} if temperature is not None else {}))
    print(f"{model}" + (f" with the adapters of {chosen!r} from {adapter}" if found else " (no adapters)"),
          file=sys.stderr)
    if len(questions) == 1:
        print(answers[0].strip())
    else:  # each answer under its prompt
        print("\n\n".join(f"> {q}\n{a.strip()}" for q, a in zip(questions, answers)))


