"""The server step with packets streamed to host memory during the backward, against the
ordinary step: step time and the device's peak memory (`colaft bench stream`).

    ordinary   backward to every site, then the packets built on the device (a CUDA server
               then copies them to the host when they are sent)
    streamed   `server_step(stream_packets=True)`: each site's x and dL/dh copied to pinned
               host memory as soon as dL/dh there is produced, at most `in_flight` copies
               under way; the packets are built on the host

On CUDA both include moving the packets to the host (the ordinary step's `.cpu()` of every
packet), so both end with the same packets in host memory. Peak memory is the CUDA
allocator's `max_memory_allocated` above what was allocated before the step. Steps
alternate, and the ratio is the median of the per-round ratios. On CPU the streamed step
runs the same hooks with plain copies: a smoke test, its timing means little.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from colaft.bench.models import build_model, make_batch, parse_spec
from colaft.config import ColaConfig
from colaft.model import ColaModel
from colaft.packets import cast_packets
from colaft.server import server_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(cm: ColaModel, batch: dict, device: torch.device, streamed: bool, in_flight: int) -> tuple[float, int]:
    """(seconds, peak bytes above the start) of one step that ends with the packets on the host."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    step = server_step(cm, batch, stream_packets=streamed, in_flight=in_flight)
    packets = step.packets if streamed else cast_packets(step.packets, device="cpu")
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device.type == "cuda" else 0
    assert all(p.x.device.type == "cpu" for p in packets)
    return seconds, peak


def run(model: str, device: str, dtype: str, rounds: int, in_flight: int, batch: tuple[int, int] | None) -> dict:
    dev = torch.device(device)
    label, preset = parse_spec(model)
    rows, seq = batch or (preset.cuda_batch if dev.type == "cuda" else preset.cpu_batch)
    base = build_model(preset, dev, getattr(torch, dtype))
    cm = ColaModel(base, ColaConfig(target_modules=preset.targets, adapter="lowrank")).to(dev).train()
    data = make_batch(preset, rows, seq, dev)
    times: dict[str, list[float]] = {"ordinary": [], "streamed": []}
    peaks: dict[str, list[int]] = {"ordinary": [], "streamed": []}
    for r in range(rounds + 1):
        order = ["ordinary", "streamed"] if r % 2 else ["streamed", "ordinary"]
        for name in order:
            s, p = _one(cm, data, dev, name == "streamed", in_flight)
            if r:  # the first round warms up
                times[name].append(s)
                peaks[name].append(p)
    ratio = statistics.median(s / o for s, o in zip(times["streamed"], times["ordinary"]))
    out = {"model": label, "device": device, "dtype": dtype, "batch": [rows, seq], "in_flight": in_flight,
           "seconds": {k: statistics.median(v) for k, v in times.items()}, "streamed_x_ordinary": ratio,
           "peak_mib": {k: max(v) / 2**20 for k, v in peaks.items()}}
    return out


def main(models: list[str], device: str | None, dtype: str, rounds: int, in_flight: int,
         batch: str | None, out: Path | None) -> list[dict]:
    """`colaft bench stream`: each model's result, printed as it comes and written to out/stream.json."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = tuple(int(v) for v in batch.split("x")) if batch else None
    results = []
    for model in models:
        result = run(model, device, dtype, rounds, in_flight, shape)
        print(json.dumps(result), flush=True)
        results.append(result)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps(results, indent=1))
    return results
