"""The process backend: settings it cannot send refused clearly, no process left behind, an idle worker's death,
a shared x sent as one tensor."""
from __future__ import annotations

import gc
import os
import signal
import time

import psutil
import pytest
import torch
from backend_helpers import build, new_children
from conftest import text_batch, tiny_llama

from colaft import ColaConfig, ColaModel, Trainer
from colaft.backends.process import ProcessBackend


def test_unpicklable_settings_are_refused_clearly():
    cm = build(["user.0"])
    with pytest.raises(ValueError, match="cannot be sent to a worker process.*no lambdas"):
        Trainer(cm, scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                backend=ProcessBackend(workers=1))


def test_close_leaves_no_process_behind():
    before = new_children()
    backend = ProcessBackend(workers=1)
    pids = set(backend.pids)
    assert pids <= new_children()
    trainer = Trainer(build(["user.0"]), backend=backend)
    trainer.step(text_batch(0))
    trainer.close()
    assert not any(psutil.pid_exists(p) for p in pids) and new_children() <= before
    forgotten = ProcessBackend(workers=1)  # never closed: its finalizer stops the worker
    pid = forgotten.pids[0]
    del forgotten
    gc.collect()
    assert not psutil.pid_exists(pid)


def test_a_worker_dying_while_idle_is_replaced():
    backend = ProcessBackend(workers=1)
    try:
        trainer = Trainer(build(["user.0"]), "sgd", lr=0.1, backend=backend)
        first = backend.pids[0]
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        state = trainer.owner_state()  # a call to a dead worker: recovered, then answered
        assert state["version"] == 0 and backend.pids[0] != first and trainer.stats["recoveries"] == 1
    finally:
        backend.close()


def test_a_shared_x_reaches_the_worker_as_one_tensor():
    """q, k, v (and gate, up) share one x: the worker's owner holds one tensor for them, as sent."""
    cm = ColaModel(tiny_llama(), ColaConfig(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]))
    trainer = Trainer(cm, "adamw", lr=1e-2, backend="process", backend_options={"workers": 1}, interval=2)
    try:
        trainer.step(text_batch(0))
        pending = trainer.owner_state()["pending"]  # the step's packets, buffered on the worker
        x = {p.site.split("layers.")[1]: p.x for p in pending}
        for layer in ("0", "1"):
            q, k, v, gate, up = (x[f"{layer}.{s}"] for s in ("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))
            assert q is k is v and gate is up and q is not gate and len(q) == 18
        assert x["0.self_attn.q_proj"] is not x["1.self_attn.q_proj"]
    finally:
        trainer.close()
