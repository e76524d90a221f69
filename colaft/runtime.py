"""The runtime's machine: how many threads the server's ops use, how many fit workers, which device."""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch


def default_device() -> str:
    """"cuda" where a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads() -> None:
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


def default_workers() -> int:
    """Cores idle right now (within this process's CPU affinity) less the server's torch threads; at least 1."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = psutil.cpu_percent(interval=0.1) / 100 * (psutil.cpu_count() or allowed)
    return max(1, round(allowed - busy) - torch.get_num_threads())
