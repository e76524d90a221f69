"""`colaft bench packets`: the bytes one server step's packets cost, before and after sharing inputs.

    before        every packet with its own x, float32: what was sent before sites that read one
                  input (q/k/v, gate/up) shared one x
    shared        each shared x once, float32 (the default; exact)
    shared bf16   each shared x once, cast to bfloat16 for the transfer (--transfer-dtype bfloat16)

All three on the same batches, in one run, on the built-in task (`colaft train` with no options:
MiniLM-L6, lowrank at all linear layers + the head, Rotten Tomatoes, the recipe's token cap).
Each is counted four ways that must agree up to headers and alignment: the trainer's count
(`packets_nbytes`, its `packet_bytes`), the safetensors body a fit client is sent, the bytes the
process backend copies into shared memory, and the arrays the Ray backend hands to Ray.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from colaft.backends.ray import ship
from colaft.backends.shm import Outgoing
from colaft.bench import harness
from colaft.bench import offload as task_setup
from colaft.packets import Packet, cast_packets, packets_nbytes, packets_to_bytes
from colaft.server import server_step

CONFIGS = ("before (float32)", "shared (float32)", "shared (bfloat16)")


@dataclass
class Settings:
    """The command's options."""

    model: str = "minilm-l6"
    batch_size: int = 32
    max_length: int | None = None  # None: the task recipe's
    steps: int = 8  # batches measured
    seed: int = 0


def unshared(packets: list[Packet]) -> list[Packet]:
    """The packets as they were sent before inputs were shared: each x and dL/dh its own tensor."""
    return [Packet(p.site, p.x.clone(), p.grad.clone(), p.user) for p in packets]


def _forms(packets: list[Packet]) -> dict[str, list[Packet]]:
    return dict(zip(CONFIGS, (unshared(packets), packets, cast_packets(packets, torch.bfloat16))))


def measure(st: Settings, log: Callable[[str], None]) -> dict:
    """Bytes per step of each configuration, counted and as each transport would send them."""
    task = task_setup.load_task(task_setup.Settings(model=st.model, batch_size=st.batch_size,
                                                    max_length=st.max_length, eval_examples=1, seed=st.seed))
    cola = task_setup._cola(task, st.seed).train()  # as Trainer.step runs it: dropout on
    shm = {name: Outgoing() for name in CONFIGS}
    steps = []
    every = max(len(task.batches) // st.steps, 1)  # spread over the epoch: its batches come in length order
    for i, batch in enumerate(task.batches[::every][:st.steps]):
        packets = server_step(cola, batch).packets
        step = {"rows": len(batch["input_ids"]), "tokens": int(batch["attention_mask"].sum()),
                "packets": len(packets), "inputs": len({id(p.x) for p in packets})}
        for name, form in _forms(packets).items():
            packed = shm[name].pack({"packets": form})
            shm[name].release(packed.buffer)
            step[name] = {"count": packets_nbytes(form), "safetensors": len(packets_to_bytes(form)),
                          "shared_memory": packed.nbytes,
                          "ray": sum(a.nbytes for a in ship({"packets": form}).arrays)}
        log(f"  step {i + 1}: {step['tokens']} tokens, {step['packets']} packets, {step['inputs']} distinct x; "
            + ", ".join(f"{n} {harness.mib(step[n]['count']):.1f} MiB" for n in CONFIGS))
        steps.append(step)
    rows = {}
    for name in CONFIGS:
        ratios = [s[name]["count"] / s[CONFIGS[0]]["count"] for s in steps]
        rows[name] = {way: [s[name][way] for s in steps] for way in ("count", "safetensors", "shared_memory", "ray")}
        rows[name]["x_before"] = statistics.median(ratios)
    return {"steps": steps, "rows": rows, "sites": sorted({p.site for p in packets})}


def run_packets(st: Settings, out: Path, command: str = "", log: Callable[[str], None] = print) -> dict:
    """Measure; writes packets.md and packets.json under `out`. Returns the JSON data."""
    start = time.perf_counter()
    log(f"loading the sc task ({st.model}), measuring {st.steps} steps of {st.batch_size} rows")
    data = {"machine": harness.machine("cpu"), "command": command, "settings": st.__dict__}
    data.update(measure(st, log))
    data["seconds"] = round(time.perf_counter() - start, 1)
    harness.write_report(out, "packets", report(data, st), data)
    return data


def summary(data: dict) -> str:
    """One line per configuration: MiB per step (mean, min-max) and the ratio to before."""
    lines = []
    for name, row in data["rows"].items():
        mib = [harness.mib(n) for n in row["count"]]
        lines.append(f"{name:18} {statistics.mean(mib):7.1f} MiB/step ({min(mib):.1f}-{max(mib):.1f}), "
                     f"x{row['x_before']:.3f} before")
    return "\n".join(lines)


def report(data: dict, st: Settings) -> str:
    t = harness.Table(["configuration", "MiB/step (mean)", "min", "max", "x before (median)",
                       "safetensors MiB", "shared memory MiB", "Ray arrays MiB"])
    for name, row in data["rows"].items():
        mib = [harness.mib(n) for n in row["count"]]
        t.rows.append([name, statistics.mean(mib), min(mib), max(mib), row["x_before"],
                       *(statistics.mean(harness.mib(n) for n in row[way])
                         for way in ("safetensors", "shared_memory", "ray"))])
    steps = data["steps"]
    return "\n".join([
        "## Packet bytes per server step", "",
        f"Command: `{data['command']}`", "",
        f"Task: sc, {st.model}, lowrank rank 8 at all linear layers + head; {st.batch_size} rows per batch, "
        f"{len(steps)} training batches ({min(s['tokens'] for s in steps)}-{max(s['tokens'] for s in steps)} "
        f"tokens); {steps[0]['packets']} packets per step from {steps[0]['inputs']} distinct inputs. "
        f"Whole run: {data['seconds']:.0f} s.", "",
        "'MiB/step' is the trainer's count (`packet_bytes`); the last three columns are what each "
        "transport moves: the safetensors body of a fit client's pull, the process backend's "
        "shared-memory copy, and the Ray backend's arrays.", "",
        t.markdown(), ""])
