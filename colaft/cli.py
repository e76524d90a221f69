"""The `colaft` command: plain typed functions, registered in one table (COMMANDS).

`colaft train` with no arguments is the main job: ColA low-rank fine-tuning of MiniLM-L6 on
Rotten Tomatoes, printing held-out accuracy before and after.
"""
from __future__ import annotations

import os

# Our models and data are installed locally; never reach for the Hugging Face hub. Set
# before transformers is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import psutil
import torch
import typer
from pydantic import ValidationError

from colaft import ColaConfig, ColaModel, Trainer, baselines
from colaft import loop, runs
from colaft.model import DEFAULT_USER
from colaft.tasks import TASKS, get_task

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def parse_targets(spec: str) -> list[str] | str:
    """--targets: "all-linear", a regex (has regex syntax), or comma-separated module names."""
    if spec == "all-linear" or _REGEX_CHARS.search(spec):
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def train(
    model: Annotated[Optional[str], typer.Option(
        help="minilm-l6 | smollm2-135m | a model folder; for ic: cnn | mlp. (default: the task's)")] = None,
    task: Annotated[str, typer.Option(help=f"{' | '.join(TASKS)}")] = "sc",
    data: Annotated[Optional[str], typer.Option(
        help="rotten-tomatoes | chatterbot | digits | fashion-mnist | FILE.jsonl | FILE.csv. "
             "(default: the task's)")] = None,
    text_field: Annotated[Optional[str], typer.Option(help="Column holding the text (sc).")] = None,
    label_field: Annotated[Optional[str], typer.Option(help="Column holding the label (sc, ic).")] = None,
    image_field: Annotated[Optional[str], typer.Option(help="Column holding the image (ic).")] = None,
    question_field: Annotated[Optional[str], typer.Option(help="Column holding the question (clm).")] = None,
    answer_field: Annotated[Optional[str], typer.Option(help="Column holding the answer (clm).")] = None,
    user_field: Annotated[Optional[str], typer.Option(
        help="Column naming each record's user (chatterbot: topic): one adapter set per user.")] = None,
    users: Annotated[Optional[int], typer.Option(help="Deal the records out to this many users (by --seed).")] = None,
    mode: Annotated[str, typer.Option(
        help="personal | collaborative (rows see the users' mean delta) | shared (one adapter trained on "
             "every user's rows, metrics still per user: the baseline of collaboration)")] = "personal",
    user_weights: Annotated[str, typer.Option(
        help="collaborative mode: each user's delta counts equally (equal), or by its training rows (rows).")
    ] = "equal",
    method: Annotated[str, typer.Option(
        help="cola, or a backprop baseline: full | lora | adalora | ia3 | prompt | prefix | ptuning "
             "(PEFT's; they use --rank, --alpha, --dropout, --hidden).")] = "cola",
    targets: Annotated[Optional[str], typer.Option(
        help="Adapter sites: comma-separated module names, a regex, or all-linear. (default: the task's)")] = None,
    adapter: Annotated[str, typer.Option(help="lowrank | linear | mlp")] = "lowrank",
    rank: Annotated[int, typer.Option(help="Rank of lowrank adapters.")] = 8,
    alpha: Annotated[float, typer.Option(help="lowrank scale is alpha / rank.")] = 16.0,
    dropout: Annotated[float, typer.Option(help="Dropout on the adapters' input.")] = 0.0,
    bias: Annotated[bool, typer.Option(help="Adapters also learn a bias delta (linear: then ColA trains what "
                                            "full training does).")] = False,
    hidden: Annotated[int, typer.Option(help="Hidden width of mlp adapters.")] = 128,
    merge: Annotated[bool, typer.Option(help="Run the server on W + delta_W (mergeable adapters).")] = False,
    optimizer: Annotated[str, typer.Option(help="adamw | adam | sgd")] = "adamw",
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. (default: the task's)")] = None,
    weight_decay: Annotated[float, typer.Option()] = 0.0,
    scheduler: Annotated[str, typer.Option(help="linear | constant | cosine")] = "linear",
    warmup: Annotated[float, typer.Option(help="Warm-up share of the steps.")] = 0.05,
    batch_size: Annotated[Optional[int], typer.Option(help="(default: the task's)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Full passes over the data. (default: the task's)")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Train exactly this many steps, overriding --epochs. (default: the task's)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token cap per example. (default: the task's)")] = None,
    interval: Annotated[int, typer.Option(help="Server steps per fit (ColA's I).")] = 1,
    fit_steps: Annotated[int, typer.Option(help="Optimizer steps per fit (1 = exactly backprop).")] = 1,
    seed: Annotated[int, typer.Option(help="Seeds the split, the initialisation and the data order.")] = 0,
    init_adapter: Annotated[Optional[Path], typer.Option(
        help="Start from this PEFT adapter folder (its config replaces the adapter options).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder. (default: runs/<timestamp>)")] = None,
    export_peft: Annotated[Optional[Path], typer.Option(help="Also export the adapters as a PEFT folder here.")] = None,
    eval_every: Annotated[int, typer.Option(help="Evaluate every so many steps (0: before and after only).")] = 0,
    backend: Annotated[str, typer.Option(help="Where the fits run: inline | process | ray.")] = "inline",
    workers: Annotated[Optional[int], typer.Option(
        help="Worker processes or Ray actors. (default: the idle cores less the server's threads)")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="HOST:PORT of a running Ray cluster (default: a private Ray instance on this machine).")] = None,
    staleness: Annotated[int, typer.Option(
        help="Server steps a fit may lag behind (0: synchronous, exactly backprop).")] = 0,
    transfer_dtype: Annotated[str, typer.Option(help="Precision of the packets sent: float32 | bfloat16.")] = "float32",
    save_adapters: Annotated[bool, typer.Option(help="Write the trained adapters (or weights) to the run.")] = True,
) -> None:
    """Fine-tune a frozen model with ColA and report held-out metrics before and after."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    for folder in (out, export_peft):
        if folder is not None and folder.exists():
            raise ValueError(f"{str(folder)!r} already exists; choose another folder")
    setup = runs.plan(options)  # the task's recipe fills every option left out
    _check_method(method, task, setup.multi, backend, staleness, interval, fit_steps, merge, init_adapter,
                  export_peft)
    if mode not in ("personal", "collaborative", "shared"):
        raise ValueError(f"--mode {mode!r}: use one of personal, collaborative, shared")
    if mode == "shared" and not setup.multi:
        raise ValueError("--mode shared needs users (--user-field or --users) to report on")
    if user_weights not in ("equal", "rows") or (user_weights == "rows" and mode != "collaborative"):
        raise ValueError(f"--user-weights {user_weights!r}: equal, or rows with --mode collaborative")
    backend_options = _backend_options(backend, workers, ray_address, staleness, transfer_dtype)
    _set_threads()
    if backend == "process" or (backend == "ray" and ray_address is None):  # local workers: leave them cores
        torch.set_num_threads(max(1, torch.get_num_threads() - (workers or 1)))
    torch.manual_seed(seed)

    # Everything that can reject the input runs before anything is written.
    job, resolved, multi = setup.task, setup.resolved, setup.multi
    recipe = job.recipe
    config = ColaConfig(target_modules=parse_targets(targets) if targets else recipe.targets, adapter=adapter,
                        rank=rank, alpha=alpha, dropout=dropout, hidden=hidden, merge=merge, bias=bias)
    runs.load(setup)  # records, users, the held-out split, the base model
    names, train_records, held_out = setup.names, setup.train, setup.held_out
    shared, evaluated = mode == "shared", None  # shared: one adapter; the users only group the metrics
    if shared:
        names, multi, mode = [], False, "personal"
    first = names[0] if names else DEFAULT_USER
    batches, eval_batches = runs.train_batches(setup), runs.eval_batches(setup)
    if shared:  # training batches without users: every row trains the one adapter
        collate = batches.collate_fn
        batches.collate_fn = lambda features: {k: v for k, v in collate(features).items() if k != "users"}
    if max_steps is None and epochs is None:
        max_steps, epochs = recipe.max_steps, recipe.epochs
    resolved["steps"] = steps = loop.plan_steps(len(batches), epochs or 1, max_steps)
    # A user's schedule runs over the steps that hold its rows: its owner fits on those only.
    counted = loop.user_steps(batches, steps) if multi else {first: steps}
    user_steps = {u: max(1, counted.get(u, 0)) for u in names or [first]}  # 0: no training row survived encoding
    fit = dict(optimizer=optimizer, lr=resolved["lr"], weight_decay=weight_decay, scheduler=scheduler,
               warmup_ratio=warmup, total_steps=user_steps[first])
    if method != "cola":
        cola_model = baselines.build(method, setup.base, task, config.target_modules, rank, alpha, dropout, steps,
                                     hidden)
        trainer = baselines.BackpropTrainer(cola_model, **fit)
    else:
        cola_model = ColaModel.from_peft(setup.base, init_adapter, user=first) if init_adapter else \
            ColaModel(setup.base, config, user=first)
        trainer = Trainer(cola_model, **fit, interval=interval, fit_steps=fit_steps, backend=backend,
                          backend_options=backend_options, staleness=staleness,
                          transfer_dtype=_TRANSFER_DTYPES[transfer_dtype])
        for user in names[1:]:  # the same adapter config and fit settings as the first user
            if init_adapter:  # every user starts from the PEFT adapter
                cola_model.load_peft(init_adapter, user=user)
            trainer.add_user(user, total_steps=user_steps[user])
        weights = None
        if user_weights == "rows":  # a user with more data weighs more in the mean delta every row sees
            rows = Counter(f["user"] for f in batches.dataset)
            weights = {u: float(rows[u]) for u in names}
        cola_model.set_mode(mode, weights)
    if shared:
        evaluated = loop.OneAdapter(cola_model)
    if multi:
        resolved["user_steps"] = user_steps
    print(f"task {task}: {resolved['model']} on {resolved['data']} ({len(train_records)} train, "
          f"{len(held_out)} held out); " + (f"{_plural(len(names), 'user')}, {mode} mode; " if multi else "")
          + (f"{len(cola_model.sites)} sites, {cola_model.adapter_parameters():,} adapter parameters; "
             if method == "cola" else f"{method} by backprop, {cola_model.trainable_parameters():,} trainable "
                                      "parameters; ") + f"{steps} steps, "
          f"{_plural(torch.get_num_threads(), 'CPU thread')}")

    def write(run: Path) -> None:
        result = loop.train(trainer, evaluated or cola_model, job, batches, eval_batches, steps, run, eval_every)
        if save_adapters:
            cola_model.save_pretrained(run / "adapters")  # several users: a subfolder each
        cola_config = cola_model.config.to_dict() if method == "cola" else None
        (run / "run.json").write_text(json.dumps(
            {"options": options, "resolved": resolved, "cola_config": cola_config,
             "trainable_parameters": trainer_parameters(cola_model), **result}, indent=2))
        print(f"held-out before: {loop.describe(result['before'])}")
        print(f"held-out after:  {loop.describe(result['after'])}")
        print(f"trained {steps} steps in {result['train_seconds']:.0f} s")

    built = [(out, write)] + ([(export_peft, cola_model.export_peft)] if export_peft else [])
    try:
        _build_atomically(built)
    except BaseException:
        trainer.close(wait=False)  # stop the workers at once
        raise
    trainer.close()
    print(f"run saved to {out}" + (f"; PEFT adapters in {export_peft}" if export_peft else ""))


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by colaft train.")],
    data: Annotated[Optional[str], typer.Option(
        help="Evaluate on all of this dataset or FILE.jsonl / FILE.csv (read with the run's field and user "
             "options) instead of the run's held-out split.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="(default: twice the run's, as its evaluation)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the metrics to this JSON file.")] = None,
) -> None:
    """Evaluate a run's saved adapters: on its held-out split (its "after" metrics) or on --data."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, not {batch_size}")
    _set_threads()
    saved, setup, cola_model = runs.reopen(run)  # the run's task, records, split and base model
    records = setup.held_out if data is None else runs.read_records(setup, data)
    batches = runs.eval_batches(setup, records, batch_size)
    rows = sum(len(b["labels"]) for b in batches)
    where = "held-out" if data is None else data
    print(f"run {run}: task {setup.task_name}, {setup.resolved['model']} on {setup.resolved['data']}; "
          f"evaluating on {where} ({_plural(rows, 'row')})" +
          (f"; {_plural(len(setup.names), 'user')}, {saved['options'].get('mode')} mode" if setup.multi else ""))
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
    from colaft.serve.commands import model_task

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
    _set_threads()
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


_TRANSFER_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # None: packets leave as the server made them


def _backend_options(backend: str, workers: int | None, ray_address: str | None, staleness: int,
                     transfer_dtype: str) -> dict:
    """Check the offload options together (before anything is loaded); the backend's keyword arguments."""
    from colaft.backends import BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if transfer_dtype not in _TRANSFER_DTYPES:
        raise ValueError(f"--transfer-dtype {transfer_dtype!r}: use one of {', '.join(_TRANSFER_DTYPES)}")
    if staleness < 0:
        raise ValueError(f"--staleness must be >= 0, not {staleness}")
    if workers is not None and (backend == "inline" or workers < 1):
        raise ValueError("--workers: a number >= 1, with --backend process or ray")
    if ray_address is not None and backend != "ray":
        raise ValueError("--ray-address needs --backend ray")
    options = {} if workers is None else {"workers": workers}
    return options | ({"address": ray_address} if ray_address else {})


def _check_method(method: str, task: str, multi: bool, backend: str, staleness: int, interval: int, fit_steps: int,
                  merge: bool, init_adapter, export_peft) -> None:
    """Backprop baselines train one model in this process: refuse the options only ColA has."""
    if method == "cola":
        return
    if method not in baselines.METHODS:
        raise ValueError(f"--method {method!r}: use cola or one of {', '.join(baselines.METHODS)}")
    if method != "full" and task not in baselines.TASK_TYPES:
        raise ValueError(f"--method {method}: PEFT methods run on the tasks {', '.join(baselines.TASK_TYPES)}; "
                         f"task {task} compares ColA with --method full")
    colas = {"--user-field/--users": multi, "--backend": backend != "inline", "--staleness": staleness,
             "--interval": interval != 1, "--fit-steps": fit_steps != 1, "--merge": merge,
             "--init-adapter": init_adapter, "--export-peft": export_peft}
    if given := [name for name, value in colas.items() if value]:
        raise ValueError(f"{', '.join(given)}: options of ColA, not of --method {method}")


def trainer_parameters(model) -> int:
    """Parameters that train: ColA's adapters, or a baseline's trainable weights."""
    return model.adapter_parameters() if isinstance(model, ColaModel) else model.trainable_parameters()


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _set_threads() -> None:
    """Intra-op threads: torch's default (physical cores), capped by the CPUs this process may
    use (affinity, cgroup quota) and by the cores other processes leave idle right now. A
    thread waiting for a busy core stalls every parallel op: on 2 cores with one kept busy
    elsewhere, the main job ran 3.4x slower with 2 threads than with 1. OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        allowed = min(allowed, max(1, int(quota) // int(period))) if quota != "max" else allowed
    except (OSError, ValueError):
        pass
    idle = round((psutil.cpu_count() or allowed) * (1 - psutil.cpu_percent(interval=0.2) / 100))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed, idle)))


def _build_atomically(targets: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Fill each folder in a hidden temporary sibling; rename all into place only if every
    one was built, so a failure or Ctrl-C leaves no half-done run behind."""
    made_parents = [p for p in {t.parent.resolve() for t, _ in targets} if not p.exists()]
    temps = []
    try:
        for target, build in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            temps.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)))
            build(temps[-1])
        for (target, _), tmp in zip(targets, temps):
            tmp.rename(target)
    except BaseException:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in sorted(made_parents, reverse=True):  # only folders we created, if left empty
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        raise


from colaft.serve.commands import serve, users  # noqa: E402  (light: their heavy imports are inside)

from colaft.experiment import experiment  # noqa: E402
from colaft.remote import client  # noqa: E402

COMMANDS: dict[str, Callable] = {"train": train, "eval": evaluate, "generate": generate, "experiment": experiment,
                                  "serve": serve, "users": users, "client": client}
"""Command name -> function; typer turns the signature into options."""


_OPTION_OF_FIELD = {"target_modules": "targets"}  # ColaConfig fields named differently on the command line


def _message(error: Exception) -> str:
    """One line for the user: pydantic errors name the option, everything else is flattened."""
    if isinstance(error, ValidationError):
        text = "; ".join(_validation_line(e) for e in error.errors())
    elif isinstance(error, typer.TyperException):
        text = error.format_message()
    else:
        text = str(error)
    return " ".join(text.split())


def _validation_line(e: dict) -> str:
    message = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
    if not e["loc"]:  # a check across fields
        return message
    field = ".".join(map(str, e["loc"]))
    return f"--{_OPTION_OF_FIELD.get(field, field).replace('_', '-')}: {message}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `colaft` console script; returns the exit status."""
    import transformers

    transformers.logging.set_verbosity_error()  # e.g. "newly initialised head": expected here
    transformers.utils.logging.disable_progress_bar()
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="ColA: fine-tune frozen models with Gradient Learning.")
    app.callback()(lambda: None)  # a group even with one command, so `colaft train` names it
    for name, command in COMMANDS.items():
        app.command(name)(command)
    from colaft.bench import bench_app  # its own sub-commands: colaft bench server, ...
    app.add_typer(bench_app, name="bench")
    try:
        result = app(args=argv, prog_name="colaft", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except (ValueError, OSError, typer.TyperException) as error:
        if message := _message(error):  # empty when bare `colaft` has just printed the help
            print(f"colaft: error: {message}", file=sys.stderr)
        return error.exit_code if isinstance(error, typer.TyperException) else 1
    except (KeyboardInterrupt, typer.Abort):
        print("colaft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
