"""`colaft bench polls`: /health and a job's status while many long polls wait, on loopback.

    start `colaft serve` (colaft.serve.launch; the tiny model, inline backend, no poll quota)
    one user's client-fit job (S = 0) whose step 1 is sent: a poll after it waits, since no
    step 2 comes before step 1's update
    quiet: `probes` calls of /health and of the job's status, one after another
    load:  `polls` long polls of the job at once (wait `wait` s), each on its own connection,
           all from this process's one asyncio loop (httpx); once /health says they all wait
           (long_polls), the same probes; the server's threads are counted meanwhile
    end:   cancel the job (every poll answers at once), stop the server

`measure` does quiet and load against any live server and job (the abuse benchmark reuses
it); `run_polls` adds the server and the job. Latencies are percentiles by nearest rank
(colaft.bench.serve_load_report); a probe answering other than 2xx counts as failed.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from colaft.bench.harness import Table, machine, write_report
from colaft.bench.serve_load import LONG_EPOCHS, LONG_REPEATS, chat_records, tiny_model_dir
from colaft.bench.serve_load_report import Sample, _stats
from colaft.serve.commands import raise_open_files
from colaft.serve.launch import ServerProcess


@dataclass
class Settings:
    polls: int = 1000
    wait: float = 30.0
    """Seconds each long poll may wait on the server (the probes must end within it)."""
    probes: int = 300
    """Calls of /health and of the job's status in each phase."""
    pause: float = 0.01
    """Seconds between two probes."""
    model: str = "tiny"
    backend: str = "inline"


def _threads(pid: int | None) -> int | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).num_threads()


async def _probe(url: str, key: str, job: str, settings: Settings, phase: str) -> list[Sample]:
    """`settings.probes` calls each of /health and the job's status, alternating, on one connection."""
    samples = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        for _ in range(settings.probes):
            for kind, path in (("health", "/health"), ("status", f"/v1/fine_tuning/jobs/{job}")):
                t = time.perf_counter()
                try:
                    status = (await h.get(path)).status_code
                except httpx.HTTPError:
                    status = 0
                samples.append(Sample(kind, phase, t, time.perf_counter() - t, status))
                await asyncio.sleep(settings.pause)
    return samples


async def measure(url: str, key: str, job: str, settings: Settings, pid: int | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """Quiet, then load, against the live server at `url`: `job` is a running client-fit job of
    `key`'s whose polls after message 1 (version 0) wait. `pid`: the server's, to count its threads."""
    raise_open_files()  # this process holds a connection per poll too
    quiet = await _probe(url, key, job, settings, "quiet")
    threads = {"quiet": _threads(pid)}
    log(f"quiet: /health p99 {_stats([s for s in quiet if s.kind == 'health'])['p99_ms']:.1f} ms")
    limits = httpx.Limits(max_connections=settings.polls, max_keepalive_connections=settings.polls)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=settings.wait + 120) as h, \
            httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as other:
        params = {"after": 1, "version": 0, "wait": settings.wait}
        t = time.perf_counter()
        polls = [asyncio.create_task(h.get(f"/v1/fine_tuning/jobs/{job}/fit/packets", params=params))
                 for _ in range(settings.polls)]
        held, most = 0, 0
        while held < settings.polls and time.perf_counter() - t < settings.wait / 2:
            held = (await other.get("/health")).json().get("long_polls", 0)  # not behind the polls' connections
            most = max(most, _threads(pid) or 0)
            await asyncio.sleep(0.1)
        in_seconds = time.perf_counter() - t
        log(f"{held} of {settings.polls} polls waiting after {in_seconds:.1f} s")
        load = await _probe(url, key, job, settings, "load")
        threads["load"] = max(most, _threads(pid) or 0)
        answered_early = sum(p.done() for p in polls)
        cancel = await other.post(f"/v1/fine_tuning/jobs/{job}/cancel")
        answers = await asyncio.gather(*polls, return_exceptions=True)
    outcomes: dict[str, int] = {}
    for a in answers:
        name = str(a.status_code) if isinstance(a, httpx.Response) else type(a).__name__
        outcomes[name] = outcomes.get(name, 0) + 1
    stats = {phase: {kind: _stats([s for s in samples if s.kind == kind]) for kind in ("health", "status")}
             for phase, samples in (("quiet", quiet), ("load", load))}
    return {"settings": asdict(settings), "probes": stats, "polls_waiting": held, "polls_in_seconds": in_seconds,
            "polls_answered_before_the_probes_ended": answered_early, "poll_outcomes": outcomes,
            "server_threads": threads, "cancel_status": cancel.status_code,
            "p99_under_100ms": all(stats["load"][k]["p99_ms"] is not None and stats["load"][k]["p99_ms"] < 100
                                   and not stats["load"][k]["failed"] for k in ("health", "status"))}


def client_job(url: str, key: str, timeout: float = 300.0) -> str:
    """A running client-fit job (S = 0) of `key`'s on the base model "bench", its step 1 sent."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        f = h.post("/v1/files", data={"purpose": "fine-tune"},
                   files={"file": ("polls.jsonl", chat_records(0, 12 * LONG_REPEATS))})
        f.raise_for_status()
        r = h.post("/v1/fine_tuning/jobs", json={"model": "bench", "training_file": f.json()["id"],
                                                 "hyperparameters": {"n_epochs": LONG_EPOCHS, "batch_size": 4},
                                                 "colaft": {"fit": "client"}})
        r.raise_for_status()
        job = r.json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = h.get(f"/v1/fine_tuning/jobs/{job}/fit/packets", params={"after": 0, "wait": 5})
            if r.status_code == 200:
                return job
            time.sleep(0.5)
    raise RuntimeError(f"the job's first step was not sent within {timeout:g} s")


def run_polls(settings: Settings, out: Path, command: str, log: Callable[[str], None] = print) -> dict:
    from colaft.serve import auth
    from colaft.serve.db import Database

    info = machine("cpu")
    with tempfile.TemporaryDirectory(prefix="colaft-bench-polls-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        model = str(tiny_model_dir(tmp / "tiny")) if settings.model == "tiny" else settings.model
        db = Database(f"sqlite:///{data / 'colaft.db'}")
        key = auth.add_user(db, "poller")[1]
        db.close()
        server = ServerProcess(data, [f"bench={model}"], "--backend", settings.backend, "--max-polls-per-key", "0",
                               "--client-timeout", "600", "--log-level", "warning", log=tmp / "server.log")
        try:
            server.start(timeout=300)
            job = client_job(server.url, key)
            log(f"server ready, job {job} waits for its first update")
            result = asyncio.run(measure(server.url, key, job, settings, server.proc.pid, log))
        finally:
            server.stop()
            server_log = (tmp / "server.log").read_text()[-4000:].replace(str(tmp), "TMP")  # no machine path
    data = {"machine": info, "command": command, **result, "server_log": server_log}
    write_report(out, "polls", markdown(data), data)
    return data


def markdown(data: dict) -> str:
    s = data["settings"]
    t = Table(["phase", "request", "n", "failed", "p50 ms", "p99 ms", "max ms"])
    for phase, kinds in data["probes"].items():
        for kind, v in kinds.items():
            t.rows.append([phase, kind, v["n"], v["failed"], v["p50_ms"], v["p99_ms"], v["max_ms"]])
    return "\n\n".join([
        "# /health and a job's status while long polls wait",
        f"`{data['command']}` on {data['machine']['cpu']} ({data['machine']['cores']} cores).",
        f"{data['polls_waiting']} of {s['polls']} long polls (wait {s['wait']:g} s, one process, each its own "
        f"connection) waiting on the server after {data['polls_in_seconds']:.1f} s; "
        f"{data['polls_answered_before_the_probes_ended']} answered before the probes ended; "
        f"outcomes after the job was cancelled: {json.dumps(data['poll_outcomes'])}. Server threads: "
        f"{data['server_threads']['quiet']} quiet, at most {data['server_threads']['load']} under the polls.",
        t.markdown(),
        f"Target p99 < 100 ms under load, no failure: **{'met' if data['p99_under_100ms'] else 'NOT met'}**."])


def summary(data: dict) -> str:
    load = data["probes"]["load"]
    return (f"{data['polls_waiting']} polls waiting: /health p50 {load['health']['p50_ms']:.1f} ms, p99 "
            f"{load['health']['p99_ms']:.1f} ms; status p50 {load['status']['p50_ms']:.1f} ms, p99 "
            f"{load['status']['p99_ms']:.1f} ms; server threads {data['server_threads']}")
