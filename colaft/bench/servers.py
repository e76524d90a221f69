"""`colaft bench serve --servers N`: 1 and N `colaft serve` processes on one PostgreSQL database,
on this machine, and the time from a kill to the takeover.

    a private PostgreSQL cluster (colaft.bench.postgres; none: the report says so and stops)
    per configuration (1 process and N): a database of its own, one data folder, the processes
    started (the tiny model, inline fits); then `rounds` rounds, each:
        `jobs` jobs created through the processes in turn, while a poller asks for the jobs'
        statuses one request after another (each process in turn); the round ends when every
        job has ended. Jobs' steps per second = the steps of all the jobs / the round's seconds
        (creation to the last end); request p99 = the 99th percentile of the status requests
    kills (N >= 2): `jobs` jobs; once the process holding the most has checkpointed them, it
        is SIGKILLed; the seconds until another holds their leases, and until every one has
        resumed from its checkpoint (its event); every job must then succeed; the killed
        process is started again for the next kill

Both configurations run at once, on databases of their own, and their rounds alternate (1, N,
N, 1, ...: ABBA), so that the machine's other load falls on both alike; the idle one's
processes only look for jobs twice a second. The figures are medians over rounds (and over
kills). Each process trains on one torch thread (colaft.serve.launch's default): on one
machine, N processes use up to N cores where one uses one. The report states the model for
N machines.
"""
from __future__ import annotations

import math
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from colaft.bench.harness import machine, write_report
from colaft.bench.postgres import Cluster
from colaft.bench.serve_load import chat_records, tiny_model_dir
from colaft.bench.serve_load_report import percentile
from colaft.serve.launch import ServerProcess


@dataclass
class Settings:
    servers: int = 2
    jobs: int = 8
    epochs: int = 10
    rows: int = 12
    batch_size: int = 4
    rounds: int = 3
    kills: int = 2
    lease_seconds: float = 10.0
    checkpoint_every: int = 5
    model: str = "tiny"


KILL_EPOCHS = 40
"""Epochs of the jobs of a kill: they run for a while past their first checkpoint."""


class Fleet:
    """k serve processes on one database and data folder, and one user's key."""

    def __init__(self, cluster: Cluster, tmp: Path, model: str, k: int, settings: Settings):
        from colaft.serve import auth
        from colaft.serve.db import Database

        self.url = cluster.database(f"bench{k}")
        self.data = tmp / f"data{k}"
        self.data.mkdir()
        db = Database(self.url)
        self.key = auth.add_user(db, "bench")[1]
        db.close()
        self.servers = [ServerProcess(self.data, [f"bench={model}"], "--database-url", self.url, "--backend", "inline",
                                      "--checkpoint-every", str(settings.checkpoint_every), "--lease-seconds",
                                      str(settings.lease_seconds), "--log-level", "warning",
                                      log=tmp / f"server{k}-{i}.log") for i in range(k)]
        for s in self.servers:
            s.start(wait=False)
        for s in self.servers:
            s.wait_ready(300)
        self.headers = {"Authorization": f"Bearer {self.key}"}
        r = httpx.post(self.servers[0].url + "/v1/files", headers=self.headers, data={"purpose": "fine-tune"},
                       files={"file": ("bench.jsonl", chat_records(0, settings.rows))}, timeout=60)
        r.raise_for_status()
        self.file = r.json()["id"]

    def live(self) -> list[ServerProcess]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def create(self, n: int, settings: Settings, seed: int, epochs: int | None = None) -> list[str]:
        hyper = {"n_epochs": epochs or settings.epochs, "batch_size": settings.batch_size}
        jobs = []
        for i in range(n):
            s = self.live()[i % len(self.live())]
            r = httpx.post(s.url + "/v1/fine_tuning/jobs", headers=self.headers, timeout=60,
                           json={"model": "bench", "training_file": self.file, "seed": seed + i,
                                 "hyperparameters": hyper})
            r.raise_for_status()
            jobs.append(r.json()["id"])
        return jobs

    def statuses(self, jobs: list[str], latencies: list[float] | None = None) -> dict[str, dict]:
        out = {}
        for i, job in enumerate(jobs):
            s = self.live()[i % len(self.live())]
            t = time.perf_counter()
            r = httpx.get(f"{s.url}/v1/fine_tuning/jobs/{job}", headers=self.headers, timeout=60)
            if latencies is not None:
                latencies.append(time.perf_counter() - t)
            out[job] = r.json()
        return out

    def wait(self, jobs: list[str], timeout: float = 600.0, latencies: list[float] | None = None) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.statuses(jobs, latencies)
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in got.values()):
                return got
            time.sleep(0.05)
        raise RuntimeError(f"jobs not done after {timeout:g} s")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def _round(fleet: Fleet, settings: Settings, seed: int) -> dict:
    t = time.perf_counter()
    jobs = fleet.create(settings.jobs, settings, seed)
    latencies: list[float] = []
    done = fleet.wait(jobs, latencies=latencies)
    seconds = time.perf_counter() - t
    failed = [j for j, v in done.items() if v["status"] != "succeeded"]
    if failed:
        raise RuntimeError(f"jobs failed: {[done[j]['error'] for j in failed][:3]}")
    steps = len(jobs) * settings.epochs * -(-settings.rows // settings.batch_size)
    return {"seconds": seconds, "steps": steps, "steps_per_s": steps / seconds, "requests": len(latencies),
            "p99_ms": 1000 * percentile(latencies, 0.99), "p50_ms": 1000 * statistics.median(latencies)}


def _kill(fleet: Fleet, settings: Settings, seed: int, log: Callable[[str], None]) -> dict:
    import psycopg

    jobs = fleet.create(settings.jobs, settings, seed, KILL_EPOCHS)  # long enough to be killed mid-training
    with psycopg.connect(fleet.url.replace("+psycopg", ""), autocommit=True) as c:
        urls = dict(c.execute("SELECT id, url FROM servers").fetchall())

        def held() -> dict[str, list[str]]:  # the running jobs by the URL of their process
            rows = c.execute("SELECT id, lease_owner FROM jobs WHERE id = ANY(%s) AND status = 'running'",
                             (jobs,)).fetchall()
            by: dict[str, list[str]] = {}
            for job, owner in rows:
                by.setdefault(urls.get(owner, owner), []).append(job)
            return by

        def stepped(job: str) -> int:
            return c.execute("SELECT coalesce(max(CAST(data->>'step' AS INTEGER)), 0) FROM events WHERE job_id = %s "
                             "AND type = 'metrics'", (job,)).fetchone()[0]

        deadline = time.monotonic() + 120
        while True:
            by = held()
            victim_url = max((u for u in by if u), key=lambda u: len(by[u]), default=None)
            if victim_url and all(stepped(j) > settings.checkpoint_every for j in by[victim_url]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no process checkpointed its jobs in time")
            time.sleep(0.05)
        victim = next(s for s in fleet.servers if s.url == victim_url)
        theirs = by[victim_url]
        killed = time.monotonic()
        victim.stop(signal.SIGKILL)
        taken = resumed = None
        while resumed is None and time.monotonic() - killed < 120 + settings.lease_seconds:
            owners = dict(c.execute("SELECT id, lease_owner FROM jobs WHERE id = ANY(%s)", (theirs,)).fetchall())
            if taken is None and all(urls.get(o) not in (None, victim_url) for o in owners.values()):
                taken = time.monotonic() - killed
            if taken is not None and all(c.execute(
                    "SELECT count(*) FROM events WHERE job_id = %s AND message LIKE 'Resumed from the checkpoint%%'",
                    (j,)).fetchone()[0] for j in theirs):
                resumed = time.monotonic() - killed
            time.sleep(0.05)
    if resumed is None:
        raise RuntimeError(f"the killed process's jobs were not resumed (leased again after {taken} s)")
    done = fleet.wait(jobs)
    lost = [j for j, v in done.items() if v["status"] != "succeeded"]
    log(f"  kill: {len(theirs)} jobs leased again after {taken:.1f} s, resumed after {resumed:.1f} s; "
        f"{len(jobs) - len(lost)}/{len(jobs)} succeeded")
    victim.start(port=victim.port, timeout=300)
    return {"jobs": len(theirs), "leased_s": taken, "resumed_s": resumed, "succeeded": len(jobs) - len(lost),
            "of": len(jobs)}


def run_servers(settings: Settings, out: Path, command: str, log: Callable[[str], None] = print) -> dict:
    info = machine("cpu")
    data = {"command": command, "settings": asdict(settings), "machine": info}
    bin_dir = Cluster.find()
    if bin_dir is None:
        data["skipped"] = "no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql"
        log(data["skipped"])
        write_report(out, "servers", markdown(data), data)
        return data
    cluster = Cluster(bin_dir)
    try:
        cluster.start()
        with tempfile.TemporaryDirectory(prefix="colaft-bench-servers-") as tmp:
            tmp = Path(tmp)
            model = str(tiny_model_dir(tmp / "tiny")) if settings.model == "tiny" else settings.model
            sizes = sorted({1, settings.servers})
            fleets: dict[int, Fleet] = {}
            try:
                for k in sizes:  # both started: their rounds alternate (1, N, N, 1, ...), the idle one waits
                    t = time.perf_counter()
                    fleets[k] = Fleet(cluster, tmp, model, k, settings)
                    log(f"{k} process(es) ready in {time.perf_counter() - t:.1f} s")
                    fleets[k].wait(fleets[k].create(k, settings, 0))  # warm-up: each process has made its trainer
                rounds: dict[int, list[dict]] = {k: [] for k in sizes}
                for r in range(settings.rounds):
                    for k in (sizes if r % 2 == 0 else sizes[::-1]):
                        rounds[k].append(_round(fleets[k], settings, 1000 * r))
                        log(f"  round {r + 1}, {k} process(es): {rounds[k][-1]['steps_per_s']:.1f} steps/s, "
                            f"p99 {rounds[k][-1]['p99_ms']:.1f} ms ({rounds[k][-1]['requests']} requests)")
                fleets[1].stop()
                kills = [_kill(fleets[sizes[-1]], settings, 5000 + 100 * i, log) for i in range(settings.kills)]
            finally:
                for fleet in fleets.values():
                    fleet.stop()
            configs = {k: {"rounds": rounds[k], "steps_per_s": statistics.median(x["steps_per_s"] for x in rounds[k]),
                           "p99_ms": statistics.median(x["p99_ms"] for x in rounds[k]), "kills": []} for k in sizes}
            if kills:
                configs[sizes[-1]].update(kills=kills, leased_s=statistics.median(x["leased_s"] for x in kills),
                                          resumed_s=statistics.median(x["resumed_s"] for x in kills))
    finally:
        cluster.stop()
    data["configs"] = configs
    info["loadavg_after"] = machine("cpu").get("loadavg")
    write_report(out, "servers", markdown(data), data)
    return data


def _seconds(value: float | None) -> str:
    """A takeover's seconds, or a dash where nothing was killed (one process)."""
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = ["# Several serve processes on one PostgreSQL database", "", f"`{data['command']}`", "",
             f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, load average "
             f"{data['machine'].get('loadavg')} before, {data['machine'].get('loadavg_after')} after.", ""]
    if "skipped" in data:
        return "\n".join(lines + [f"Skipped: {data['skipped']}."])
    configs = data["configs"]
    one = configs[1]
    lines += [f"{s['jobs']} jobs per round ({s['epochs']} epochs of {s['rows']} rows, batch {s['batch_size']}, "
              f"tiny Llama, inline fits), {s['rounds']} rounds per configuration; medians.", "",
              "| processes | jobs' steps/s | vs 1 | status request p99 (ms) | kill -> leased (s) "
              "| kill -> resumed (s) |",
              "|---|---|---|---|---|---|"]
    for k, c in configs.items():
        lines.append(f"| {k} | {c['steps_per_s']:.1f} | {c['steps_per_s'] / one['steps_per_s']:.2f}x | "
                     f"{c['p99_ms']:.1f} | {_seconds(c.get('leased_s'))} | {_seconds(c.get('resumed_s'))} |")
    lines += ["", f"Lease {s['lease_seconds']:g} s: a killed process's jobs are claimed once their leases expire "
              "(at most the lease past the last renewal, renewed every 2 s) and a survivor's engine next looks "
              "(every 0.5 s), then resume from their newest checkpoint.", "",
              "Each process trains on one torch thread: on this machine N processes use up to N cores where "
              "one process uses one.", "",
              "Model for N machines, one process and one GPU each: a job trains on one process, and each "
              "process batches its own jobs, so jobs' steps per second ~ N x one machine's while every machine "
              "has jobs enough to fill its batches (the fair share spreads new jobs evenly; running jobs do not "
              "move unless their process dies) and the database keeps up: each step of a process is one "
              "transaction (the step's events) and a lease renewal per process every 2 s, so a PostgreSQL "
              "that commits a few thousand small transactions per second serves tens of processes. Checkpoints "
              "and adapters go through the shared folder (its bandwidth bounds checkpointing, not steps). On "
              "this one machine the processes share its cores: the ratio above measures the overhead of "
              "splitting, not the gain of machines."]
    return "\n".join(lines)
