"""The reusable core of every benchmark: interleaved timing, fresh-process memory, reports.

Timing runs every configuration of a benchmark in one process, one step each in turn, for
several rounds (the order rotates each round), so that load from other processes, thermal
state and allocator warm-up affect all configurations alike. Ratios are paired: the median
over rounds of t(config) / t(reference) in the same round.

Memory on CPU is the peak resident set of a fresh process per configuration minus its
resident set right after the model is loaded (the kernel's high-water mark is reset at that
point), the median of several processes. The processes are forked from a forkserver that has
only imported the modules, so they start clean without paying the imports each time. On
CUDA it is torch.cuda.max_memory_allocated minus the allocated bytes after loading, which is
exact in one process.

A memory case is a function `case(spec: dict, loaded: Callable[[], None]) -> dict` named
"module:function": it loads the model, calls `loaded()`, builds its configuration and runs
its steps; the dict it returns is kept in the results.
"""
from __future__ import annotations

import gc
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from colaft.runtime import affinity_cpus

# ---------------------------------------------------------------- the machine

def machine(device: str) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = affinity_cpus()
    info = {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    for lib in ("transformers", "peft"):
        try:
            info[lib] = importlib.import_module(lib).__version__
        except ImportError:
            info[lib] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg"] = round(os.getloadavg()[0], 2)
    return info


def describe(info: dict) -> str:
    """One line for a report: '2-core AMD EPYC, no GPU (torch 2.13.0, ...)'."""
    where = info.get("gpu") or "no GPU"
    return (f"{info['cores']}-core {info['cpu']}, {where}; torch {info['torch']} ({info['torch_threads']} CPU "
            f"threads), transformers {info['transformers']}, peft {info['peft']}; load average "
            f"{info.get('loadavg', '?')} at start")


# ---------------------------------------------------------------- timing

def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


@dataclass
class Timings:
    """Seconds per step of each configuration, one entry per round (None: it failed)."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        s = self.samples.get(name)
        return statistics.median(s) if s else None

    def ratio(self, name: str, reference: str) -> float | None:
        """Median over rounds of t(name) / t(reference) measured in the same round."""
        a, b = self.samples.get(name), self.samples.get(reference)
        if not a or not b:
            return None
        if len(a) == len(b):
            return statistics.median(x / y for x, y in zip(a, b))
        return statistics.median(a) / statistics.median(b)


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 1, device: str = "cpu",
                max_seconds: float | None = None, min_rounds: int = 3, log: Callable[[str], None] = print) -> Timings:
    """Time one call of every step per round, all configurations in turn.

    Args:
        steps: configuration name -> one training step.
        rounds: timed rounds (after `warmup` untimed ones).
        max_seconds: stop early (after at least `min_rounds`) when the timed rounds take longer.
    Returns:
        Timings; a configuration whose step raises is dropped and its error kept.
    """
    sync = synchronizer(device)
    out = Timings({n: [] for n in steps})
    live = list(steps)
    start = time.perf_counter()
    for r in range(warmup + rounds):
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:
            try:
                sync()
                t0 = time.perf_counter()
                steps[name]()
                sync()
                dt = time.perf_counter() - t0
            except Exception as e:  # one configuration failing (e.g. out of memory) must not stop the rest
                out.errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                log(f"  {name}: failed: {out.errors[name]}")
                _free(device)
                continue
            if r >= warmup:
                out.samples[name].append(dt)
        live = [n for n in live if n not in out.errors]
        if r == 0:
            start = time.perf_counter()
        done = r + 1 - warmup
        if max_seconds is not None and done >= min_rounds and time.perf_counter() - start > max_seconds:
            log(f"  time budget reached after {done} rounds")
            break
    return out


def time_call(fn: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """Median seconds of `repeats` calls of fn (after one untimed call)."""
    sync = synchronizer(device)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- memory

def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


class Probe:
    """Peak memory since `loaded()` was called: RSS high-water mark on CPU, the allocator on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self.base = 0

    def loaded(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.base = _status_kib("VmRSS") * 1024
        # "5" resets the high-water mark VmHWM to the current RSS (Linux >= 4.0, proc(5))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def pin_malloc_threshold(nbytes: int = 128 * 1024) -> bool:
    """Make glibc serve every block of `nbytes` or more by mmap, and return it to the system when freed.

    By default glibc raises that threshold (up to 32 MiB) each time a large block is freed,
    after which tensors come from the heap and freed memory stays resident: the peak RSS then
    holds up to a few hundred MiB of freed tensors, differently from run to run and from one
    configuration to the next. Pinned (mallopt M_MMAP_THRESHOLD, which also stops the
    adjustment), the peak RSS follows the live tensors. Call it first in a memory process.
    Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # -3: M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        return False


def resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_case(target: str, spec: dict, **kwargs) -> dict:
    """Run a memory case in this process: {"peak_bytes", "base_bytes", **what the case returns}."""
    probe = Probe(spec.get("device", "cpu"))
    extra = resolve(target)(spec, probe.loaded, **kwargs) or {}
    return {"peak_bytes": probe.peak(), "base_bytes": probe.base, **extra}


@dataclass
class Memory:
    """Peak bytes above the loaded model, per run, and the median."""

    runs: list[int] = field(default_factory=list)
    error: str | None = None
    extra: list[dict] = field(default_factory=list)
    """What the case returned besides the peak, per run."""

    @property
    def median(self) -> int | None:
        return int(statistics.median(self.runs)) if self.runs else None


def _child(conn, target: str, spec: dict) -> None:
    try:
        conn.send(run_case(target, spec))
    except BaseException as e:
        conn.send({"error": f"{type(e).__name__}: {str(e)[:300]}"})
    finally:
        conn.close()


def _fresh(ctx, target: str, spec: dict, timeout: float) -> dict:
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, target, spec), daemon=True)
    proc.start()
    send.close()
    try:
        result = recv.recv() if recv.poll(timeout) else {"error": f"timed out after {timeout:.0f} s"}
    except EOFError:  # died without a word: killed (out of memory) or crashed
        result = None
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return result or {"error": f"process ended with exit code {proc.exitcode} (killed: out of memory?)"}


def fresh_process_memory(target: str, specs: dict[str, dict], runs: int = 3, jobs: int = 1,
                         timeout: float = 900, log: Callable[[str], None] = print) -> dict[str, Memory]:
    """Median peak memory of each case, each run in a fresh process.

    The processes are forked from a forkserver that has only imported the case's module (no
    tensor work, no threads), so each one starts clean without paying the imports again.

    Args:
        specs: configuration name -> the spec passed to the case.
        jobs: processes at once (peak RSS is per process, so parallel runs do not disturb it).
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, target.partition(":")[0]])
    out = {name: Memory() for name in specs}
    work = [name for _ in range(runs) for name in specs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, result in zip(work, pool.map(lambda n: _fresh(ctx, target, specs[n], timeout), work)):
            if "error" in result:
                out[name].error = result["error"]
                log(f"  memory {name}: {result['error']}")
            else:
                out[name].runs.append(result["peak_bytes"])
                out[name].extra.append({k: v for k, v in result.items() if k not in ("peak_bytes", "base_bytes")})
    return out


def in_process_memory(target: str, specs: dict[str, dict], log: Callable[[str], None] = print,
                      **kwargs) -> dict[str, Memory]:
    """Peak memory of each case run in this process (exact on CUDA; not meaningful for CPU RSS)."""
    out = {}
    for name, spec in specs.items():
        out[name] = Memory()
        try:
            result = run_case(target, spec, **kwargs)
            out[name].runs.append(result["peak_bytes"])
            out[name].extra.append({k: v for k, v in result.items() if k not in ("peak_bytes", "base_bytes")})
        except Exception as e:
            out[name].error = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  memory {name}: {out[name].error}")
        _free(spec.get("device", "cpu"))
    return out


# ---------------------------------------------------------------- reports

@dataclass
class Table:
    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def markdown(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def bar_plot(path: Path, title: str, values: dict[str, float | None], ylabel: str,
             lines: dict[str, float] | None = None) -> None:
    """One bar per configuration (missing values left out), with labelled reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, v in values.items() if v is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4))
    colors = ["tab:blue" if n.startswith("cola") else "tab:gray" for n in names]  # ColA vs the references
    ax.bar(range(len(names)), [values[n] for n in names], color=colors)
    for (label, y), style in zip((lines or {}).items(), ("--", ":", "-.")):
        ax.axhline(y, linestyle=style, linewidth=1, color="tab:red", label=label)
    if lines:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, name: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write `name`.md and `name`.json under `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(markdown.rstrip() + "\n")
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js
