"""`colaft bench startup`: how long a command takes before it does anything.

Each case runs in a fresh interpreter (nothing imported yet, as a user's shell starts it), the
cases interleaved round by round so that a busy machine weighs on all alike; the report gives
the median wall time of each and `python -X importtime`'s largest imports of `colaft --help`.
"""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from colaft.bench.harness import describe, machine, write_report

CLI = [sys.executable, "-m", "colaft.app.cli"]  # the console script's entry point, whatever the PATH holds
CASES: dict[str, list[str]] = {
    "colaft --help": [*CLI, "--help"],
    "colaft train --help": [*CLI, "train", "--help"],
    'python -c "import colaft"': [sys.executable, "-c", "import colaft"],
}
TARGETS = {"colaft --help": 1.0, "colaft train --help": 1.5}
"""Seconds a case should stay under on a 2-core machine (ARCHITECTURE.md: heavy imports where used)."""


def time_once(argv: list[str]) -> float:
    """Wall seconds of one fresh process; raises if it fails."""
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()[-500:]}")
    return seconds


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_offenders(argv: list[str], top: int = 8) -> list[dict]:
    """The largest imports of `argv` (python -X importtime): top-level packages by cumulative time."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv[1:]], capture_output=True, text=True,
                            timeout=300)
    rows = []
    for line in result.stderr.splitlines():
        if m := _IMPORT_LINE.match(line):
            self_us, cumulative_us, indent, name = int(m[1]), int(m[2]), len(m[3]), m[4]
            if indent <= 1:  # imported by the program itself, not from inside another package
                rows.append({"module": name, "cumulative_ms": cumulative_us / 1000, "self_ms": self_us / 1000})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


def run_startup(runs: int, out: Path, command: str, log: Callable[[str], None] = print) -> dict:
    """Time every case `runs` times, interleaved; write startup.md and startup.json under `out`."""
    times: dict[str, list[float]] = {name: [] for name in CASES}
    time_once(CASES["colaft --help"])  # untimed: the files into the page cache
    for i in range(runs):
        for name, argv in CASES.items():
            times[name].append(time_once(argv))
        log(f"round {i + 1}/{runs}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    medians = {name: statistics.median(t) for name, t in times.items()}
    data = {"command": command, "machine": machine("cpu"), "runs": runs, "seconds": times, "medians": medians,
            "targets": TARGETS, "offenders": import_offenders(CASES["colaft --help"])}
    write_report(out, "startup", summary(data), data)
    return data


def summary(data: dict) -> str:
    """The markdown report."""
    lines = ["# Startup", "", f"`{data['command']}` on {describe(data['machine'])}; median of {data['runs']} fresh "
             "processes each, interleaved.", "", "| command | median (s) | min (s) | target (s) |", "|---|---|---|---|"]
    for name, median in data["medians"].items():
        target = data["targets"].get(name)
        lines.append(f"| `{name}` | {median:.2f} | {min(data['seconds'][name]):.2f} | "
                     f"{'' if target is None else f'< {target:g}'} |")
    lines += ["", "Largest imports of `colaft --help` (`python -X importtime`, top-level packages):", "",
              "| module | cumulative (ms) | self (ms) |", "|---|---|---|"]
    lines += [f"| {r['module']} | {r['cumulative_ms']:.0f} | {r['self_ms']:.0f} |" for r in data["offenders"]]
    return "\n".join(lines)
