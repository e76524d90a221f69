"""Where a mixed step of K users spends the time one user's step does not: torch.profiler's self
CPU time per operator, one user against 32 (minilm-l6, all linear layers, batch 32 x 16, rank 8,
one thread; three profiled steps each after two warm-up steps). The profiler's own overhead
inflates small operators, so read the differences, not the totals.

    python bench/profile_users.py [--model minilm-l6] [--k 32] [--top 12]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from colaft.bench.models import build_model, make_batch, parse_spec
from colaft.bench.users import assign, cola_users
from colaft.server import server_step


def self_ms(base, preset, batch, k: int, steps: int = 3) -> dict[str, float]:
    cm = cola_users(base, preset, k, 8)
    users = assign(k, len(batch["input_ids"]))
    for _ in range(2):
        server_step(cm, batch, users=users)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            server_step(cm, batch, users=users)
    return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, preset = parse_spec(args.model)
    base, batch = build_model(preset), make_batch(preset, 32, 16)
    one, many = self_ms(base, preset, batch, 1), self_ms(base, preset, batch, args.k)
    print(f"| operator | K=1 ms/step | K={args.k} ms/step | difference |\n|---|---:|---:|---:|")
    total_one, total_many = sum(one.values()), sum(many.values())
    print(f"| all | {total_one:.1f} | {total_many:.1f} | {total_many - total_one:+.1f} |")
    for d, op in sorted(((many.get(o, 0) - one.get(o, 0), o) for o in set(one) | set(many)), reverse=True)[:args.top]:
        print(f"| {op} | {one.get(op, 0):.1f} | {many.get(op, 0):.1f} | {d:+.1f} |")


if __name__ == "__main__":
    main()
