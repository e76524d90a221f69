"""The fused collaborative merge and the merge cache, before and after in one process.

    python bench/merges.py [--model minilm-l6] [--ks 2,32] [--rounds 9] [--threads 1] [--memory] [--out FILE]

Collaborative step (`server_step` with K users in collaborative mode, interval 1: nothing is
reused) with the fused product and with every user's delta_W summed as before (the fused
hook removed), and the fused products alone, interleaved with the one-user step that
`colaft bench users` calls K=1;
ratios are medians over rounds of the ratio within a round. Then the cache: forwards with
autograd off (evaluation, serving) on a merged one-user model and on collaborative K users,
kept (as now) or with the cache emptied before every call (as before); and server steps of
an unchanged adapter with autograd on, kept (`under_grad`) or not, and not kept with no cache
at all (no key computed: what the lookup costs). `--memory`: the peak RSS
of three merged server steps of an unchanged adapter, `under_grad` off and on, each in a
fresh process (glibc's mmap threshold pinned, as the bench commands do). `--parts generate`
(a causal LM): greedy generation of 16 tokens for 4 prompts, merged one user and
collaborative K users, with the cache and with W + delta_W formed at every token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colaft import ColaConfig, server_step  # noqa: E402
from colaft.adapters.lowrank import LowRankEmbedding, LowRankLinear  # noqa: E402
from colaft.adapters.merging import MergeCache, merged  # noqa: E402
from colaft.bench import harness  # noqa: E402
from colaft.bench.models import build_model, make_batch, parse_spec, share_weights  # noqa: E402
from colaft.bench.users import assign, cola_users  # noqa: E402
from colaft.model import ColaModel  # noqa: E402


@contextmanager
def per_user_sum():
    """The collaborative merge as before the fused product: each lowrank user's delta_W, summed."""
    saved = {cls: cls.__dict__["merged_sum"] for cls in (LowRankLinear, LowRankEmbedding)}
    for cls in saved:
        delattr(cls, "merged_sum")
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.merged_sum = fn


@contextmanager
def no_lookup():
    """The merged forward as before the cache: W + delta_W formed at every call, no key computed."""
    saved = MergeCache.merged
    MergeCache.merged = lambda self, weight, adapters, coefs, transposed: merged(weight, adapters, coefs, transposed)
    try:
        yield
    finally:
        MergeCache.merged = saved


def uncached(cm: ColaModel, fn):
    def step():
        for s in cm.sites.values():
            s.merges.clear()
        return fn()
    return step


def merged_model(base, preset, rank: int) -> ColaModel:
    return ColaModel(base, ColaConfig(target_modules=preset.targets, rank=rank, alpha=2.0 * rank, merge=True))


def report(t: harness.Timings, pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for name, ref in pairs:
        if (r := t.ratio(name, ref)) is not None:
            out[f"{name} / {ref}"] = round(r, 3)
    out["median_s"] = {n: round(t.median(n), 4) for n in t.samples}
    out["min_s"] = {n: round(min(v), 4) for n, v in t.samples.items() if v}  # the least disturbed round
    return out


def memory_case(model: str, rank: int, under_grad: bool, steps: int) -> dict:
    harness.pin_malloc_threshold()
    _, preset = parse_spec(model)
    base = build_model(preset)
    batch = make_batch(preset, *preset.cpu_batch)
    probe = harness.Probe("cpu")
    probe.loaded()
    cm = merged_model(base, preset, rank)
    for s in cm.sites.values():
        s.merges.under_grad = under_grad
    for _ in range(steps):
        server_step(cm, batch)
    return {"peak_mib": round(probe.peak() / 2**20, 1), "hits": sum(s.merges.hits for s in cm.sites.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--ks", default="2,32")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="collaborative,forward,grad", help="which timings to run")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-runs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_case is not None:
        print(json.dumps(memory_case(args.model, args.rank, args.memory_case == "on", 3)))
        return
    _, preset = parse_spec(args.model)
    base = build_model(preset)
    batch = make_batch(preset, args.batch_size, args.seq_len)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    ks = [int(k) for k in args.ks.split(",")]
    results = {"model": args.model, "batch": [args.batch_size, args.seq_len], "threads": args.threads,
               "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}

    steps = {"K1": lambda cm=cola_users(share_weights(base), preset, 1, args.rank): server_step(cm, batch, users=[
        "user0"] * args.batch_size)}
    forwards = {}
    for k in ks:
        users = assign(k, args.batch_size)
        cm = cola_users(share_weights(base), preset, k, args.rank)
        cm.set_mode("collaborative")
        steps[f"fused-K{k}"] = lambda cm=cm, users=users: server_step(cm, batch, users=users)

        def before(cm=cm, users=users):
            with per_user_sum():
                return server_step(cm, batch, users=users)
        steps[f"sum-K{k}"] = before
        other = cola_users(share_weights(base), preset, k, args.rank)  # its own cache: no step empties the other's
        other.set_mode("collaborative")
        forwards[f"collab-fwd-K{k}-kept"] = lambda cm=cm, users=users: torch.no_grad()(cm)(**inputs, users=users)
        forwards[f"collab-fwd-K{k}-uncached"] = uncached(other, lambda m=other, users=users: torch.no_grad()(m)(
            **inputs, users=users))
    for k in ks:  # the products alone: W + the users' weighted mean delta at every site, as the step forms it
        cm = steps[f"fused-K{k}"].__defaults__[0]
        steps[f"product-K{k}"] = lambda cm=cm: [merged(s.target.weight, list(s.by_user().values()),
                                                       [1 / len(s.keys)] * len(s.keys), s.transposed)
                                                for s in cm.sites.values()]
    parts = args.parts.split(",")
    t = harness.interleaved(steps if "collaborative" in parts else {}, args.rounds, warmup=1)
    results["collaborative step"] = report(t, [(f"{v}-K{k}", "K1") for k in ks for v in ("fused", "sum", "product")]
                                           + [(f"fused-K{k}", f"sum-K{k}") for k in ks])
    print(json.dumps(results["collaborative step"], indent=1), flush=True)

    mm, mm2 = (merged_model(share_weights(base), preset, args.rank) for _ in range(2))
    forwards.update({"merged-fwd-kept": lambda: torch.no_grad()(mm)(**inputs),
                     "merged-fwd-uncached": uncached(mm2, lambda: torch.no_grad()(mm2)(**inputs))})
    t = harness.interleaved(forwards if "forward" in parts else {}, args.rounds, warmup=1)
    results["forward, autograd off"] = report(t, [("merged-fwd-kept", "merged-fwd-uncached")]
                                              + [(f"collab-fwd-K{k}-kept", f"collab-fwd-K{k}-uncached") for k in ks])
    print(json.dumps(results["forward, autograd off"], indent=1), flush=True)

    grad_on = merged_model(share_weights(base), preset, args.rank)
    for s in grad_on.sites.values():
        s.merges.under_grad = True
    grad_off = merged_model(share_weights(base), preset, args.rank)

    def before():
        with no_lookup():
            return server_step(grad_off, batch)
    t = harness.interleaved({"merged-step-under-grad": lambda: server_step(grad_on, batch),
                             "merged-step-not-kept": lambda: server_step(grad_off, batch),
                             "merged-step-no-lookup": before} if "grad" in parts else {}, args.rounds, warmup=2)
    results["merged step, unchanged adapter"] = report(t, [("merged-step-under-grad", "merged-step-not-kept"),
                                                           ("merged-step-not-kept", "merged-step-no-lookup")])
    print(json.dumps(results["merged step, unchanged adapter"], indent=1), flush=True)

    if "generate" in parts:  # greedy decoding: a forward per token, autograd off, the adapters unchanged
        prompt = batch["input_ids"][:4, :16]
        gen = {}
        for k in (1, max(ks)):
            cm = merged_model(share_weights(base), preset, args.rank) if k == 1 else cola_users(
                share_weights(base), preset, k, args.rank)
            if k > 1:
                cm.set_mode("collaborative")
            users = assign(k, len(prompt)) if k > 1 else None

            def run(cm=cm, users=users):
                return cm.generate(input_ids=prompt, users=users, max_new_tokens=16, do_sample=False,
                                   min_new_tokens=16, pad_token_id=0)

            def before(run=run):
                with no_lookup():
                    return run()
            gen[f"generate-K{k}-kept"], gen[f"generate-K{k}-formed-every-token"] = run, before
        t = harness.interleaved(gen, args.rounds, warmup=1)
        results["generation, 4 x 16 tokens"] = report(t, [(f"generate-K{k}-kept", f"generate-K{k}-formed-every-token")
                                                          for k in (1, max(ks))])
        print(json.dumps(results["generation, 4 x 16 tokens"], indent=1), flush=True)
    if args.memory:
        mem = {}
        for case in ("off", "on"):
            runs = []
            for _ in range(args.memory_runs):
                out = subprocess.run([sys.executable, __file__, "--model", args.model, "--rank", str(args.rank),
                                      "--threads", str(args.threads), "--memory-case", case],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            mem[f"under_grad {case}"] = {"peak_mib": statistics.median(r["peak_mib"] for r in runs),
                                         "runs": [r["peak_mib"] for r in runs], "hits": runs[0]["hits"]}
        results["merged step memory (3 steps, cpu batch of the preset)"] = mem
        print(json.dumps(mem, indent=1), flush=True)
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print(json.dumps(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
