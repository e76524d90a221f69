"""The report of `colaft bench users`: K-scaling of time and memory, the target, the header."""
from __future__ import annotations

from colaft.bench import harness

TARGET = 1.3
"""The mixed step of the most users costs at most this many times the single-user step."""


def _ks(data: dict) -> list[int]:
    return list(data["settings"]["ks"])


def rows(data: dict, timings: harness.Timings) -> dict:
    """The derived figures: {"scaling": [per K], "memory_rows": [per K], "target": {...}}."""
    scaling = []
    for k in _ks(data):
        mixed, sep, collab = f"mixed-K{k}", f"separate-K{k}", f"collab-K{k}"
        fwd, peft = f"cola-fwd-K{k}", f"peft-fwd-K{k}"
        scaling.append({
            "k": k, "mixed_s": timings.median(mixed), "mixed_x_k1": timings.ratio(mixed, "mixed-K1"),
            "separate_s": timings.median(sep), "mixed_x_separate": timings.ratio(mixed, sep),
            "collab_s": timings.median(collab), "collab_x_k1": timings.ratio(collab, "mixed-K1"),
            "cola_fwd_s": timings.median(fwd), "peft_fwd_s": timings.median(peft),
            "fwd_x_peft": timings.ratio(fwd, peft), "cola_fwd_x_k1": timings.ratio(fwd, "cola-fwd-K1"),
            "peft_fwd_x_k1": timings.ratio(peft, "peft-fwd-K1"),
        })
    types = {}
    for name in timings.samples:
        if name.startswith("types-mixed-K"):
            k = name.rsplit("K", 1)[1]
            types = {"k": int(k), "mixed_s": timings.median(name),
                     "separate_s": timings.median(f"types-separate-K{k}"),
                     "mixed_x_separate": timings.ratio(name, f"types-separate-K{k}"),
                     "mixed_x_lowrank_k1": timings.ratio(name, "mixed-K1")}
    memory = data.get("memory") or {}
    ref = memory.get("personal-K1", {})
    mem_rows = []
    for k in _ks(data):
        row = {"k": k}
        for mode in ("personal", "collaborative"):
            m = memory.get(f"{mode}-K{k}") or (ref if k == 1 else {})
            grow = _sub(m.get("peak_bytes"), ref.get("peak_bytes"))
            grow_attached = _sub(m.get("attached_bytes"), ref.get("attached_bytes"))
            row[mode] = {"peak_bytes": m.get("peak_bytes"), "adapter_bytes": m.get("adapter_bytes"),
                         "attached_bytes": m.get("attached_bytes"), "growth_bytes": grow,
                         "adapter_growth_bytes": _sub(m.get("adapter_bytes"), ref.get("adapter_bytes")),
                         "attached_growth_bytes": grow_attached, "excess_bytes": _sub(grow, grow_attached)}
        mem_rows.append(row)
    kmax = max(_ks(data))
    last = next((r for r in scaling if r["k"] == kmax), {})
    value = last.get("mixed_x_k1")
    target = {"what": f"mixed step of {kmax} users / single-user step", "measured": value, "bound": TARGET,
              "met": None if value is None else value <= TARGET}
    return {"scaling": scaling, "types": types, "memory_rows": mem_rows, "target": target}


def _sub(a, b):
    return None if a is None or b is None else a - b


def time_table(data: dict) -> harness.Table:
    t = harness.Table(["K users", "mixed step (s)", "x K=1", "K separate steps (s)", "mixed / separate",
                       "collaborative step (s)", "collab x K=1", "colaft fwd (s)", "PEFT fwd (s)",
                       "colaft / PEFT fwd", "PEFT fwd x K=1"])
    for r in data["scaling"]:
        t.rows.append([r["k"], r["mixed_s"], r["mixed_x_k1"], r["separate_s"], r["mixed_x_separate"], r["collab_s"],
                       r["collab_x_k1"], r["cola_fwd_s"], r["peft_fwd_s"], r["fwd_x_peft"], r["peft_fwd_x_k1"]])
    return t


def memory_table(data: dict) -> harness.Table:
    t = harness.Table(["K users", "adapter weights MiB", "adapters attached MiB", "personal peak MiB",
                       "growth vs K=1", "excess", "collaborative peak MiB", "growth vs K=1", "excess"])
    for r in data["memory_rows"]:
        p, c = r["personal"], r["collaborative"]
        t.rows.append([r["k"], harness.mib(p["adapter_bytes"]), harness.mib(p["attached_bytes"]),
                       harness.mib(p["peak_bytes"]), harness.mib(p["growth_bytes"]), harness.mib(p["excess_bytes"]),
                       harness.mib(c["peak_bytes"]), harness.mib(c["growth_bytes"]), harness.mib(c["excess_bytes"])])
    return t


def markdown(data: dict) -> str:
    st = data["settings"]
    targets = data["targets"] if isinstance(data["targets"], str) else ", ".join(data["targets"])
    tg = data["target"]
    met = "-" if tg["met"] is None else \
        "yes" if tg["met"] else f"no (+{100 * (tg['measured'] / tg['bound'] - 1):.1f}%)"
    parts = [
        f"## Many users on one base model: {data['model']}",
        f"Machine: {harness.describe(data['machine'])}; load average {data.get('loadavg_end', '?')} at the end.",
        f"Command: `{data['command']}`",
        f"Batch {st['batch_size']} x {st['seq_len']} tokens, {st['dtype']}, {st['device']}; targets: {targets} "
        f"({data['sites']} sites); lowrank adapters rank {st['rank']}, alpha {2 * st['rank']} for every user "
        f"({harness.mib(data['adapter_bytes_per_user']):.3g} MiB each); rows per user: {st['layout']}. "
        f"{st['rounds']} interleaved rounds after {st['warmup']} warm-up; times are medians, ratios paired "
        "medians over rounds.",
        "### Time", time_table(data).markdown(),
        "mixed: one server step (forward, per-user losses, backward to dL/dh, per-user packets) on the whole "
        "batch. separate: K server steps, one per user on its own rows. collaborative: the mixed step with every "
        "row on W + the mean of the K users' deltas. fwd: the forward alone (eval, no grad) - colaft routed "
        "(users=[...]) vs PEFT with K LoRA adapters (adapter_names=[...]).",
        f"Target: {tg['what']} <= {tg['bound']}: measured {_fmt(tg['measured'])}, met: {met}.",
    ]
    if data.get("types"):
        ty = data["types"]
        parts.append(f"Mixed adapter types ({ty['k']} users cycling lowrank / linear / mlp): mixed step "
                     f"{_fmt(ty['mixed_s'])} s, {ty['k']} separate steps {_fmt(ty['separate_s'])} s, mixed / "
                     f"separate {_fmt(ty['mixed_x_separate'])}; {_fmt(ty['mixed_x_lowrank_k1'])} x the single "
                     "lowrank user's step.")
    if data.get("memory"):
        runs = st["memory_runs"]
        how = ("torch.cuda.max_memory_allocated, in this process" if st["device"].startswith("cuda") else
               f"{'one fresh process' if runs == 1 else f'median of {runs} fresh processes'} per case, peak resident "
               "set with glibc's mmap threshold pinned, so that it follows the live tensors")
        parts += ["### Memory", memory_table(data).markdown(),
                  f"Peak of the mixed step ({st['memory_steps']} steps) above the loaded base model ({how}); it "
                  "includes the adapters. adapters attached: what attaching the K users' adapters took (on CPU the "
                  "weights plus their modules and small allocations). growth: peak minus the K=1 peak; excess: "
                  "growth minus the growth of the adapters attached - what routing (personal) or combining "
                  "(collaborative) costs beyond the adapters themselves. Collaborative K=1 is the personal step. "
                  "Differences of a few MiB are noise."]
    errors = {**data.get("errors", {}), **{f"{k} (memory)": v["error"] for k, v in (data.get("memory") or {}).items()
                                           if v.get("error")}}
    if data.get("peft_error"):
        errors["PEFT"] = data["peft_error"]
    if errors:
        parts.append("Errors: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return "\n\n".join(parts) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def summary(data: dict) -> str:
    """The K-scaling in a few lines (for the log)."""
    lines = [f"K={r['k']}: mixed {_fmt(r['mixed_s'])}s (x{_fmt(r['mixed_x_k1'])} K=1, x{_fmt(r['mixed_x_separate'])} "
             f"separate), fwd colaft/PEFT {_fmt(r['fwd_x_peft'])}" for r in data["scaling"]]
    tg = data["target"]
    lines.append(f"target {tg['what']} <= {tg['bound']}: {_fmt(tg['measured'])}")
    return "\n".join(lines)
