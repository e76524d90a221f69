"""`colaft experiment`: ColA and the backprop baselines on one budget, over seeds; tables and curves.

    methods x learning rates (on the first seed) -> the best rate of each method by the task's metric
    methods x seeds at that rate -> one `colaft train` run each, in its own process
    -> results.json (every run), results.md (mean ± spread per method), curves.png
       (and with users: a per-user table in results.md, users.png)

Every run is a plain `colaft train` run folder under runs/, so that each can be looked at,
evaluated or reproduced alone; a finished run is kept, so a stopped experiment resumes
where it stopped. Runs use one CPU thread each and `--jobs` run side by side.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Optional

import typer

METHODS: dict[str, list[str]] = {
    "full": ["--method", "full"],
    "lora": ["--method", "lora"],
    "adalora": ["--method", "adalora"],
    "ia3": ["--method", "ia3"],
    "prompt": ["--method", "prompt"],
    "prefix": ["--method", "prefix"],
    "ptuning": ["--method", "ptuning"],
    "cola-lowrank": ["--adapter", "lowrank"],
    "cola-lowrank-merged": ["--adapter", "lowrank", "--merge"],
    "cola-linear": ["--adapter", "linear"],
    "cola-linear-merged": ["--adapter", "linear", "--merge"],
    "cola-mlp": ["--adapter", "mlp"],
    # with users (--user-field or --users): the collaboration experiment
    "users-personal": ["--mode", "personal"],
    "users-collaborative": ["--mode", "collaborative"],
    "users-collaborative-rows": ["--mode", "collaborative", "--user-weights", "rows"],
    "users-shared": ["--mode", "shared"],
}
"""Method name -> its `colaft train` options. Merged ColA runs the server on W + ΔW: the same
updates as unmerged (to round-off), at the base model's forward cost. The users-* methods
need users: each user alone, the users' mean delta (or weighted by their training rows), one
adapter for all (metrics per user)."""

_LOWER_IS_BETTER = {"loss", "perplexity"}


def experiment(
    task: Annotated[str, typer.Option(help="sc | clm | ic")] = "sc",
    methods: Annotated[str, typer.Option(
        help=f"Comma-separated, or all (all but users-*): {', '.join(METHODS)}. "
             "(ic: full and the cola ones)")] = "all",
    user_field: Annotated[Optional[str], typer.Option(help="Users for the users-* methods: this column.")] = None,
    users: Annotated[Optional[int], typer.Option(help="Users for the users-* methods: deal the data out.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (split, initialisation, data order).")] = "0,1,2",
    lrs: Annotated[str, typer.Option(
        help="Learning rates tried on the first seed; each method keeps its best by the task's metric.")] = "1e-3",
    lrs_from: Annotated[Optional[Path], typer.Option(
        help="Take each method's learning rate from this experiment's results.json instead.")] = None,
    merged_seeds: Annotated[int, typer.Option(
        help="Seeds for the merged ColA methods (their updates equal the unmerged ones').")] = 0,
    model: Annotated[Optional[str], typer.Option(help="(default: the task's)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every run. (default: the task's)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="(default: the task's)")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="(default: the task's)")] = None,
    eval_every: Annotated[int, typer.Option(help="Held-out evaluation every so many steps (curves).")] = 0,
    jobs: Annotated[int, typer.Option(help="Runs side by side, one CPU thread each.")] = 2,
    out: Annotated[Optional[Path], typer.Option(
        help="Experiment folder (reused: finished runs are kept). (default: experiments/TASK)")] = None,
    train_option: Annotated[Optional[list[str]], typer.Option(
        help="Further `colaft train` option for every run, e.g. --train-option=--warmup=0.1 (repeatable).")] = None,
) -> int:
    """Train every method on the same budget and seeds; write results.json, results.md and curves.png
    (users.png with users)."""
    from colaft.tasks import get_task  # torch: imported when the command runs, not for --help

    job = get_task(task)
    out = out or Path("experiments") / task
    names = [m for m in METHODS if not m.startswith("users-")] if methods == "all" else \
        [m.strip() for m in methods.split(",") if m.strip()]
    if unknown := [m for m in names if m not in METHODS]:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; methods: {', '.join(METHODS)}")
    with_users = any(m.startswith("users-") for m in names)
    if with_users != (bool(user_field) or users is not None) or (user_field and users is not None):
        raise ValueError("the users-* methods, and only they, need users: --user-field or --users (one of them)")
    if task == "ic":  # PEFT's methods are for transformers; a CNN compares with full training
        names = [m for m in names if m == "full" or m.startswith("cola")]
    seed_list = [int(s) for s in seeds.split(",")]
    rates = [float(r) for r in lrs.split(",")]
    if jobs < 1 or not seed_list or not rates or any(r <= 0 for r in rates):
        raise ValueError("--jobs, --seeds and --lrs need at least one value; learning rates > 0")
    chosen_before = json.loads(lrs_from.read_text())["lrs"] if lrs_from else {}
    if missing := [m for m in names if lrs_from and m not in chosen_before]:
        raise ValueError(f"--lrs-from {lrs_from} has no learning rate for {', '.join(missing)}")
    common = ["--task", task] + sum(([f"--{k}", str(v)] for k, v in
                                     {"model": model, "max-steps": steps, "batch-size": batch_size,
                                      "max-length": max_length, "eval-every": eval_every,
                                      "user-field": user_field, "users": users}.items() if v), [])
    common += list(train_option or []) + ["--no-save-adapters"]
    out.mkdir(parents=True, exist_ok=True)
    pool = _Runs(out, common, jobs)

    # 1. learning rates: each method's best on the first seed (or another experiment's choice)
    if chosen_before:
        chosen = {m: chosen_before[m] for m in names}
        sweep: dict[str, dict[str, float]] = {}
    else:  # a merged method updates as its unmerged one does: it takes that one's rate untried
        tried = [m for m in names if m.removesuffix("-merged") == m or m.removesuffix("-merged") not in names]
        results = pool.run([(m, lr, seed_list[0]) for m in tried for lr in rates], "learning rates" if len(rates) > 1
                           else "runs")
        sweep = {m: {_lr(lr): _metric(results[(m, lr, seed_list[0])], job.recipe.metric) for lr in rates}
                 for m in tried}
        losses = {m: {_lr(lr): _metric(results[(m, lr, seed_list[0])], "loss") for lr in rates} for m in tried}
        chosen = {m: _best(sweep[m], job.recipe.metric, losses[m]) for m in tried}
        chosen |= {m: chosen[m.removesuffix("-merged")] for m in names if m not in chosen}
    # 2. every seed at the chosen rate
    grid = [(m, chosen[m], s) for m in names
            for s in (seed_list[:max(1, merged_seeds)] if m.endswith("-merged") and merged_seeds else seed_list)]
    results = pool.run(grid, "seeds")
    runs = [{"method": m, "lr": lr, "seed": s, **_summary(results[(m, lr, s)])} for m, lr, s in grid]
    report = {"task": task, "metric": job.recipe.metric, "seeds": seed_list, "lrs_tried": rates,
              "train_options": common, "lrs": chosen, "sweep": sweep, "runs": runs}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(table(report))
    curves(out, runs, job.recipe.metric)
    plots = "curves.png" + (" and users.png" if users_plot(out, runs, job.recipe.metric) else "")
    print(table(report))
    failed = [r for r in runs if r.get("error")]
    print(f"results in {out}/results.md, results.json and {plots}" +
          (f"; {len(failed)} runs failed (see their logs)" if failed else ""))
    return 1 if failed else 0


class _Runs:
    """Runs `colaft train` for (method, lr, seed) in subprocesses, `jobs` at a time, once each."""

    def __init__(self, out: Path, common: list[str], jobs: int):
        self.out, self.common, self.jobs = out, common, jobs

    def folder(self, method: str, lr: float, seed: int) -> Path:
        return self.out / "runs" / method / f"lr{_lr(lr)}-seed{seed}"

    def log(self, key: tuple[str, float, int], suffix: str) -> Path:
        """A run's output (.log) or its wall time and exit status (.wall)."""
        return self.out / "logs" / f"{key[0]}-lr{_lr(key[1])}-seed{key[2]}{suffix}"

    def command(self, method: str, lr: float, seed: int) -> list[str]:
        return [sys.executable, "-m", "colaft.app.cli", "train", *self.common, *METHODS[method], "--lr", str(lr),
                "--seed", str(seed), "--out", str(self.folder(method, lr, seed))]

    def run(self, keys: Sequence[tuple[str, float, int]], what: str) -> dict[tuple, dict]:
        from tqdm import tqdm

        keys = list(dict.fromkeys(keys))
        todo = [k for k in keys if not (self.folder(*k) / "run.json").exists()]
        try:
            with ThreadPoolExecutor(self.jobs) as executor, \
                    tqdm(total=len(keys), initial=len(keys) - len(todo), desc=what, unit="run") as bar:
                try:
                    for key, _ in zip(todo, executor.map(self._one, todo)):
                        bar.set_postfix_str(f"{key[0]} lr {key[1]:g} seed {key[2]}")
                        bar.update()
                except KeyboardInterrupt:  # Ctrl-C reaches the runs too: they stop and leave nothing half-done
                    bar.leave = False  # no half-drawn bar before the command's last line
                    raise
        except KeyboardInterrupt:
            done = sum((self.folder(*k) / "run.json").exists() for k in keys)
            raise KeyboardInterrupt(f"{done} of {len(keys)} runs finished, kept in {str(self.out)!r}; "
                                    "the same command resumes from them") from None
        return {k: self._result(k) for k in keys}

    def _one(self, key: tuple[str, float, int]) -> None:
        log = self.log(key, ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}  # logs as they come
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write(shlex.join(self.command(*key)) + "\n")
            f.flush()
            code = subprocess.run(self.command(*key), stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        self.log(key, ".wall").write_text(f"{time.perf_counter() - start:.1f} {code}\n")

    def _result(self, key: tuple[str, float, int]) -> dict:
        run = self.folder(*key) / "run.json"
        if not run.exists():
            log = self.log(key, ".log")
            tail = log.read_text().strip().splitlines()[-1:] if log.exists() else ["not run"]
            return {"error": tail[0] if tail else "failed", "log": str(log.relative_to(self.out))}
        result = json.loads(run.read_text())
        wall = self.log(key, ".wall")
        result["wall_seconds"] = float(wall.read_text().split()[0]) if wall.exists() else None
        result["folder"] = str(self.folder(*key).relative_to(self.out))  # results.json moves with its folder
        return result


def _lr(lr: float) -> str:
    return f"{lr:g}"


def _metric(result: dict, metric: str) -> float:
    return result["after"][metric] if "after" in result else math.nan


def _best(by_lr: dict[str, float], metric: str, losses: dict[str, float]) -> float:
    """The learning rate of the best finished run (NaN, a failed or diverged run, never wins);
    a tie (short runs that all predict the majority class) goes to the lower held-out loss."""
    finite = {lr: v for lr, v in by_lr.items() if math.isfinite(v)}
    if not finite:
        return float(next(iter(by_lr)))
    sign = 1 if metric in _LOWER_IS_BETTER else -1
    return float(min(finite, key=lambda lr: (sign * finite[lr], losses.get(lr, math.inf))))


def _summary(result: dict) -> dict:
    if "error" in result:
        return result
    return {"before": result["before"], "after": result["after"], "train_seconds": result["train_seconds"],
            "wall_seconds": result["wall_seconds"], "trainable_parameters": result.get("trainable_parameters"),
            "folder": result["folder"]}


def table(report: dict) -> str:
    """Markdown: one row per method, each held-out metric's mean ± standard deviation over seeds."""
    by_method = _by_method(report["runs"])
    done = [r for r in report["runs"] if "after" in r]
    metrics = [k for k in (done[0]["after"] if done else {}) if k != "users"]
    lines = ["| method | trainable params | lr | seeds | " + " | ".join(metrics) + " | train s | run s |",
             "|---|---:|---:|---:|" + "---:|" * (len(metrics) + 2)]
    for method, runs in by_method.items():
        ok = [r for r in runs if "after" in r]
        if not ok:
            lines.append(f"| {method} | | {runs[0]['lr']:g} | 0 | " + " | ".join("failed" for _ in metrics) + " | |")
            continue
        cells = [_mean_spread([r["after"][k] for r in ok]) for k in metrics]
        lines.append(f"| {method} | {ok[0]['trainable_parameters'] or 0:,} | {runs[0]['lr']:g} | {len(ok)} | "
                     + " | ".join(cells) + f" | {statistics.median(r['train_seconds'] for r in ok):.1f} | "
                     f"{statistics.median(r['wall_seconds'] or math.nan for r in ok):.0f} |")
    walls = [r["wall_seconds"] for r in done if r.get("wall_seconds")]
    lines.append(f"\nMedians over seeds: training steps (train s) and the whole run with loading and both "
                 f"evaluations (run s), one CPU thread each. {len(done)} runs here took {sum(walls) / 60:.0f} "
                 "CPU-thread minutes in all.")
    before = done[0]["before"] if done else {}
    lines.append(f"\nBefore training (seed {done[0]['seed'] if done else '-'}): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in before.items() if k != "users"))
    if report["sweep"]:
        rates = report["lrs_tried"]
        lines += ["", f"Learning rates tried on seed {report['seeds'][0]} (held-out {report['metric']}; "
                      "the best is kept):", "", "| method | " + " | ".join(_lr(r) for r in rates) + " |",
                  "|---|" + "---:|" * len(rates)]
        lines += [f"| {m} | " + " | ".join(f"{v[_lr(r)]:.4f}" for r in rates) + " |"
                  for m, v in report["sweep"].items()]
    return "\n".join(lines + _users_table(by_method, report["metric"])) + "\n"


def _per_user(by_method: dict[str, list[dict]], metric: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Held-out `metric` per user, mean over seeds: before training, and after each method
    (methods without per-user metrics left out; both empty without users)."""
    def mean(per_seed: list[dict]) -> dict[str, float]:
        users = sorted({u for s in per_seed for u in s})
        return {u: statistics.mean(s[u][metric] for s in per_seed if u in s) for u in users}
    runs = [r for rs in by_method.values() for r in rs if "users" in r.get("after", {})]
    first = {r["seed"]: r for r in reversed(runs)}  # the seed's held-out split: the same before any method
    after = {m: mean([r["after"]["users"] for r in rs if "users" in r.get("after", {})]) for m, rs in by_method.items()}
    return mean([r["before"]["users"] for r in first.values()]), {m: v for m, v in after.items() if v}


def _users_table(by_method: dict[str, list[dict]], metric: str) -> list[str]:
    """Per user: held-out `metric` before and after each method, and how many users each method serves best."""
    before, after = _per_user(by_method, metric)
    if not after:
        return []
    sign = 1 if metric in _LOWER_IS_BETTER else -1
    best = {u: min(after, key=lambda m: sign * after[m].get(u, sign * math.inf)) for u in before}
    lines = ["", f"Held-out {metric} per user (mean over seeds; before: the same held-out rows untrained; "
                 "* the best method for that user):", "",
             "| user | before | " + " | ".join(after) + " |", "|---|---:|" + "---:|" * len(after)]
    for u in before:
        cells = [f"{v[u]:.4f}" + ("*" if best[u] == m else "") if u in v else "" for m, v in after.items()]
        lines.append(f"| {u} | {before[u]:.4f} | " + " | ".join(cells) + " |")
    # every user counts once here; the overall table above weighs users by their held-out tokens or rows
    lines.append(f"| mean over users | {statistics.mean(before.values()):.4f} | "
                 + " | ".join(f"{statistics.mean(v.values()):.4f}" for v in after.values()) + " |")
    lines.append("| best for | | " + " | ".join(f"{sum(b == m for b in best.values())} of {len(best)} users"
                                              for m in after) + " |")
    return lines


def users_plot(out: Path, runs: list[dict], metric: str) -> bool:
    """users.png: each user's held-out `metric` after each method, less before (mean over seeds)."""
    from matplotlib.figure import Figure  # no pyplot: headless (Agg)

    before, after = _per_user(_by_method(runs), metric)
    if not after:
        return False
    users = list(before)
    fig = Figure(figsize=(9, 0.32 * len(users) * len(after) ** 0.5 + 1.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(after)
    for i, (method, values) in enumerate(after.items()):
        ax.barh([j + (i - (len(after) - 1) / 2) * height for j in range(len(users))],
                [values.get(u, math.nan) - before[u] for u in users], height, label=method, color=f"C{i}")
    ax.set_yticks(range(len(users)), users, fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    better = "lower" if metric in _LOWER_IS_BETTER else "higher"
    ax.set(xlabel=f"held-out {metric} after training minus before (mean over seeds; {better} is better)",
           title=f"each user's held-out {metric}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "users.png")
    return True


def _by_method(runs: list[dict]) -> dict[str, list[dict]]:
    """method -> its runs, methods in the order they first appear."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    return by_method


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def curves(out: Path, runs: list[dict], metric: str) -> None:
    """curves.png: each method's training loss (mean over seeds, smoothed) and held-out `metric`."""
    from matplotlib.figure import Figure  # no pyplot: headless (Agg)

    fig = Figure(figsize=(14, 5), dpi=100)
    train_ax, eval_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    by_method = _by_method([r for r in runs if "folder" in r])  # finished runs: their histories
    colors = [f"C{i}" for i in range(10)] + ["black", "tab:olive", "tab:cyan"]
    for (method, mine), color in zip(by_method.items(), colors):
        histories = [[json.loads(line) for line in open(out / r["folder"] / "metrics.jsonl")] for r in mine]
        losses = [[h["loss"] for h in hist if h["split"] == "train"] for hist in histories]
        length = min(map(len, losses))
        mean = [statistics.mean(seq[i] for seq in losses) for i in range(length)]
        window = max(1, length // 10)
        smooth = [statistics.mean(mean[max(0, i - window + 1):i + 1]) for i in range(length)]
        style = "--" if method.endswith("-merged") else "-"
        train_ax.plot(range(1, length + 1), smooth, style, color=color, label=method)
        evals = [[(h["step"], h[metric]) for h in hist if h["split"] == "eval"] for hist in histories]
        points = min(map(len, evals))
        eval_ax.plot([evals[0][i][0] for i in range(points)],
                     [statistics.mean(e[i][1] for e in evals) for i in range(points)], "o" + style, color=color,
                     label=method, markersize=3)
    train_ax.set(xlabel="step", ylabel="training loss (mean over seeds, smoothed)", title="training")
    eval_ax.set(xlabel="step", ylabel=f"held-out {metric} (mean over seeds)", title="held-out")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
    eval_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "curves.png")
