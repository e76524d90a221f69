"""The runtime's machine: how many threads the server's ops use, how many fit workers, which device."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import psutil
import torch


def default_device() -> str:
    """"cuda" where a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def affinity_cpus() -> int:
    """CPUs this process may run on: its affinity (the machine's CPUs where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads() -> None:
    """Intra-op threads: torch's default (physical cores), capped by the CPUs this process may
    use (affinity, cgroup quota) and by the cores other processes leave idle right now. A
    thread waiting for a busy core stalls every parallel op: on 2 cores with one kept busy
    elsewhere, the main job ran 3.4x slower with 2 threads than with 1. OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    allowed = affinity_cpus()
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        allowed = min(allowed, max(1, int(quota) // int(period))) if quota != "max" else allowed
    except (OSError, ValueError):
        pass
    idle = round((psutil.cpu_count() or allowed) - _busy_cores(seconds=0.2))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), allowed, idle)))


def default_workers() -> int:
    """Cores idle right now (within this process's CPU affinity) less the server's torch threads; at least 1."""
    return max(1, round(affinity_cpus() - _busy_cores(seconds=0.1)) - torch.get_num_threads())


def yield_cpu(niceness: int) -> None:
    """Lower the calling thread's CPU priority by `niceness` (Linux: a thread's nice value is its
    own, and the threads and processes it starts afterwards inherit it; elsewhere, nothing).
    A serving process's training thread calls it, so that its torch threads and fit workers
    leave a core to the API's event loop the moment a request comes in."""
    if niceness > 0 and sys.platform == "linux":
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, niceness + os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:  # e.g. a sandbox without setpriority: only latency is lost
            pass


def _busy_cores(seconds: float) -> float:
    """How many of the machine's cores all its processes kept busy over the next `seconds`."""
    return psutil.cpu_percent(interval=seconds) / 100 * (psutil.cpu_count() or affinity_cpus())
