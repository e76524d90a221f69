"""`colaft bench offload`: where the fit runs, and what staleness costs, on a real task.

    throughput   samples per second of whole training steps (server step, fit, transfers,
                 updates) with the fits inline, on worker processes and on Ray actors, at
                 staleness S = 0 and S = 1, against the server step alone
    staleness    loss and held-out accuracy after a fixed number of steps at S = 0, 1, 2
                 (and with packets sent in bfloat16)

The task is the built-in one (`colaft train` with no options: MiniLM-L6, all linear layers
at rank 8, Rotten Tomatoes reviews); every configuration steps through the same batches.

Throughput is timed in blocks: a block is `block` consecutive steps and then a wait for
every fit in flight, so a configuration with S = 1 cannot push its last fit into the next
configuration's time (which makes its figure slightly pessimistic: one fit per block is not
overlapped). Blocks of all configurations are interleaved, the order rotating each round
(colaft.bench.harness), and ratios are paired per round.

Staleness runs use the inline backend in its delayed mode, which holds every update until
the pipeline has to wait for it: the server runs exactly S steps ahead, the most S allows,
deterministically. A run on worker processes at S = 1 is added as the real thing (with one
user it follows the same trajectory).
"""
from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colaft.bench import harness
from colaft.bench.models import share_weights
from colaft.config import ColaConfig
from colaft.model import ColaModel
from colaft.server import server_step
from colaft.trainer import Trainer, train_steps
from colaft.users import FitConfig, Owner


@dataclass
class Settings:
    """The command's options."""

    model: str = "minilm-l6"
    batch_size: int | None = None  # None: the task recipe's
    max_length: int | None = None
    lr: float | None = None  # None: the task recipe's
    backends: list[str] = field(default_factory=lambda: ["inline", "process", "ray"])
    workers: int = 1
    threads: int = 1  # the server's torch threads
    block: int = 6
    rounds: int = 5
    warmup: int = 1
    steps: int = 100  # training steps of each staleness run
    stalenesses: list[int] = field(default_factory=lambda: [0, 1, 2])
    parts: list[str] = field(default_factory=lambda: ["throughput", "staleness"])
    eval_examples: int = 512
    seed: int = 0


@dataclass
class Task:
    """The real task, loaded once: the base model, training batches, held-out batches."""

    job: object
    base: torch.nn.Module
    config: ColaConfig
    lr: float
    batches: list[dict]
    held_out: list[dict]


def load_task(st: Settings) -> Task:
    from colaft import data as datasets
    from colaft.tasks import get_task, loader

    job = get_task("sc")
    recipe = job.recipe
    records = datasets.load(recipe.data, {}, job.fields)
    train, held = datasets.split(records, 0.1, st.seed)
    base = job.load(st.model, records, st.seed)
    max_length, batch_size = st.max_length or recipe.max_length, st.batch_size or recipe.batch_size
    batches = list(loader(job.encode(train, max_length), job, batch_size, shuffle=True, seed=st.seed))
    held_out = list(loader(job.encode(held[:st.eval_examples], max_length), job, 2 * batch_size,
                                shuffle=False))
    return Task(job, base, ColaConfig(target_modules=recipe.targets, adapter="lowrank"), st.lr or recipe.lr,
                batches, held_out)


def _cola(task: Task, seed: int) -> ColaModel:
    torch.manual_seed(seed)  # the same adapter initialisation in every configuration
    return ColaModel(share_weights(task.base), task.config)


def _rows(batch: dict) -> int:
    return len(batch["input_ids"])


# ---------------------------------------------------------------- throughput

def _trainer(task: Task, st: Settings, backend: str, staleness: int, **kw) -> Trainer:
    options = {} if backend == "inline" else {"workers": st.workers}
    return Trainer(_cola(task, st.seed), "adamw", lr=task.lr, backend=backend, backend_options=options,
                   staleness=staleness, **kw)


def _blocks(task: Task, st: Settings) -> list[list[dict]]:
    n = (st.rounds + st.warmup) * st.block
    batches = list(itertools.islice(itertools.cycle(task.batches), n))
    return [batches[i:i + st.block] for i in range(0, n, st.block)]


def measure_throughput(task: Task, st: Settings, log: Callable[[str], None]) -> dict:
    """Seconds per block of every configuration, interleaved; samples per second and ratios."""
    blocks = _blocks(task, st)
    cola = _cola(task, st.seed).train()  # as Trainer.step runs it: dropout on (from_pretrained gives eval mode)
    alone = {"cpu": 0.0, "steps": 0}  # the server thread's CPU time alone: against the trainers', it
    # tells time lost to sharing the cores (the worker, the sender thread, other load) from work

    def server_alone(b):
        cpu = time.thread_time()
        for x in b:
            server_step(cola, x)
        alone["cpu"] += time.thread_time() - cpu
        alone["steps"] += len(b)
    runs: dict[str, Callable[[list[dict]], None]] = {"server": server_alone}
    trainers: dict[str, Trainer] = {}
    configs = [(b, s) for b in st.backends for s in ((0,) if b == "inline" else (0, 1))]  # inline: S buys nothing
    try:
        for backend, s in configs:
            name = f"{backend} S={s}"
            log(f"  starting {name}")
            trainers[name] = t = _trainer(task, st, backend, s)

            def run(b, t=t):
                list(train_steps(t, b, flush=False))  # one pass over the block
                t.pipeline.settle(0)  # it ends when its last fit is applied (waiting, without timing a flush message)
            runs[name] = run
        cursors = {name: iter(blocks) for name in runs}
        log(f"  timing {len(runs)} configurations: {st.rounds} rounds of {st.block} steps")
        timings = harness.interleaved({n: (lambda n=n: runs[n](next(cursors[n]))) for n in runs}, st.rounds,
                                      st.warmup, log=log)
        samples = [sum(map(_rows, b)) for b in blocks[st.warmup:]]
        rows = {}
        for name in runs:
            times = timings.samples.get(name, [])
            row = {"samples_per_s": statistics.median(n / t for n, t in zip(samples, times)) if times else None,
                   "x_server": (1 / r) if (r := timings.ratio(name, "server")) else None, "times": times}
            if name in trainers:
                stats, steps = trainers[name].stats, trainers[name].stats["steps"]
                row.update(steps=steps, server_s=stats["server_seconds"] / steps,
                           server_cpu_s=stats["server_cpu_seconds"] / steps, wait_s=stats["wait_seconds"] / steps,
                           transfer_ms=1e3 * stats["transfer_seconds"] / steps,
                           packet_mib=stats["packet_bytes_total"] / steps / 2**20,
                           update_mib=(stats["update_bytes"] + stats["snapshot_bytes"]) / steps / 2**20,
                           recoveries=stats["recoveries"])
            rows[name] = row
        rows["server"]["server_cpu_s"] = alone["cpu"] / max(alone["steps"], 1)
        fit_s = _fit_seconds(task, st, cola)
        server_s = statistics.median(t / st.block for t in timings.samples["server"])
        return {"rows": rows, "errors": timings.errors, "fit_s": fit_s, "server_step_s": server_s}
    finally:
        for t in trainers.values():
            t.close(wait=False)


def _fit_seconds(task: Task, st: Settings, cola: ColaModel) -> float:
    """Median seconds of one fit of one step's packets, on one CPU thread, as a worker runs it."""
    owner = Owner("default", cola.user_adapters("default"), FitConfig(device="cpu"))
    packets = server_step(cola, task.batches[0]).packets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return harness.time_call(lambda: owner.push(packets), repeats=5)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- staleness

def _staleness_configs(st: Settings) -> list[tuple[str, str, int, torch.dtype | None]]:
    """(name, backend, S, transfer dtype)."""
    out = [(f"S={s}" + (" (delayed inline)" if s else ""), "inline", s, None) for s in st.stalenesses]
    out.append(("S=0, bfloat16 packets", "inline", 0, torch.bfloat16))
    if "process" in st.backends and 1 in st.stalenesses:
        out.append(("S=1 on worker processes", "process", 1, None))
    return out


def measure_staleness(task: Task, st: Settings, log: Callable[[str], None]) -> dict:
    rows = {}
    for name, backend, s, dtype in _staleness_configs(st):
        log(f"  {name}: {st.steps} steps")
        start = time.perf_counter()
        spec = _delayed() if backend == "inline" and s else backend
        trainer = Trainer(_cola(task, st.seed), "adamw", lr=task.lr, scheduler="linear", warmup_ratio=0.05,
                          total_steps=st.steps, staleness=s, transfer_dtype=dtype, backend=spec,
                          backend_options={} if backend == "inline" else {"workers": st.workers})
        torch.manual_seed(st.seed)  # dropout masks: the same in every run
        try:
            losses = [step.loss for step in train_steps(trainer, task.batches, st.steps)]
        finally:
            trainer.close(wait=False)
        metrics = task.job.evaluate(trainer.model, task.held_out)
        tail = losses[-10:]
        rows[name] = {"train_loss_last10": sum(tail) / len(tail), "eval_loss": metrics["loss"],
                      "accuracy": metrics["accuracy"], "losses": losses,
                      "adapters": {k: v.clone() for k, v in _flat(trainer.model).items()},
                      "seconds": round(time.perf_counter() - start, 1)}
    reference = rows.get("S=0")
    for row in rows.values():
        if reference:
            row["eval_loss_vs_s0"] = row["eval_loss"] / reference["eval_loss"] - 1
    real, delayed = rows.get("S=1 on worker processes"), rows.get("S=1 (delayed inline)")
    same = None
    if real and delayed:
        same = max((real["adapters"][k] - delayed["adapters"][k]).abs().max().item() for k in real["adapters"])
    for row in rows.values():
        del row["adapters"]
    return {"rows": rows, "real_vs_delayed_max_abs_diff": same}


def _delayed():
    from colaft.backends import make_backend
    return make_backend("inline", delayed=True)


def _flat(model: ColaModel) -> dict[str, torch.Tensor]:
    return {f"{site}.{k}": v.detach() for site, a in model.adapters().items() for k, v in a.state_dict().items()}


# ---------------------------------------------------------------- the run and its report

def run_offload(st: Settings, out: Path, command: str = "", log: Callable[[str], None] = print) -> dict:
    """Both measurements; writes offload.md and offload.json under `out`. Returns the JSON data."""
    start = time.perf_counter()
    torch.set_num_threads(st.threads)
    info = harness.machine("cpu")
    log(f"loading the sc task ({st.model})")
    task = load_task(st)
    data = {"machine": info, "command": command, "settings": st.__dict__, "lr": task.lr, "batches": len(task.batches),
            "rows_per_batch": _rows(task.batches[0])}
    local_ray = None
    if "ray" in st.backends and "throughput" in st.parts:
        from colaft.backends.ray_session import start_local
        # one private instance for the Ray trainers (S = 0 and S = 1: two sets of actors)
        local_ray = start_local(num_cpus=max(os.cpu_count() or 1, 2 * st.workers))
    try:
        if "throughput" in st.parts:
            log("throughput")
            data["throughput"] = measure_throughput(task, st, log)
    finally:
        if local_ray is not None:
            local_ray.stop()
    if "staleness" in st.parts:
        log("staleness")
        data["staleness"] = measure_staleness(task, st, log)
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["loadavg_end"] = harness.machine("cpu").get("loadavg")
    harness.write_report(out, "offload", report(data, st), data)
    return data


def targets_table(data: dict) -> harness.Table:
    t = harness.Table(["target", "configuration", "measured", "bound", "met"])
    th = data.get("throughput")
    for name, row in (th["rows"] if th else {}).items():
        if name.endswith("S=1") and row["x_server"] is not None:
            slow = "" if th["fit_s"] <= th["server_step_s"] else " (the fit is slower than the step)"
            t.rows.append(["S=1 throughput / server step alone", name, round(row["x_server"], 3), ">= 0.9",
                           ("yes" if row["x_server"] >= 0.9 else "no") + slow])
    for name, row in (data["staleness"]["rows"] if "staleness" in data else {}).items():
        if name.startswith("S=1") and "eval_loss_vs_s0" in row:
            rel = row["eval_loss_vs_s0"]
            t.rows.append(["S=1 held-out loss vs S=0", name, f"{100 * rel:+.2f}%", "within 2%",
                           "yes" if abs(rel) <= 0.02 else "no"])
    return t


def throughput_markdown(th: dict, st: Settings) -> list[str]:
    t = harness.Table(["configuration", "samples/s", "x server alone", "server step s", "its CPU s", "wait s/step",
                       "transfer ms/step", "packets MiB/step", "updates+snapshots MiB/step"])
    for name, r in th["rows"].items():
        server = th["server_step_s"] if name == "server" else r.get("server_s")
        t.rows.append([name, r["samples_per_s"], r["x_server"], server, r.get("server_cpu_s"), r.get("wait_s"),
                       r.get("transfer_ms"),
                       r.get("packet_mib"), r.get("update_mib")])
    parts = [
        "### Throughput", "",
        f"Median over {st.rounds} interleaved rounds of blocks of {st.block} steps (each block ends when its last "
        "fit is applied); 'x server alone' is the paired ratio to the server step alone "
        f"({th['server_step_s']:.3f} s/step); 'server step s' is the server step's own time inside each trainer, "
        "'its CPU s' the server thread's CPU time in it (lower than the time where the thread waited for a core). "
        f"One fit of one step's packets on one CPU thread: {th['fit_s']:.3f} s "
        f"({th['fit_s'] / th['server_step_s']:.2f} x the server step).", "", t.markdown(), ""]
    if th["errors"]:
        parts += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in th["errors"].items()), ""]
    return parts


def staleness_markdown(sl: dict, st: Settings) -> list[str]:
    t = harness.Table(["configuration", f"train loss (last 10 of {st.steps})", "held-out loss", "vs S=0",
                       "held-out accuracy", "run (s)"])
    for name, r in sl["rows"].items():
        vs = r.get("eval_loss_vs_s0")
        t.rows.append([name, r["train_loss_last10"], r["eval_loss"], None if vs is None else f"{100 * vs:+.2f}%",
                       r["accuracy"], r["seconds"]])
    parts = [
        "### Staleness", "",
        f"{st.steps} steps each, the recipe's linear schedule with 5% warm-up, the same batches and dropout "
        f"masks; held-out: {st.eval_examples} reviews. 'delayed inline': every update is applied exactly S "
        "steps late (the most S allows).", "", t.markdown(), ""]
    if sl["real_vs_delayed_max_abs_diff"] is not None:
        parts += ["S=1 on worker processes vs delayed inline S=1: max |difference| of the final adapters "
                  f"{sl['real_vs_delayed_max_abs_diff']:.3g}.", ""]
    return parts


def report(data: dict, st: Settings) -> str:
    parts = [
        "## Offloading the fit: throughput and staleness", "",
        f"Machine: {harness.describe(data['machine'])}; load average {data.get('loadavg_end')} at the end.",
        f"Command: `{data['command']}`", "",
        f"Task: sc, {st.model}, lowrank rank 8 at all linear layers + head, AdamW at lr {data['lr']:g}; "
        f"{data['rows_per_batch']} rows per batch; server on {st.threads} torch thread(s), "
        f"{st.workers} worker(s) of one thread. Whole run: {data['seconds']:.0f} s.", ""]
    if "throughput" in data:
        parts += throughput_markdown(data["throughput"], st)
    if "staleness" in data:
        parts += staleness_markdown(data["staleness"], st)
    return "\n".join(parts + ["### Targets", "", targets_table(data).markdown(), ""])
