"""`colaft bench server`: the server's time and memory per training step, ColA against PEFT.

Same model, batch and target modules for every configuration:

    floor                the frozen base: forward, loss, dL/dh at the sites; no adapter at all
    peft-lora            real PEFT LoRA: forward, backward, AdamW step
    full-ft              full fine-tuning of the target layers (plain torch, AdamW)
    cola-<adapter>       ColA's server step alone (server_step), adapters unmerged
    cola-<adapter>-merged                          ...run on W + delta_W
  timed only:
    cola-...+fit         the server step plus the fit and the update, in this process

The floor is the least any adapter method can cost: ColA's server step computes the same
dL/dh and additionally runs the adapters (or W + delta_W) and emits the packets.
"""
from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from colaft.bench import harness
from colaft.bench.models import Preset, build_model, make_batch, parse_spec, share_weights
from colaft.bench.server_report import Run, header, plot_run, run_markdown
from colaft.config import ColaConfig
from colaft.fitting import fit
from colaft.model import ColaModel
from colaft.packets import Packet
from colaft.server import server_step
from colaft.sites import select_sites
from colaft.trainer import Trainer

COLA = [("lowrank", False), ("lowrank", True), ("linear", False), ("linear", True), ("mlp", False)]
CONFIGS = ["floor", "peft-lora", "full-ft"] + [f"cola-{a}{'-merged' if m else ''}" for a, m in COLA]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_CASE = "colaft.bench.server:memory_case"
LR = 1e-4


@dataclass
class Options:
    """What every configuration of one run shares."""

    targets: list[str] | str
    rank: int = 8
    alpha: float = 16.0


@dataclass
class Setup:
    """One configuration, ready to step."""

    step: Callable[[], object]
    trainable: int
    """Parameters with requires_grad on the server."""
    cola: ColaModel | None = None


def sites_of(model: nn.Module, targets) -> tuple[list[str], list[str]]:
    """ColA's target and head sites: every configuration adapts exactly these modules."""
    return select_sites(model, targets, ColaConfig(target_modules=targets).heads)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _optimizer_step(model: nn.Module, batch: dict) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def floor_setup(model: nn.Module, batch: dict, names: list[str]) -> Setup:
    """The frozen base, back-propagated to the first sites' outputs.

    Nothing upstream of the first sites needs a gradient, so their outputs become the leaves
    of the graph (captured by forward hooks); the backward to them passes through every site
    and computes each dL/dh on the way, without keeping any - the least any method can do.
    """
    model.requires_grad_(False)
    roots: list[torch.Tensor] = []

    def capture(module, args, out):
        if not out.requires_grad:  # a first site: nothing upstream needs a gradient
            out = out.detach().requires_grad_()
            roots.append(out)
        return out

    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(capture)

    def step():
        loss = model(**batch).loss
        torch.autograd.backward(loss, inputs=roots)
        roots.clear()
    return Setup(step, 0)


def lora_setup(model: nn.Module, batch: dict, targets: list[str], heads: list[str], opts: Options) -> Setup:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=0.0, target_modules=targets,
                     modules_to_save=heads or None)
    peft_model = get_peft_model(model, cfg)
    return Setup(_optimizer_step(peft_model, batch), _trainable(peft_model))


def full_setup(model: nn.Module, batch: dict, names: list[str]) -> Setup:
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)
    return Setup(_optimizer_step(model, batch), _trainable(model))


def cola_setup(model: nn.Module, batch: dict, adapter: str, merged: bool, opts: Options, with_fit: bool) -> Setup:
    cola = ColaModel(model, ColaConfig(target_modules=opts.targets, adapter=adapter, merge=merged,
                                       rank=opts.rank, alpha=opts.alpha))
    if not with_fit:
        return Setup(lambda: server_step(cola, batch), cola.trainable_parameters(), cola)
    trainer = Trainer(cola, "adamw", lr=LR)
    return Setup(lambda: trainer.step(batch), cola.trainable_parameters(), cola)


def make_setup(config: str, model: nn.Module, batch: dict, opts: Options) -> Setup:
    """Configuration name (CONFIGS, or "cola-...+fit") -> its Setup on `model` (which it takes over)."""
    targets, heads = sites_of(model, opts.targets)
    if config == "floor":
        return floor_setup(model, batch, targets + heads)
    if config == "peft-lora":
        return lora_setup(model, batch, targets, heads, opts)
    if config == "full-ft":
        return full_setup(model, batch, targets + heads)
    name, with_fit = config.removesuffix("+fit"), config.endswith("+fit")
    adapter, merged = name.removeprefix("cola-").removesuffix("-merged"), name.endswith("-merged")
    return cola_setup(model, batch, adapter, merged, opts, with_fit)


def own_trainable_weights(model: nn.Module, opts: Options) -> None:
    """Give full-ft's trainable layers their own storage, so its updates leave the shared weights alone."""
    targets, heads = sites_of(model, opts.targets)
    modules = dict(model.named_modules())
    for name in targets + heads:
        for p in modules[name].parameters():
            p.data = p.data.clone()


# ---------------------------------------------------------------- memory (one configuration per process)

def memory_case(spec: dict, loaded: Callable[[], None], base: nn.Module | None = None) -> dict:
    """Load the model, mark it loaded, build one configuration and run `spec["steps"]` steps."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    _, preset = parse_spec(spec["model"])
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    opts = Options(spec["targets"], spec["rank"], spec["alpha"])
    model = build_model(preset, device, dtype) if base is None else share_weights(base)
    if base is not None and spec["config"] == "full-ft":
        own_trainable_weights(model, opts)
    batch = make_batch(preset, spec["batch_size"], spec["seq_len"], device)
    loaded()
    setup = make_setup(spec["config"], model, batch, opts)
    for _ in range(spec["steps"]):
        setup.step()
    return {}


# ---------------------------------------------------------------- one run: a model, a device, a dtype

@dataclass
class Settings:
    """How to measure; the command's options."""

    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    targets: str | None = None
    """Comma-separated modules or all-linear; None: the model preset's."""
    batch_size: int | None = None
    seq_len: int | None = None
    rank: int = 8
    rounds: int = 7
    warmup: int = 1
    memory_runs: int = 3
    """Fresh processes per configuration on CPU (on CUDA one in-process run is exact); 0: no memory."""
    memory_steps: int = 2
    jobs: int = 1
    fit_repeats: int = 3
    max_seconds: float | None = None
    """Stop the timing of a run after this long (at least 3 rounds)."""
    budget: float | None = None
    """Skip the runs that would start after this many seconds."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    configs: list[str] | None = None
    """A subset of CONFIGS (floor and peft-lora, the references, are always measured)."""


def _packet_cost(setup: Setup, batch: dict) -> tuple[list[Packet], int, int]:
    packets = server_step(setup.cola, batch).packets
    update = setup.cola.adapter_parameters() * 4  # the owner sends its float32 adapter states back
    return packets, sum(p.nbytes for p in packets), update


def _fit_on_cpu(setup: Setup, packets: list[Packet], repeats: int) -> float:
    """Seconds of one fit of this configuration's adapters on the CPU (packets moved there first)."""
    cpu = [Packet(p.site, p.x.cpu().float() if p.x.is_floating_point() else p.x.cpu(), p.grad.cpu().float())
           for p in packets]
    owner = {name: copy.deepcopy(a).cpu().float().requires_grad_(True) for name, a in setup.cola.adapters().items()}
    opt = torch.optim.AdamW([p for a in owner.values() for p in a.parameters()], lr=LR)
    return harness.time_call(lambda: fit(owner, opt, cpu), repeats)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def measure_run(run: Run, preset: Preset, opts: Options, configs: list[str], st: Settings,
                log: Callable[[str], None]) -> Run:
    """Time every configuration interleaved, then measure each one's memory; fills run.rows."""
    base = build_model(preset, run.device, DTYPES[run.dtype])
    batch = make_batch(preset, run.batch_size, run.seq_len, run.device)
    run.sites = sum(map(len, sites_of(base, opts.targets)))
    setups: dict[str, Setup] = {}
    for name in configs + [f"{c}+fit" for c in configs if c.startswith("cola-")]:
        try:
            model = share_weights(base)
            if name == "full-ft":
                own_trainable_weights(model, opts)
            setups[name] = make_setup(name, model, batch, opts)
        except Exception as e:  # e.g. out of memory: report it, measure the rest
            run.errors[name] = _error(e)
            log(f"  {name}: setup failed: {run.errors[name]}")
    log(f"  timing {len(setups)} configurations, {st.rounds} rounds")
    timings = harness.interleaved({n: s.step for n, s in setups.items()}, st.rounds, st.warmup, run.device,
                                  max_seconds=st.max_seconds, log=log)
    run.errors.update(timings.errors)
    for name in configs:
        row = {"time_s": timings.median(name), "time_samples": timings.samples.get(name, []),
               "x_floor": timings.ratio(name, "floor"), "x_lora": timings.ratio(name, "peft-lora"),
               "trainable_server": setups[name].trainable if name in setups else None}
        if name.startswith("cola-") and name in setups and name not in run.errors:
            row["fit_time_s"] = timings.median(name + "+fit")
            row["fit_x_lora"] = timings.ratio(name + "+fit", "peft-lora")
            row["adapter_params"] = setups[name].cola.adapter_parameters()
            try:
                packets, row["packet_bytes"], row["update_bytes"] = _packet_cost(setups[name], batch)
                row["fit_cpu_s"] = _fit_on_cpu(setups[name], packets, st.fit_repeats)
                del packets
            except Exception as e:
                run.errors[name + " (fit)"] = _error(e)
        run.rows[name] = row
    del setups, timings
    _free(run.device)
    if st.memory_runs > 0:
        specs = {c: {"config": c, "model": run.model, "device": run.device, "dtype": run.dtype,
                     "batch_size": run.batch_size, "seq_len": run.seq_len, "targets": opts.targets,
                     "rank": opts.rank, "alpha": opts.alpha, "steps": st.memory_steps, "threads": st.threads}
                 for c in configs}
        if run.device.startswith("cuda"):
            log(f"  memory: {len(specs)} configurations in this process (CUDA allocator)")
            memory = harness.in_process_memory(MEMORY_CASE, specs, log=log, base=base)
        else:
            log(f"  memory: {len(specs)} configurations x {st.memory_runs} fresh processes")
            memory = harness.fresh_process_memory(MEMORY_CASE, specs, st.memory_runs, st.jobs, log=log)
        for name, m in memory.items():
            run.rows[name].update(mem_bytes=m.median, mem_runs=m.runs)
            if m.error:
                run.errors[name + " (memory)"] = m.error
    return run


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_server(models: list[str], st: Settings, out: Path, command: str = "",
               log: Callable[[str], None] = print) -> dict:
    """Benchmark every (model, dtype); rewrites server.md, server.json and the PNGs under `out` after each run.

    Returns:
        the JSON data written.
    """
    start = time.perf_counter()
    if st.threads:
        torch.set_num_threads(st.threads)
    info = harness.machine(st.device)
    configs = [c for c in CONFIGS if st.configs is None or c in {"floor", "peft-lora", *st.configs}]
    data = {"machine": info, "command": command, "settings": st.__dict__, "runs": [], "skipped": []}
    sections: list[str] = []

    def write():
        harness.write_report(out, "server", header(info, command, len(data["runs"])) + "".join(sections), data)

    for spec in models:
        label, preset = parse_spec(spec)
        for dtype in st.dtypes:
            if st.budget is not None and time.perf_counter() - start > st.budget:
                data["skipped"].append(f"{label} {dtype}: time budget spent")
                log(f"skip {label} {dtype}: time budget spent")
                continue
            b, t = preset.cuda_batch if st.device.startswith("cuda") else preset.cpu_batch
            targets = _parse_targets(st.targets) if st.targets else preset.targets
            run = Run(label, st.device, dtype, st.batch_size or b, st.seq_len or t, targets)
            log(f"{label} {st.device} {dtype}: batch {run.batch_size}x{run.seq_len}")
            t0 = time.perf_counter()
            plots = []
            try:
                measure_run(run, preset, Options(targets, st.rank, 2.0 * st.rank), configs, st, log)
                plots = plot_run(run, out)
            except Exception as e:  # a whole run failing (model too big, ...) must not stop the others
                run.errors["run"] = _error(e)
                log(f"  run failed: {run.errors['run']}")
            finally:
                _free(st.device)
            data["runs"].append({**run.__dict__, "seconds": round(time.perf_counter() - t0, 1)})
            if run.rows:
                sections.append(run_markdown(run, plots))
            write()
    data["seconds"] = round(time.perf_counter() - start, 1)
    data["loadavg_end"] = harness.machine(st.device).get("loadavg")
    write()
    return data


def _parse_targets(text: str) -> list[str] | str:
    return "all-linear" if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]
