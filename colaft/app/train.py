"""`colaft train`: fine-tune a model on a task and write a run folder.

With no arguments it is the main job: ColA low-rank fine-tuning of MiniLM-L6 on Rotten
Tomatoes, printing held-out accuracy before and after.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from colaft.app import baselines, loop, runs
from colaft.config import DEFAULT_USER, ColaConfig
from colaft.io.files import build_atomically
from colaft.model import ColaModel
from colaft.runtime import set_threads
from colaft.tasks import TASKS
from colaft.trainer import Trainer, TrainerLike

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
    set_threads()
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
    trainer: TrainerLike
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
          f"{len(held_out)} held out); " + (f"{loop.plural(len(names), 'user')}, {mode} mode; " if multi else "")
          + (f"{len(cola_model.sites)} sites, {trainer.trainable_parameters():,} adapter parameters; "
             if method == "cola" else f"{method} by backprop, {trainer.trainable_parameters():,} trainable "
                                      "parameters; ") + f"{steps} steps, "
          f"{loop.plural(torch.get_num_threads(), 'CPU thread')}")

    def write(run: Path) -> None:
        result = loop.train(trainer, evaluated or cola_model, job, batches, eval_batches, steps, run, eval_every)
        labels = runs.record_labels(setup, cola_model)  # the adapters, config.json and exports name the outputs
        if save_adapters:
            cola_model.save_pretrained(run / "adapters")  # several users: a subfolder each
        cola_config = cola_model.config.to_dict() if method == "cola" else None
        (run / "run.json").write_text(json.dumps(
            {"options": options, "resolved": resolved, "cola_config": cola_config, "labels": labels,
             "trainable_parameters": trainer.trainable_parameters(), **result}, indent=2))
        print(f"held-out before: {loop.describe(result['before'])}")
        print(f"held-out after:  {loop.describe(result['after'])}")
        print(f"trained {steps} steps in {result['train_seconds']:.0f} s")

    built = [(out, write)] + ([(export_peft, cola_model.export_peft)] if export_peft else [])
    try:
        build_atomically(built)
    except BaseException:
        trainer.close(wait=False)  # stop the workers at once
        raise
    trainer.close()
    print(f"run saved to {out}" + (f"; PEFT adapters in {export_peft}" if export_peft else ""))


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
