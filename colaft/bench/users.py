"""`colaft bench users`: one server step for a batch of K users, as K grows.

The same batch (B rows, e.g. 32) is split among K users (K = 1, 2, 4, ..., 32), lowrank
adapters of rank 8 for every user at the preset's sites. Timed, interleaved:

    mixed-K<k>            one server step on the whole batch, rows routed to their users
    separate-K<k>         K server steps, each on one user's rows (no mixed batches)
    collab-K<k>           the mixed step in collaborative mode (mean of the K users' deltas)
    cola-fwd-K<k>         colaft's routed forward alone (eval, no grad)
    peft-fwd-K<k>         PEFT's mixed-adapter forward (K LoRA adapters, adapter_names=[...])
    types-mixed-K<k>      (largest K) users cycling lowrank / linear / mlp: the mixed step...
    types-separate-K<k>                                                    ...and K separate steps

mixed-K1 is the single-user step (every site takes the plain path): the reference of the
K-scaling. Memory, each case in a fresh process: the peak of the mixed step above the loaded
model, personal and collaborative, against the bytes of the K users' adapters themselves.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from colaft.bench import harness
from colaft.bench.models import Preset, build_model, make_batch, parse_spec, share_weights
from colaft.config import ColaConfig
from colaft.model import ColaModel
from colaft.server import server_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_CASE = "colaft.bench.users:memory_case"
# the mixed-type case: users cycle through these (the same sites, different adapter types)
TYPES = [dict(adapter="lowrank"), dict(adapter="linear"), dict(adapter="mlp")]


@dataclass
class Settings:
    """How to measure; the command's options."""

    model: str = "minilm-l6"
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 32
    seq_len: int = 16
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    rank: int = 8
    layout: str = "blocks"
    """"blocks": each user's rows together (a batch assembled from users' requests); "interleaved": row i is
    user i % K."""
    collaborative: bool = True
    """Also time and measure the mixed step in collaborative mode."""
    types: bool = True
    """Also time the mixed-type case (largest K)."""
    peft: bool = True
    """Also time PEFT's mixed-adapter forward."""
    rounds: int = 5
    warmup: int = 1
    memory_runs: int = 2
    """Fresh processes per memory case on CPU (on CUDA one in-process run is exact); 0: no memory."""
    memory_steps: int = 2
    jobs: int = 1
    max_seconds: float | None = None
    threads: int | None = None


def user_ids(k: int) -> list[str]:
    return [f"user{i}" for i in range(k)]


def assign(k: int, rows: int, layout: str = "blocks") -> list[str]:
    """The user of every row: K users, every one with rows (as equal shares as rows allow)."""
    if not 1 <= k <= rows:
        raise ValueError(f"K={k} users need 1 <= K <= {rows} (the rows of the batch)")
    if layout == "blocks":
        return [f"user{i * k // rows}" for i in range(rows)]
    if layout == "interleaved":
        return [f"user{i % k}" for i in range(rows)]
    raise ValueError(f"layout {layout!r}: use blocks or interleaved")


def config_of(preset: Preset, rank: int, kind: dict | None = None) -> ColaConfig:
    return ColaConfig(target_modules=preset.targets, rank=rank, alpha=2.0 * rank, **(kind or {}))


def cola_users(model: nn.Module, preset: Preset, k: int, rank: int, kinds: list[dict] | None = None) -> ColaModel:
    """`model` with K users' adapters (lowrank, or cycling through `kinds`)."""
    kinds = kinds or [{}]
    users = user_ids(k)
    cm = ColaModel(model, config_of(preset, rank, kinds[0]), user=users[0])
    for i, user in enumerate(users[1:], start=1):
        cm.add_user(user, config_of(preset, rank, kinds[i % len(kinds)]))
    return cm


def adapter_bytes(cm: ColaModel) -> int:
    return sum(p.numel() * p.element_size() for s in cm.sites.values() for p in s.adapters.parameters())


def rows_of(batch: dict, users: list[str]) -> dict[str, dict]:
    """Each user's own rows of the batch (what it would send without mixed batches)."""
    out = {}
    for u in dict.fromkeys(users):
        idx = torch.tensor([i for i, v in enumerate(users) if v == u], device=batch["input_ids"].device)
        out[u] = {key: v.index_select(0, idx) for key, v in batch.items()}
    return out


def peft_users(model: nn.Module, preset: Preset, k: int, rank: int) -> nn.Module:
    """A PeftModel holding K LoRA adapters named like the users, in eval mode (PEFT's mixed batches need it)."""
    from peft import LoraConfig, get_peft_model

    from colaft.bench.server import sites_of

    targets, heads = sites_of(model, preset.targets)
    cfg = LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, target_modules=targets,
                     modules_to_save=heads or None)
    users = user_ids(k)
    pm = get_peft_model(model, cfg, adapter_name=users[0])
    for u in users[1:]:
        pm.add_adapter(u, cfg)
    return pm.eval()


# ---------------------------------------------------------------- the timed steps

def make_steps(base: nn.Module, preset: Preset, batch: dict, st: Settings,
               log: Callable[[str], None]) -> tuple[dict[str, Callable[[], object]], dict]:
    """Configuration name -> one step, all on `base`'s weights; and facts about the setup."""
    kmax = max(st.ks)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    personal = cola_users(share_weights(base), preset, kmax, st.rank)
    forward = cola_users(share_weights(base), preset, kmax, st.rank).eval()
    facts = {"sites": len(personal.sites), "adapter_bytes_per_user": adapter_bytes(personal) // kmax}
    steps: dict[str, Callable[[], object]] = {}

    def mixed(cm, users):
        return lambda: server_step(cm, batch, users=users)

    def separate(cm, users):
        parts = rows_of(batch, users)
        return lambda: [server_step(cm, rows, users=[u] * len(rows["input_ids"])) for u, rows in parts.items()]

    def no_grad(fn):
        def step():
            with torch.no_grad():
                return fn()
        return step

    for k in st.ks:
        users = assign(k, st.batch_size, st.layout)
        steps[f"mixed-K{k}"] = mixed(personal, users)
        if k > 1:  # K=1 separate is mixed-K1, and collaborative with one user is the personal step
            steps[f"separate-K{k}"] = separate(personal, users)
            if st.collaborative:
                cm = cola_users(share_weights(base), preset, k, st.rank)
                cm.set_mode("collaborative")
                steps[f"collab-K{k}"] = mixed(cm, users)
        steps[f"cola-fwd-K{k}"] = no_grad(lambda users=users: forward(**inputs, users=users))
    if st.peft:
        try:
            pm = peft_users(share_weights(base), preset, kmax, st.rank)
            for k in st.ks:
                names = assign(k, st.batch_size, st.layout)
                steps[f"peft-fwd-K{k}"] = no_grad(lambda names=names: pm(**inputs, adapter_names=names))
        except Exception as e:  # PEFT missing or refusing the model: measure the rest
            facts["peft_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  PEFT: {facts['peft_error']}")
    if st.types and kmax > 1:
        users = assign(kmax, st.batch_size, st.layout)
        cm = cola_users(share_weights(base), preset, kmax, st.rank, TYPES)
        steps[f"types-mixed-K{kmax}"] = mixed(cm, users)
        steps[f"types-separate-K{kmax}"] = separate(cm, users)
    return steps, facts


# ---------------------------------------------------------------- memory (one case per process)

def memory_case(spec: dict, loaded: Callable[[], None]) -> dict:
    """Load the model, mark it loaded, attach K users' adapters and run the mixed step `spec["steps"]` times.

    Returns the adapters' weight bytes and what attaching them took (resident set or allocator):
    the weights plus each adapter's modules and small-allocation overhead.
    """
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if not spec["device"].startswith("cuda"):
        harness.pin_malloc_threshold()  # the peak RSS then follows the live tensors (see there)
    _, preset = parse_spec(spec["model"])
    device = spec["device"]
    model = build_model(preset, device, DTYPES[spec["dtype"]])
    batch = make_batch(preset, spec["batch_size"], spec["seq_len"], device)
    users = assign(spec["k"], spec["batch_size"], spec["layout"])
    loaded()
    before = _in_use(device)
    cm = cola_users(model, preset, spec["k"], spec["rank"])
    attached = _in_use(device) - before
    if spec["mode"] == "collaborative":
        cm.set_mode("collaborative")
    for _ in range(spec["steps"]):
        server_step(cm, batch, users=users)
    return {"adapter_bytes": adapter_bytes(cm), "attached_bytes": attached}


def _in_use(device: str) -> int:
    """Bytes in use now: the allocator's on CUDA, the resident set on CPU."""
    gc.collect()
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return harness._status_kib("VmRSS") * 1024


def memory_specs(st: Settings, label: str) -> dict[str, dict]:
    common = {"model": label, "device": st.device, "dtype": st.dtype, "batch_size": st.batch_size,
              "seq_len": st.seq_len, "rank": st.rank, "layout": st.layout, "steps": st.memory_steps,
              "threads": st.threads}
    modes = ["personal"] + (["collaborative"] if st.collaborative else [])
    # collaborative with one user is the personal step: K=1 is their shared reference
    return {f"{mode}-K{k}": {**common, "k": k, "mode": mode}
            for mode in modes for k in st.ks if k > 1 or mode == "personal"}


def measure_memory(st: Settings, label: str, log: Callable[[str], None]) -> dict[str, dict]:
    """Case name -> {"peak_bytes", "runs", "adapter_bytes", "attached_bytes", "error"} (medians over runs)."""
    specs = memory_specs(st, label)
    if st.device.startswith("cuda"):
        log(f"  memory: {len(specs)} cases in this process (CUDA allocator)")
        memory = harness.in_process_memory(MEMORY_CASE, specs, log=log)
    else:
        log(f"  memory: {len(specs)} cases x {st.memory_runs} fresh processes")
        memory = harness.fresh_process_memory(MEMORY_CASE, specs, st.memory_runs, st.jobs, log=log)
    out = {}
    for name, m in memory.items():
        out[name] = {"peak_bytes": m.median, "runs": m.runs, "error": m.error,
                     "adapter_bytes": _median([e.get("adapter_bytes") for e in m.extra]),
                     "attached_bytes": _median([e.get("attached_bytes") for e in m.extra]),
                     "attached_runs": [e.get("attached_bytes") for e in m.extra]}
    return out


def _median(values: list) -> int | None:
    values = [v for v in values if v is not None]
    return int(statistics.median(values)) if values else None


# ---------------------------------------------------------------- the run

def run_users(st: Settings, out: Path, command: str = "", log: Callable[[str], None] = print) -> dict:
    """Time and measure every configuration; writes users-<model>.md and .json under `out`.

    Returns:
        the JSON data written.
    """
    from colaft.bench.users_report import markdown, rows

    start = time.perf_counter()
    if st.threads:
        torch.set_num_threads(st.threads)
    label, preset = parse_spec(st.model)
    if max(st.ks) > st.batch_size:
        raise ValueError(f"K up to {max(st.ks)} needs at least that many rows (--batch-size {st.batch_size})")
    info = harness.machine(st.device)
    log(f"{label} {st.device} {st.dtype}: batch {st.batch_size}x{st.seq_len}, K in {st.ks}")
    base = build_model(preset, st.device, DTYPES[st.dtype])
    batch = make_batch(preset, st.batch_size, st.seq_len, st.device)
    steps, facts = make_steps(base, preset, batch, st, log)
    log(f"  timing {len(steps)} configurations, {st.rounds} rounds")
    timings = harness.interleaved(steps, st.rounds, st.warmup, st.device, max_seconds=st.max_seconds, log=log)
    del steps
    memory = measure_memory(st, label, log) if st.memory_runs > 0 else {}
    data = {"machine": info, "command": command, "settings": st.__dict__, "model": label, "task": preset.task,
            "targets": preset.targets, **facts,
            "time": {n: {"median_s": timings.median(n), "samples": timings.samples[n]} for n in timings.samples},
            "errors": timings.errors, "memory": memory}
    data.update(rows(data, timings))
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["loadavg_end"] = harness.machine(st.device).get("loadavg")
    harness.write_report(out, f"users-{_stem(label)}", markdown(data), data)
    return data


def _stem(label: str) -> str:
    return label.replace(":", "_").replace(",", "_").replace("=", "-")
