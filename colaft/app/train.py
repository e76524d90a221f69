"""`colaft train`: fine-tune a model on a task and write a run folder.

With no arguments it is the main job: ColA low-rank fine-tuning of MiniLM-L6 on Rotten
Tomatoes, printing held-out accuracy before and after.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

from colaft.app import options as checks
from colaft.app.options import ADAPTER_NAMES, BACKEND_NAMES, METHOD_NAMES, TASK_NAMES, parse_targets

__all__ = ["parse_targets", "train"]  # parse_targets: --targets' syntax, defined with the other options


def train(
    model: Annotated[Optional[str], typer.Option(
        help="minilm-l6 | smollm2-135m | a model folder; for ic: cnn | mlp. (default: the task's)")] = None,
    task: Annotated[str, typer.Option(help=f"{' | '.join(TASK_NAMES)}")] = "sc",
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
        help=f"cola, or a backprop baseline: {' | '.join(METHOD_NAMES)} "
             "(PEFT's; they use --rank, --alpha, --dropout, --hidden).")] = "cola",
    targets: Annotated[Optional[str], typer.Option(
        help="Adapter sites: comma-separated module names, a regex, or all-linear. (default: the task's)")] = None,
    adapter: Annotated[str, typer.Option(help=" | ".join(ADAPTER_NAMES))] = "lowrank",
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
    backend: Annotated[str, typer.Option(help=f"Where the fits run: {' | '.join(BACKEND_NAMES)}.")] = "inline",
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
    checked = checks.check(options)  # every option, as a whole, before anything is loaded
    # the heavy libraries are imported only now: `colaft --help` stays quick
    import torch

    from colaft.app import baselines, loop, runs
    from colaft.config import DEFAULT_USER
    from colaft.io.files import build_atomically
    from colaft.model import ColaModel
    from colaft.pipeline import UserFaults
    from colaft.runtime import set_threads
    from colaft.trainer import Trainer, TrainerLike

    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    setup = runs.plan(options)  # the task's recipe fills every option left out
    backend_options = ({} if workers is None else {"workers": workers}) | \
        ({"address": ray_address} if ray_address else {})
    set_threads()
    if backend == "process" or (backend == "ray" and ray_address is None):  # local workers: leave them cores
        torch.set_num_threads(max(1, torch.get_num_threads() - (workers or 1)))
    torch.manual_seed(seed)

    # Everything that can reject the input runs before anything is written.
    job, resolved, multi = setup.task, setup.resolved, setup.multi
    recipe = job.recipe
    config = checked.cola_config(recipe.targets)
    runs.load(setup)  # records, users, the held-out split, the base model
    if not init_adapter:  # else the PEFT folder names the targets
        _check_targets(setup.base, config)
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
                          transfer_dtype=_transfer_dtype(transfer_dtype))
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
    except BaseException as e:
        trainer.close(wait=False)  # stop the workers at once
        if isinstance(e, KeyboardInterrupt):  # build_atomically has removed the half-built folders
            raise KeyboardInterrupt(f"nothing was saved ({str(out)!r} was not written)") from None
        if isinstance(e, OSError) and _writing_to(e, built):  # name the flag and the user's path, not a temporary
            folder = next(str(f) for f, _ in built if _writing_to(e, [(f, None)]))
            flag = "--out" if folder == str(out) else "--export-peft"
            raise ValueError(f"{flag}: {folder!r}: cannot write there ({e.strerror or e})") from None
        if isinstance(e, UserFaults):  # an offloaded fit failed: one line; non-finite usually means too high a rate
            hint = ": lower the learning rate" if "non-finite" in str(e) else ""
            raise ValueError(f"{e}{hint}") from None
        raise
    trainer.close()
    print(f"run saved to {out}" + (f"; PEFT adapters in {export_peft}" if export_peft else ""))


def _writing_to(error: OSError, built: list) -> bool:
    """Whether `error` is about one of the folders being built (or their temporaries beside them)."""
    paths = [Path(f) for f in (error.filename, error.filename2) if f]
    return any(p.resolve().is_relative_to(Path(folder).parent.resolve()) for p in paths for folder, _ in built)


def _transfer_dtype(name: str):
    """--transfer-dtype as a torch dtype; None: packets leave as the server made them."""
    from colaft.packets import TRANSFER_DTYPES
    return TRANSFER_DTYPES[name]


def _check_targets(base, config) -> None:
    """--targets against the loaded model, as the adapters will select them (one line naming the flag)."""
    from colaft.sites import select_sites
    try:
        select_sites(base, config.target_modules, config.heads)
    except ValueError as e:
        raise ValueError(f"--targets: {e}") from None
