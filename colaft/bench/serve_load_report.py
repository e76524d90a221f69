"""The report of `colaft bench serve` (colaft.bench.serve_load): latencies, throughput, targets.

    samples (every request: kind, phase, start, seconds, status) and windows (the engine's
    counters before and after each quiet or load window)
      -> summarise: per-kind latency percentiles (nearest rank), load / quiet throughput per
         window pair, whether the targets are met -> the JSON report
      -> markdown: the same for people; summary: one line
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from colaft.bench.harness import Table, describe


@dataclass
class Sample:
    """One request of the load: what it was, when, how long it took, how it ended."""

    kind: str
    phase: str
    start: float
    seconds: float
    status: int  # 0: transport error


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]  # nearest rank


def _stats(samples: list[Sample]) -> dict:
    ms = [1000 * s.seconds for s in samples]
    return {"n": len(ms), "failed": sum(1 for s in samples if not 200 <= s.status < 300),
            "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms) if ms else None}


def summarise(settings, info, command, rec, windows, ramp_seconds, client_results, server_log,
              attack: dict | None = None) -> dict:
    load_windows = [w for w in windows if w["phase"] == "load"]
    t_zero = min((x.start for x in rec.samples), default=0.0)
    in_load = [s for s in rec.samples if s.phase == "load"]
    load_seconds = sum(w["seconds"] for w in load_windows)
    by_kind = {}
    for phase in ("ramp", "load"):
        for kind in sorted({s.kind for s in rec.samples if s.phase == phase}):
            by_kind[f"{phase} {kind}"] = _stats([s for s in rec.samples if s.phase == phase and s.kind == kind])
    ratios = []
    for p in range(settings.pairs):
        q = [w for w in windows if w["pair"] == p and w["phase"] == "quiet"]
        lo = [w for w in windows if w["pair"] == p and w["phase"] == "load"]
        if q and lo and q[0]["rows_per_s"] > 0:
            ratios.append(lo[0]["rows_per_s"] / q[0]["rows_per_s"])
    status = _stats([s for s in in_load if s.kind == "status"])
    failed = sum(1 for s in rec.samples if not 200 <= s.status < 300) + sum(
        1 for e in rec.errors if e.startswith("cancel"))
    quiet_rows = [w["rows_per_s"] for w in windows if w["phase"] == "quiet"]
    load_rows = [w["rows_per_s"] for w in load_windows]
    ratio = statistics.median(ratios) if ratios else None
    targets = {"no_failed_request": failed == 0,
               "status_p99_under_100ms": status["p99_ms"] is not None and status["p99_ms"] < 100,
               "throughput_within_20pct": ratio is not None and ratio >= 0.8}
    if attack is not None:
        attack = _abuse(attack, _stats([s for s in in_load if s.kind == "health"]),
                        _stats([s for s in in_load if s.kind == "probe status"]))
        targets.update({"good_jobs_all_succeeded": attack["good_jobs_not_succeeded"] == 0,
                        "health_p99_under_100ms": (attack["health_latency"]["p99_ms"] or 1e9) < 100,
                        "probed_status_p99_under_100ms": (attack["status_latency"]["p99_ms"] or 1e9) < 100,
                        "rss_growth_under_200mb": attack["memory"]["growth_mb"] < 200})
    return {
        "settings": asdict(settings), "machine": info, "command": command,
        "requests": {"total": len(rec.samples), "failed": failed, "errors": rec.errors[:20],
                     "load_requests": len(in_load),
                     "load_rps": len(in_load) / load_seconds if load_seconds else None},
        "status_latency": status, "ramp_seconds": ramp_seconds, "by_kind": by_kind, "windows": windows,
        "throughput": {"quiet_rows_per_s": statistics.median(quiet_rows) if quiet_rows else None,
                       "load_rows_per_s": statistics.median(load_rows) if load_rows else None,
                       "quiet_steps_per_s": statistics.median(w["steps_per_s"] for w in windows
                                                              if w["phase"] == "quiet"),
                       "load_steps_per_s": statistics.median(w["steps_per_s"] for w in load_windows),
                       "ratios": ratios, "ratio": ratio},
        "targets": targets, "abuse": attack,
        "clients": client_results, "server_log_tail": server_log,
        "wall_zero": rec.wall_zero + t_zero,  # Unix time of the first request (to match the server's log)
        # every probe (/health and a job's status from the probing process): when the slow ones come
        "probes": [[x.kind, round(x.start - t_zero, 3), round(1000 * x.seconds, 1), x.status]
                   for x in rec.samples if x.kind in ("health", "probe status")],
        "slowest": [{"kind": x.kind, "phase": x.phase, "at_s": round(x.start - t_zero, 3),
                     "ms": round(1000 * x.seconds, 1), "status": x.status} for phase in ("ramp", "load")
                    for x in sorted((y for y in rec.samples if y.phase == phase), key=lambda y: -y.seconds)[:15]],
    }


def _abuse(attack: dict, health: dict, status: dict) -> dict:
    """The abuse run's figures: the good jobs that did not succeed, /health and a job's status
    under attack (from the probing process), memory."""
    short, long = attack["short_jobs"], attack["long_jobs"]
    bad = {j: s for j, s in short.items() if s != "succeeded"}
    bad.update({j: s for j, s in long.items() if s not in ("running", "queued")})  # to be cancelled at the end
    return {**attack, "health_latency": health, "status_latency": status, "good_jobs": len(short) + len(long),
            "good_jobs_not_succeeded": len(bad), "bad_jobs": dict(list(bad.items())[:20]),
            "hostile_requests": sum(sum(c.values()) for c in attack["outcomes"].values()),
            "hostile_5xx": sum(n for c in attack["outcomes"].values() for code, n in c.items()
                               if code.isdigit() and int(code) >= 500)}


def abuse_markdown(data: dict) -> list[str]:
    a, users = data["abuse"], data["status_latency"]
    h, st, m = a["health_latency"], a["status_latency"], a["memory"]
    lines = ["## Under attack (`--abuse`)", "",
             "Hostile clients (their own keys) ran through every load window: " + ", ".join(
                 f"{k} x{n}" for k, n in a["slots"].items()) + f", from one process at niceness "
             f"{a.get('attacker_niceness', 0)} (the server's event loop: 0).", "",
             f"- good requests that failed: **{data['requests']['failed']}** (goal 0)",
             f"- good jobs that did not succeed: **{a['good_jobs_not_succeeded']}** of {a['good_jobs']} "
             f"(goal 0){': ' + str(a['bad_jobs']) if a['bad_jobs'] else ''}",
             "- from a probing process that does nothing else, every 0.2 s:",
             *(f"  - {what} under attack: p50 {x['p50_ms']:.1f} ms, **p99 {x['p99_ms']:.1f} ms** ({x['n']} calls; "
               "goal < 100 ms)" if x["n"] else f"  - {what} under attack: no call"
               for what, x in (("`/health`", h), ("job status", st))),
             f"- the 64 good users' own status calls, timed in their process (one event loop for all): "
             f"p50 {users['p50_ms']:.1f} ms, p99 {users['p99_ms']:.1f} ms" if users["n"] else "",
             f"- server resident set: {m['baseline_mb']:.0f} MiB before, {m['peak_mb']:.0f} MiB peak, **growth "
             f"{m['growth_mb']:.0f} MiB** (goal < 200 MB); {m.get('settled_mb', float('nan')):.0f} MiB once the "
             "attack and the short jobs were over",
             f"- hostile requests: {a['hostile_requests']}, of which 5xx: {a['hostile_5xx']}", ""]
    t = Table(["attack", "answers (status: count; 0: connection closed; open: unanswered at the end)"])
    for k, c in a["outcomes"].items():
        t.rows.append([k, ", ".join(f"{code}: {n}" for code, n in sorted(c.items()))])
    return lines + [t.markdown(), ""]


def markdown(data: dict) -> str:
    s, m, req, st, th = data["settings"], data["machine"], data["requests"], data["status_latency"], data["throughput"]
    n_client = sum(1 for i in range(s["users"]) if s["client_every"] and i % s["client_every"] == s["client_every"] - 1)
    lines = [
        "# The service under load (`colaft bench serve`)", "",
        f"`{data['command']}`", "",
        f"Machine: {describe(m)}.", "",
        f"{s['users']} users, each with its own API key and job on model {s['model']!r} ({s['rows']} rows, batch "
        f"{s['batch_size']}); {n_client} of the jobs fit on their client (staleness {s['staleness']}), the others "
        f"on the server ({s['backend']} backend). Load windows: every user polls its job's status and events, "
        f"uploads and lists files, {s['think']:g} s (±50%) between requests; quiet windows: no API traffic, the "
        f"same jobs. {s['pairs']} (quiet, load) pairs of {s['window']:g} s, in ABBA order; the server checkpoints "
        f"every {s['checkpoint_every']} steps.", "",
        f"- requests: {req['total']} in all, **{req['failed']} failed**; {req['load_rps']:.1f} requests/s in "
        f"the load windows" if req["load_rps"] else f"- requests: {req['total']}, {req['failed']} failed",
        f"- status calls in the load windows (GET /v1/fine_tuning/jobs/ID): p50 {st['p50_ms']:.1f} ms, "
        f"**p99 {st['p99_ms']:.1f} ms**, max {st['max_ms']:.1f} ms ({st['n']} calls)",
        f"- training: {th['quiet_rows_per_s']:.1f} rows/s quiet, {th['load_rows_per_s']:.1f} rows/s under load "
        f"({th['quiet_steps_per_s']:.2f} and {th['load_steps_per_s']:.2f} steps/s); **load / quiet "
        f"{th['ratio']:.2f}** (median of the pairs: {', '.join(f'{r:.2f}' for r in th['ratios'])})",
        f"- ramp (all users upload and create their jobs at once): {data['ramp_seconds']:.1f} s until every "
        "job ran", "",
        "Targets: " + ", ".join(f"{k.replace('_', ' ')}: {'met' if v else 'MISSED'}"
                                for k, v in data["targets"].items()), "",
    ]
    t = Table(["requests", "n", "failed", "p50 ms", "p99 ms", "max ms"])
    for kind, v in data["by_kind"].items():
        t.rows.append([kind, v["n"], v["failed"], v["p50_ms"], v["p99_ms"], v["max_ms"]])
    lines += [t.markdown(), ""]
    t = Table(["window", "seconds", "steps", "rows", "steps/s", "rows/s", "s in Trainer.step"])
    for w in data["windows"]:
        t.rows.append([f"{w['pair']} {w['phase']}", w["seconds"], w["steps"], w["rows"], w["steps_per_s"],
                       w["rows_per_s"], w["step_seconds"]])
    lines += [t.markdown(), ""]
    if req["errors"]:
        lines += ["Failed requests (first 20):", ""] + [f"- `{e}`" for e in req["errors"]] + [""]
    bad = {j: r for j, r in data["clients"].items() if "error" in r}
    lines.append(f"Fit clients: {len(data['clients'])}, {len(bad)} failed" + (f": {bad}" if bad else ""))
    if data.get("abuse"):
        lines += [""] + abuse_markdown(data)
    return "\n".join(lines)


def summary(data: dict) -> str:
    req, st, th = data["requests"], data["status_latency"], data["throughput"]
    return (f"{req['total']} requests, {req['failed']} failed; status p50 {st['p50_ms']:.1f} ms, p99 "
            f"{st['p99_ms']:.1f} ms; training load/quiet {th['ratio']:.2f}")
