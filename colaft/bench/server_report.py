"""The report of `colaft bench server`: the results table, the targets, plots and the header."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from colaft.bench import harness


@dataclass
class Run:
    """One model's measurements: a row per configuration (and the errors of those that failed)."""
    model: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    targets: list[str] | str
    sites: int = 0
    rows: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


COLA = ["cola-lowrank", "cola-lowrank-merged", "cola-linear", "cola-linear-merged", "cola-mlp"]


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def targets_table(run: Run) -> harness.Table:
    """The issue's targets, measured side by side; 'no (+x%)' is how far over the bound."""
    t = harness.Table(["target", "configuration", "measured", "bound", "met"])

    def get(name, key):
        return run.rows.get(name, {}).get(key)

    def add(what, name, value, bound):
        if name not in run.rows:
            return
        met = None if value is None else ("yes" if value <= bound else f"no (+{100 * (value / bound - 1):.1f}%)")
        t.rows.append([what, name, None if value is None else round(value, 3), bound, met])

    for name in ("cola-lowrank-merged", "cola-linear-merged"):
        add("merged server step time / floor", name, get(name, "x_floor"), 1.05)
    for name in ("cola-lowrank", "cola-linear", "cola-mlp"):
        add("unmerged server step time / PEFT LoRA", name, get(name, "x_lora"), 1.0)
    for name in COLA:
        add("server peak memory / PEFT LoRA", name, _ratio(get(name, "mem_bytes"), get("peft-lora", "mem_bytes")), 1.0)
    for name in ("cola-linear", "cola-linear-merged"):
        add("server peak memory / full-ft", name, _ratio(get(name, "mem_bytes"), get("full-ft", "mem_bytes")), 0.5)
    return t


def results_table(run: Run) -> harness.Table:
    t = harness.Table(["configuration", "step (s)", "x floor", "x LoRA", "peak MiB", "mem x LoRA",
                       "server trainable", "packets MiB/step", "update MiB/step", "+fit (s)", "+fit x LoRA",
                       "fit on CPU (s)"])
    lora_mem = run.rows["peft-lora"].get("mem_bytes")
    for name, r in run.rows.items():
        t.rows.append([name, r["time_s"], r["x_floor"], r["x_lora"], harness.mib(r.get("mem_bytes")),
                       _ratio(r.get("mem_bytes"), lora_mem), r["trainable_server"],
                       harness.mib(r.get("packet_bytes")), harness.mib(r.get("update_bytes")),
                       r.get("fit_time_s"), r.get("fit_x_lora"), r.get("fit_cpu_s")])
    return t


def plot_run(run: Run, out: Path) -> list[str]:
    stem = f"server-{run.model.replace(':', '_').replace(',', '_')}-{run.device.split(':')[0]}-{run.dtype}"
    out.mkdir(parents=True, exist_ok=True)
    time_png, mem_png = out / f"{stem}-time.png", out / f"{stem}-memory.png"
    title = f"{run.model}, {run.device} {run.dtype}, batch {run.batch_size}x{run.seq_len}"
    harness.bar_plot(time_png, f"server step time / floor - {title}",
                     {n: r["x_floor"] for n, r in run.rows.items()}, "x floor", {"floor": 1.0, "1.05": 1.05})
    lora = harness.mib(run.rows["peft-lora"].get("mem_bytes"))
    harness.bar_plot(mem_png, f"server peak memory above the loaded model - {title}",
                     {n: harness.mib(r.get("mem_bytes")) for n, r in run.rows.items()}, "MiB",
                     {"PEFT LoRA": lora} if lora else None)
    return [time_png.name, mem_png.name]


def run_markdown(run: Run, plots: list[str]) -> str:
    targets = run.targets if isinstance(run.targets, str) else ", ".join(run.targets)
    parts = [f"### {run.model} - {run.device}, {run.dtype}",
             f"Batch {run.batch_size} x {run.seq_len} tokens; targets: {targets} ({run.sites} sites incl. heads).",
             results_table(run).markdown(), "Targets:", targets_table(run).markdown()]
    if run.errors:
        parts.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in run.errors.items()))
    parts.append(" ".join(f"![{p}]({p})" for p in plots))
    return "\n\n".join(parts) + "\n\n"


def header(info: dict, command: str, runs_done: int) -> str:
    return "\n".join([
        "## Server step: ColA vs PEFT LoRA vs the floor", "",
        f"Machine: {harness.describe(info)}.", f"Command: `{command}`", "",
        "Models are built from their configs with random weights (speed and memory do not depend on "
        "the values). Time: median of interleaved steps; 'x floor' and 'x LoRA' are paired ratios (median "
        "over rounds). Memory: peak above the loaded model (CPU: resident set of a fresh process per "
        "configuration, median of runs; CUDA: torch.cuda.max_memory_allocated). '+fit' adds the fit and "
        "the update in the same process; 'fit on CPU' is one fit of the packets of one step on the CPU.", "",
        "floor: the frozen base, forward and backward to the first sites (every dL/dh computed, none kept). "
        "peft-lora: PEFT LoRA (rank 8, alpha 16) with AdamW. full-ft: the target layers trained with AdamW. "
        "cola-*: ColA's server step (forward, backward to dL/dh, packets); -merged runs on W + delta_W.",
        f"Runs completed: {runs_done}.", "", ""])


def summary(data: dict) -> str:
    """Median step times in one line per run (for the log)."""
    lines = []
    for run in data["runs"]:
        times = {n: r["time_s"] for n, r in run["rows"].items() if r.get("time_s")}
        if times:
            lines.append(f"{run['model']} {run['dtype']}: " + ", ".join(f"{n} {t:.3g}s" for n, t in times.items()))
    return "\n".join(lines) or "no results"

