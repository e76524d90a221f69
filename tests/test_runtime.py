"""The runtime's machine: the server's threads (OMP_NUM_THREADS wins, never more than the idle cores),
the default number of fit workers, the default device, a thread that yields the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from colaft import runtime


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def busy(monkeypatch, percent: float) -> None:
    """Every core of the machine `percent` busy, as psutil will measure it."""
    monkeypatch.setattr(runtime.psutil, "cpu_percent", lambda interval: percent)


def test_an_explicit_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    busy(monkeypatch, 100.0)  # would leave one thread
    runtime.set_threads()
    assert torch.get_num_threads() == 3


def test_threads_are_capped_by_the_idle_cores_and_the_cpus_allowed(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(64)
    busy(monkeypatch, 100.0)
    runtime.set_threads()
    assert torch.get_num_threads() == 1  # no idle core: one thread, never none
    torch.set_num_threads(64)
    busy(monkeypatch, 0.0)
    runtime.set_threads()
    assert 1 <= torch.get_num_threads() <= runtime.affinity_cpus()


def test_a_cgroup_quota_of_one_cpu_means_one_thread(monkeypatch):
    class OneCpuQuota:  # cgroup v2's cpu.max: "<quota> <period>"
        def __init__(self, path):
            pass

        def read_text(self) -> str:
            return "100000 100000\n"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "Path", OneCpuQuota)
    busy(monkeypatch, 0.0)
    torch.set_num_threads(64)
    runtime.set_threads()
    assert torch.get_num_threads() == 1


def test_default_workers_is_the_idle_cores_less_the_servers_threads_and_at_least_one(monkeypatch):
    torch.set_num_threads(1)
    busy(monkeypatch, 0.0)
    assert runtime.default_workers() == max(1, runtime.affinity_cpus() - 1)
    busy(monkeypatch, 100.0)
    assert runtime.default_workers() == 1


def test_affinity_cpus_counts_the_cpus_this_process_may_use():
    assert 1 <= runtime.affinity_cpus() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("cuda", [True, False])
def test_default_device_is_cuda_where_a_gpu_is(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert runtime.default_device() == ("cuda" if cuda else "cpu")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
def test_yield_cpu_lowers_the_calling_thread_and_what_it_starts_only():
    seen = {}

    def training():
        runtime.yield_cpu(10)
        seen["thread"] = _nice(threading.get_native_id())
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                               capture_output=True, text=True, check=True)
        seen["child"] = int(child.stdout)

    main = _nice(threading.get_native_id())
    t = threading.Thread(target=training)
    t.start()
    t.join()
    assert seen == {"thread": min(19, main + 10), "child": min(19, main + 10)}
    assert _nice(threading.get_native_id()) == main  # the caller's other threads keep theirs
