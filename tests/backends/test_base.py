"""Offload backends: exact against inline and backprop, staleness, lost workers, bad input, nothing left behind.

Worker processes and Ray actors import colaft when they start (a few seconds each), so every
test starts few of them; the Ray tests share one private Ray instance (module scope).
"""
from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import time

import psutil
import pytest
import torch
from conftest import ARCHS, Backprop, flat_state, make_opt, max_rel_err, randomize_, text_batch
from test_users import build_users
from tiny_models import review_records, write_jsonl

from colaft import ColaConfig, ColaModel, Packet, Trainer
from colaft.app.cli import main
from colaft.backends import BACKENDS, WorkerError, make_backend
from colaft.backends import ray as ray_backend
from colaft.backends.process import ProcessBackend
from colaft.backends.shm import Incoming, Outgoing

REMOTE = ["process", "ray"]
KINDS = {"user.0": dict(adapter="lowrank", rank=4), "user.1": dict(adapter="linear"),
         "user.2": dict(adapter="mlp", hidden=8)}


def new_children() -> set[int]:
    """Child processes of this one, except multiprocessing's resource tracker (started once by
    the first spawned process, shared by all later ones, ended with this process)."""
    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                out.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


# ---------------------------------------------------------------- the shared-memory transport

def test_shm_round_trip_keeps_identity_aliasing_and_reuses_buffers():
    out, inc = Outgoing(), Incoming()
    x = torch.randn(10, 4)
    w = torch.nn.Parameter(torch.randn(3, 3))
    obj = {"a": x, "view": x[2:5, 1:], "again": x, "w": w, "ws": [w], "ids": torch.arange(5), "none": None}
    packed = out.pack(obj)
    assert packed.shared is not None and packed.nbytes >= x.numel() * 4  # x's storage once, not three times
    got = inc.unpack(packed)
    assert got["a"] is got["again"] and got["w"] is got["ws"][0]  # one object each, as pickle would keep
    assert isinstance(got["w"], torch.nn.Parameter) and got["w"].requires_grad
    assert torch.equal(got["view"], x[2:5, 1:]) and got["view"].data_ptr() - got["a"].data_ptr() == (2 * 4 + 1) * 4
    assert torch.equal(got["ids"], obj["ids"]) and got["ids"].dtype == torch.int64
    got["a"].add_(1)  # a private copy: the sender's tensor and the buffer are untouched
    assert torch.equal(obj["a"], x) and not torch.equal(got["a"], x)
    out.release(packed.buffer)
    again = out.pack(obj)
    assert again.buffer == packed.buffer and again.shared is None  # reused, and the receiver has it mapped
    out.release(again.buffer)
    bigger = out.pack(torch.randn(4096))
    assert bigger.buffer != packed.buffer and bigger.forget == [packed.buffer]  # outgrown: dropped on both sides
    inc.unpack(bigger)
    assert list(inc.buffers) == [bigger.buffer]
    assert out.pack({"no": "tensors"}).buffer is None


# ---------------------------------------------------------------- Ray: its own instance

def test_ray_backend_starts_and_stops_its_own_instance(tmp_path, monkeypatch):
    """Runs before the shared session (first Ray test of the module): nothing may remain -
    no process, no temporary files, no token in the home folder."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized(), "this test must run before the module's shared Ray session"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    before = new_children()
    backend = ray_backend.RayBackend(workers=1)
    assert ray.is_initialized() and new_children() - before and backend.temp_dir.is_dir()
    trainer = Trainer(build(["user.0"]), backend=backend)
    trainer.step(text_batch(0))
    # its workers run at the server's priority (Ray's default, nice 15, starves the fits the
    # server waits for whenever other work keeps the cores busy)
    assert psutil.Process(ray.get(backend.actors[0].pid.remote())).nice() == os.nice(0)
    # a second backend in the process (a service's second model) shares the instance: whichever
    # closes first, the other's actors go on, and the last to close stops Ray
    other = Trainer(build(["user.1"]), backend=ray_backend.RayBackend(workers=1))
    assert other.backend.temp_dir == backend.temp_dir
    trainer.close()
    assert ray.is_initialized()
    other.step(text_batch(1))
    other.flush()
    assert other.stats["version"] == 1
    with pytest.raises(ValueError, match="already runs Ray locally"):
        ray_backend.RayBackend(workers=1, address="127.0.0.1:1")
    other.close()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while new_children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not new_children() - before
    assert not any((tmp_path / "home").iterdir()) and not backend.temp_dir.exists()


# ---------------------------------------------------------------- backends under test

@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One private Ray instance for this module's Ray tests, started as the backend starts its own."""
    pytest.importorskip("ray")
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # anything Ray writes to the home folder would show here
        local = ray_backend.start_local(tmp_path_factory.mktemp("ray"), num_cpus=4)
        yield home
        local.stop()


@pytest.fixture
def remote(request):
    """make(workers) -> a backend of the parametrised kind."""
    name = request.param
    if name == "ray":
        request.getfixturevalue("ray_session")
    made = []

    def make(workers: int):
        made.append(make_backend(name, workers=workers))
        return made[-1]
    yield make
    for backend in made:
        backend.close()


def kill(backend, user: str) -> None:
    """Kill the worker hosting `user` the hard way: SIGKILL of the process, ray.kill of the actor."""
    if isinstance(backend, ProcessBackend):
        os.kill(backend.pid_of(user), signal.SIGKILL)
    else:
        import ray
        ray.kill(backend.actor_of(user))


def build(users=("user.0", "user.1"), seed: int = 0) -> ColaModel:
    return build_users("llama", list(users), [KINDS[u] for u in users], seed)


def batch(step: int, users: list[str]) -> tuple[dict, list[str]]:
    rows = 2 * len(users)
    lengths = [3 + (step + i) % 4 for i in range(rows)]  # padding differs by row
    return text_batch(step, "lm", lengths), [users[(i + step) % len(users)] for i in range(rows)]


def train(trainer: Trainer, steps: int, users: list[str], hook=None) -> Trainer:
    for step in range(steps):
        trainer.step(*batch(step, users))
        if hook:
            hook(step)
    trainer.flush()
    return trainer


def start(backend, users=("user.0", "user.1"), interval2: str | None = "user.2", **kw) -> Trainer:
    """A trainer over `users`, plus `interval2` added late with interval 2 (an mlp adapter)."""
    trainer = Trainer(build(users), "adamw", lr=1e-2, backend=backend, **kw)
    if interval2:
        trainer.add_user(interval2, ColaConfig(target_modules=ARCHS["llama"][1], **KINDS[interval2]), interval=2)
    return trainer


def states(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{u}/{k}": v for u in trainer.model.users for k, v in flat_state(trainer.model.user_adapters(u)).items()}


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_remote_fits_equal_inline_and_backprop(remote):
    """S = 0, three users of mixed adapter types on two workers, one user with interval 2."""
    users = ["user.0", "user.1", "user.2"]
    ref = Backprop(ARCHS["llama"][0](), dict(build().user_adapters("user.0")), make_opt("adamw", 1e-2))
    inline = train(start("inline"), 5, users)
    backend = remote(2)
    got = train(start(backend), 5, users)
    assert max_rel_err(states(got), states(inline)) == 0.0  # bit for bit
    assert len({backend.where[u] for u in users}) == 2  # the users were spread over both workers
    assert got.stats["version"] == inline.stats["version"] == 5 + 5 + 3  # two fits of 2 steps and a flush
    for step in range(5):  # user.0 alone against backprop on its rows
        b, rows = batch(step, users)
        mine = [i for i, u in enumerate(rows) if u == "user.0"]
        ref.step({k: v[mine] for k, v in b.items()})
    assert max_rel_err(flat_state(got.model.user_adapters("user.0")), flat_state(ref.adapters)) <= 1e-5
    assert got.owner_state("user.2")["version"] == 3
    assert got.stats["transfer_seconds"] > 0 and got.stats["snapshot_bytes"] > 0


@pytest.mark.parametrize("staleness", [0, 1, 2])
def test_delayed_inline_runs_exactly_s_steps_ahead(staleness):
    trainer = Trainer(build(["user.0"]), "sgd", lr=0.1, backend=make_backend("inline", delayed=True),
                      staleness=staleness)
    for t in range(1, 5):
        trainer.step(text_batch(t))
        assert trainer.stats["version"] == max(0, t - staleness)  # the update of step t is used from t + S + 1
    trainer.flush()
    assert trainer.stats["version"] == 4
    if staleness == 0:  # nothing held back: plain inline
        plain = Trainer(build(["user.0"]), "sgd", lr=0.1)
        for t in range(1, 5):
            plain.step(text_batch(t))
        assert max_rel_err(states(trainer), states(plain)) == 0.0


def test_one_step_late_updates_are_delayed_gradient_descent():
    """S = 1 with linear adapters and SGD, against plain autograd: step t's gradient is taken
    at the weights the server had (those after step t - 2) and applied to the owner's (after
    step t - 1). For a linear adapter dg/dw does not depend on w, so ColA's fit is exactly that."""
    factory, targets, _ = ARCHS["llama"]
    cm = ColaModel(factory(), ColaConfig(target_modules=targets, adapter="linear"))
    for i, adapter in enumerate(cm.adapters().values()):
        randomize_(adapter, seed=i)
    ref = Backprop(factory(), dict(cm.adapters()), make_opt("sgd", 0.0))  # its forward and gradients only
    versions = [{n: {k: v.detach().clone() for k, v in a.state_dict().items()} for n, a in ref.adapters.items()}]
    lr = 0.5
    trainer = Trainer(cm, "sgd", lr=lr, backend=make_backend("inline", delayed=True), staleness=1)
    for t in range(1, 7):
        trainer.step(text_batch(t))
        for n, a in ref.adapters.items():
            a.load_state_dict(versions[max(0, t - 2)][n])  # the server's weights at step t
            a.zero_grad(set_to_none=True)
        ref.loss(text_batch(t)).backward()
        versions.append({n: {k: versions[-1][n][k] - lr * p.grad for k, p in a.named_parameters()}
                         for n, a in ref.adapters.items()})
    trainer.flush()
    want = {f"{n}.{k}": v for n, state in versions[-1].items() for k, v in state.items()}
    assert max_rel_err(flat_state(cm.adapters()), want) <= 1e-6
    assert max_rel_err(flat_state(cm.adapters()), {f"{n}.{k}": v for n, state in versions[-2].items()
                                                    for k, v in state.items()}) > 1e-3  # it did move


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_staleness_one_sends_the_next_step_before_the_fit_is_done(remote):
    """With S = 1 the server returns from a step while its fit is still in flight; with one
    user that is exactly the delayed inline trajectory (updates one step late, every step)."""
    runs = []
    for backend in (make_backend("inline", delayed=True), remote(1)):
        trainer = Trainer(build(["user.0"]), "adamw", lr=1e-2, backend=backend, staleness=1, fit_steps=20)
        track = trainer.pipeline.tracks["user.0"]
        trainer.step(text_batch(0))
        assert track.outstanding == 1 and trainer.stats["version"] == 0  # not waited for
        for s in range(1, 4):
            trainer.step(text_batch(s))
            assert track.outstanding == 1 and trainer.stats["version"] == s
        trainer.flush()
        assert track.outstanding == 0 and trainer.stats["version"] == 4
        runs.append(trainer)
    assert max_rel_err(states(runs[1]), states(runs[0])) == 0.0


# ---------------------------------------------------------------- faults

@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_killed_workers_lose_no_update_and_apply_none_twice(remote):
    """A worker killed between steps (two users on it, one mid-interval) and another killed
    with a fit in flight: the run equals an uninterrupted one."""
    users = ["user.0", "user.1", "user.2"]
    inline = train(start("inline"), 7, users)
    backend = remote(2)
    trainer = start(backend)
    assert backend.where["user.0"] == backend.where["user.2"] != backend.where["user.1"]
    submit, killed = backend.submit, []

    def submit_then_kill(msg):  # kill user.1's worker right after its push #5 went out
        submit(msg)
        if msg.user == "user.1" and msg.seq == 5 and not killed:
            killed.append(msg.seq)
            kill(backend, "user.1")
    backend.submit = submit_then_kill

    def between(step):
        if step == 2:  # user.2 holds one buffered push (interval 2): it must be replayed
            kill(backend, "user.0")
    train(trainer, 7, users, hook=between)
    assert killed == [5] and trainer.stats["recoveries"] == 2
    assert max_rel_err(states(trainer), states(inline)) == 0.0
    assert trainer.stats["version"] == inline.stats["version"]  # every update applied once
    assert {u: t.version for u, t in trainer.pipeline.tracks.items()} == {"user.0": 7, "user.1": 7, "user.2": 4}


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_non_finite_packets_never_reach_an_adapter(remote):
    scale = [1.0]
    loss_fn = lambda out, b: out.loss * scale[0]
    runs = []
    for backend in ("inline", remote(1)):
        trainer = Trainer(build(["user.0"]), "adamw", lr=1e-2, backend=backend, loss_fn=loss_fn)
        for s in range(4):
            scale[0] = float("nan") if s == 2 else 1.0
            loss = trainer.step(text_batch(s))
            assert math.isfinite(loss) == (s != 2)
        assert trainer.stats["skipped_fits"] == 1 and trainer.stats["version"] == 3
        runs.append(trainer)
    assert max_rel_err(states(runs[1]), states(runs[0])) == 0.0
    state = runs[1].owner_state()
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


@pytest.mark.parametrize("remote", REMOTE, indirect=True)
def test_an_exception_in_a_worker_is_raised_in_the_server(remote):
    trainer = Trainer(build(["user.0"]), backend=remote(1))
    trainer.step(text_batch(0))
    trainer.pipeline.push("user.0", [Packet("no.such.site", torch.randn(3, 16), torch.randn(3, 16), "user.0")])
    for _ in range(2):  # and again: an unanswered message must not turn into a hang
        with pytest.raises(WorkerError, match=r"(?s)push #2 of user 'user.0'.*KeyError.*no\.such\.site"):
            trainer.pipeline.settle()
    trainer.close(wait=False)


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


# ---------------------------------------------------------------- Ray addresses, the registry

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "10.255.255.1:6379"])
def test_an_unreachable_ray_address_fails_within_seconds(address):
    pytest.importorskip("ray")
    address = address.format(port=_free_port())  # nothing listens there / nothing routes there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster reachable at {address}"):
        ray_backend.RayBackend(address=address, connect_timeout=2.0)
    assert time.monotonic() - start < 4.0
    with pytest.raises(ValueError, match="HOST:PORT"):
        ray_backend.RayBackend(address="no-port-here")


def test_a_running_ray_cluster_passes_the_address_check(ray_session):
    import ray
    ray_backend.check_reachable(ray.get_runtime_context().gcs_address, timeout=5.0)


def test_backend_registry():
    assert set(BACKENDS) >= {"inline", "process", "ray"}
    with pytest.raises(ValueError, match="unknown backend 'carrier-pigeon'"):
        make_backend("carrier-pigeon")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ProcessBackend(workers=0)


# ---------------------------------------------------------------- the command line

@pytest.fixture
def cli_args(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_records(3))
    return ["train", "--model", str(tiny_bert_dir), "--data", str(reviews), "--text-field", "review",
            "--label-field", "sentiment", "--batch-size", "8", "--max-steps", "4"]


def test_cli_trains_on_worker_processes_and_stops_them(cli_args, tmp_path, capsys):
    before = new_children()
    out = tmp_path / "run"
    offload = ["--backend", "process", "--workers", "1", "--staleness", "1", "--transfer-dtype", "bfloat16"]
    assert main([*cli_args, "--lr", "0.01", *offload, "--out", str(out)]) == 0
    options = json.loads((out / "run.json").read_text())["options"]
    assert (options["backend"], options["workers"], options["staleness"]) == ("process", 1, 1)
    assert new_children() <= before
    # a run that fails mid-training (the loss diverges) stops its workers too
    assert main([*cli_args, "--lr", "1e30", *offload, "--out", str(tmp_path / "nan")]) == 1
    assert "the loss is nan" in capsys.readouterr().err and new_children() <= before


@pytest.mark.parametrize("extra, message", [
    (["--backend", "pigeon"], "--backend 'pigeon': use one of inline, process, ray"),
    (["--workers", "2"], "--workers: a number >= 1, with --backend process or ray"),
    (["--ray-address", "10.0.0.1:6379"], "--ray-address needs --backend ray"),
    (["--staleness", "-1"], "--staleness must be >= 0"),
    (["--transfer-dtype", "int8"], "--transfer-dtype 'int8': use one of float32, bfloat16"),
])
def test_cli_offload_options_are_checked(cli_args, tmp_path, capsys, extra, message):
    assert main([*cli_args, *extra, "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
