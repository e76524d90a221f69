"""The Ray backend: its own private instance, shared by the backends of a process and gone when the last closes.

Its fits, staleness and recovery are checked with every backend's in test_base.py.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest
import ray
from backend_helpers import build, new_children
from conftest import text_batch

from colaft import Trainer
from colaft.backends.ray import RayBackend


def test_ray_backend_starts_and_stops_its_own_instance(tmp_path, monkeypatch):
    """Runs before the shared session (first Ray test of the module): nothing may remain -
    no process, no temporary files, no token in the home folder."""
    assert not ray.is_initialized(), "this test must run before the module's shared Ray session"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    before = new_children()
    backend = RayBackend(workers=1)
    assert ray.is_initialized() and new_children() - before and backend.temp_dir.is_dir()
    trainer = Trainer(build(["user.0"]), backend=backend)
    trainer.step(text_batch(0))
    # its workers run at the server's priority (Ray's default, nice 15, starves the fits the
    # server waits for whenever other work keeps the cores busy)
    assert psutil.Process(ray.get(backend.actors[0].pid.remote())).nice() == os.nice(0)
    # a second backend in the process (a service's second model) shares the instance: whichever
    # closes first, the other's actors go on, and the last to close stops Ray
    other = Trainer(build(["user.1"]), backend=RayBackend(workers=1))
    assert other.backend.temp_dir == backend.temp_dir
    trainer.close()
    assert ray.is_initialized()
    other.step(text_batch(1))
    other.flush()
    assert other.stats["version"] == 1
    with pytest.raises(ValueError, match="already runs Ray locally"):
        RayBackend(workers=1, address="127.0.0.1:1")
    other.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while new_children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not new_children() - before
    assert not any((tmp_path / "home").iterdir()) and not backend.temp_dir.exists()
