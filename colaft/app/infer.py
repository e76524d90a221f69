"""`colaft eval` and `colaft generate`: use a trained run."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer


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
    records = setup.held_out if data is None else runs.read_records(setup, data)
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
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"run": str(run), "data": where, "rows": rows,
                                   "batch_size": batch_size or 2 * setup.resolved["batch_size"],
                                   "metrics": metrics}, indent=2) + "\n")
        print(f"metrics written to {out}")


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
                         "evaluate it with colaft eval RUN_DIR")
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


