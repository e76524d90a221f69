"""`colaft bench serve`: the service under load, on loopback.

    start `colaft serve` (a subprocess, its own process group, a free loopback port)
    ramp:  every simulated user (its own API key) uploads a file and creates a job at once
           while the first jobs already train; every `client_every`-th job fits on its
           client (colaft.client.Client threads in a second subprocess, like users' devices)
    windows, alternating (quiet, load), (load, quiet), ...:
           quiet: no API traffic, the same jobs train (and the fit clients run)
           load:  every user polls its job's status and events, lists and uploads files,
                  one request after another with `think` seconds between them
    the engine's counters (GET /health: steps, rows) before and after each window give its
    training throughput; the ratio load / quiet is paired per (quiet, load) pair
    end:   cancel every job, the clients end, the server is stopped

Bounded in count (users, windows) and time (windows of `window` seconds, a ramp deadline).
Every request's latency and outcome is kept; any non-2xx answer or transport error counts
as a failed request. The simulated users are coroutines of one asyncio loop (httpx), so the
measuring process stays light next to the server.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from colaft.bench.harness import Table, describe, machine, write_report

QA = [("what is ai", "ai is the science of thinking machines"), ("who are you", "i am a tiny bot"),
      ("do you like films", "yes i like films a lot"), ("what is two plus two", "two plus two is four"),
      ("are you happy", "i am happy today"), ("what is your name", "my name is tiny")]


@dataclass
class Settings:
    users: int = 64
    client_every: int = 8
    """Every so many users' jobs fit on the user's client (0: none)."""
    model: str = "tiny"
    """tiny (a 2-layer, 64-wide Llama with SmolLM2's tokenizer, random weights), a built-in name or a folder."""
    backend: str = "process"
    rows: int = 12
    batch_size: int = 4
    staleness: int = 1
    think: float = 1.0
    """Seconds a user waits between its requests in the load windows."""
    window: float = 15.0
    pairs: int = 3
    """(quiet, load) window pairs."""
    warmup: float = 5.0
    """Seconds of training between the ramp and the first window."""
    ramp_timeout: float = 300.0
    checkpoint_every: int = 1000
    """The server's --checkpoint-every. Large by default: a checkpoint pass over all jobs at once
    (64 jobs: ~2 s of the engine) landing in one window and not the other would swamp the ratio."""
    log_level: str = "warning"
    """The server's log level (its log's tail is kept in the JSON report)."""
    upload_every: int = 10
    """A user uploads a file (and lists its files) every so many of its polls."""


@dataclass
class Sample:
    kind: str
    phase: str
    start: float
    seconds: float
    status: int  # 0: transport error


@dataclass
class Recorder:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_zero: float = field(default_factory=lambda: time.time() - time.perf_counter())

    async def call(self, http: httpx.AsyncClient, kind: str, phase: str, method: str, url: str, **kw):
        t0 = time.perf_counter()
        try:
            r = await http.request(method, url, **kw)
            status = r.status_code
        except httpx.HTTPError as e:
            r, status = None, 0
            self.errors.append(f"{kind}: {type(e).__name__}: {e}"[:300])
        dt = time.perf_counter() - t0
        self.samples.append(Sample(kind, phase, t0, dt, status))
        if r is not None and not 200 <= status < 300:
            self.errors.append(f"{kind}: {status} {r.text[:200]}")
        return r


# ---------------------------------------------------------------- the server and its users

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_model_dir(folder: Path) -> Path:
    """The benchmark preset "tiny" (a 2-layer, 64-wide Llama, random weights) with a byte-level BPE
    tokenizer of ~300 tokens trained on the Q/A texts: a step costs milliseconds, not the vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from colaft.bench.models import PRESETS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([t for pair in QA for t in pair] + ["user assistant"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    fields = {k: v for k, v in PRESETS["tiny"].config.items() if k != "model_type"}
    fields.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(user: int, rows: int) -> bytes:
    lines = []
    for i in range(rows):
        q, a = QA[(user + i) % len(QA)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    return ("\n".join(lines) + "\n").encode()


class ServerProcess:
    def __init__(self, data: Path, model: str, backend: str, log: Path, extra: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        here = str(Path(__file__).resolve().parents[2])  # the server runs this colaft, however it is installed
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colaft.app.cli", "serve", "--model", f"bench={model}", "--backend", backend,
             "--data-dir", str(data), "--port", str(self.port),
             "--client-timeout", "120", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).json()["ready"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def clients_main() -> None:
    """The fit clients' process: one colaft.client.Client thread per (url, key, job) of the JSON file argv[1]."""
    import torch

    from colaft.client import Client

    torch.set_num_threads(1)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = {}

    def run(url, key, job):
        try:
            s = Client(url, key, job, wait=5, quiet=True).run()
            results[job] = {"status": s.status, "updates": s.updates, "messages": s.messages,
                            "duplicates": s.duplicates, "resyncs": s.resyncs, "fit_seconds": s.fit_seconds}
        except Exception as e:
            results[job] = {"error": f"{type(e).__name__}: {e}"[:300]}
    threads = [threading.Thread(target=run, args=tuple(j)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()["training"]["bench"]


# ---------------------------------------------------------------- the load

async def _ramp(url: str, keys: list[str], settings: Settings, rec: Recorder) -> list[str]:
    """Each user uploads its file and creates its job, all at once; then polls until it runs."""
    hyper = {"n_epochs": 1000, "batch_size": settings.batch_size}

    async def one(i: int, key: str) -> str | None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
            r = await rec.call(h, "upload", "ramp", "POST", "/v1/files", data={"purpose": "fine-tune"},
                               files={"file": (f"user{i}.jsonl", _records(i, settings.rows))})
            if r is None or r.status_code != 200:
                return None
            client = settings.client_every and i % settings.client_every == settings.client_every - 1
            body = {"model": "bench", "training_file": r.json()["id"], "hyperparameters": hyper, "seed": i,
                    "colaft": {"fit": "client", "staleness": settings.staleness} if client else {}}
            r = await rec.call(h, "create", "ramp", "POST", "/v1/fine_tuning/jobs", json=body)
            if r is None or r.status_code != 200:
                return None
            job = r.json()["id"]
            deadline = time.monotonic() + settings.ramp_timeout
            while time.monotonic() < deadline:
                r = await rec.call(h, "status", "ramp", "GET", f"/v1/fine_tuning/jobs/{job}")
                if r is not None and r.status_code == 200 and r.json()["status"] != "queued":
                    break
                await asyncio.sleep(0.5)
            return job
    return await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))


async def _poll(h: httpx.AsyncClient, job: str, i: int, settings: Settings, rec: Recorder, stop: asyncio.Event,
                pause: random.Random):
    n = 0
    await asyncio.sleep(pause.uniform(0, settings.think))  # spread the users' first requests
    while not stop.is_set():
        n += 1
        if n % 2:
            await rec.call(h, "status", "load", "GET", f"/v1/fine_tuning/jobs/{job}")
        else:
            await rec.call(h, "events", "load", "GET", f"/v1/fine_tuning/jobs/{job}/events", params={"limit": 20})
        if settings.upload_every and n % settings.upload_every == 0:
            await asyncio.sleep(pause.uniform(0.5, 1.5) * settings.think)
            await rec.call(h, "upload", "load", "POST", "/v1/files", data={"purpose": "fine-tune"},
                           files={"file": (f"more{i}.jsonl", _records(i + n, settings.rows))})
            await asyncio.sleep(pause.uniform(0.5, 1.5) * settings.think)
            await rec.call(h, "files", "load", "GET", "/v1/files")
        await asyncio.sleep(pause.uniform(0.5, 1.5) * settings.think)


async def _windows(url: str, keys: list[str], jobs: list[str], settings: Settings, rec: Recorder,
                   log: Callable[[str], None]) -> list[dict]:
    """The (quiet, load) pairs, ABBA order. Every user's connection is opened once, before the
    first window, so that no window starts with 64 connections being set up at once."""
    clients = [httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {k}"}, timeout=60) for k in keys]
    pauses = [random.Random(i) for i in range(len(keys))]
    windows = []
    try:
        for p in range(settings.pairs):
            for phase in (("quiet", "load") if p % 2 == 0 else ("load", "quiet")):
                stop = asyncio.Event()
                before, t0 = await asyncio.to_thread(health, url), time.perf_counter()
                tasks = [] if phase == "quiet" else [
                    asyncio.create_task(_poll(h, j, i, settings, rec, stop, pauses[i]))
                    for i, (h, j) in enumerate(zip(clients, jobs))]
                await asyncio.sleep(settings.window)
                after, t1 = await asyncio.to_thread(health, url), time.perf_counter()
                stop.set()
                await asyncio.gather(*tasks)
                w = _window(phase, before, after, t1 - t0, t0, t1)
                w["pair"] = p
                windows.append(w)
                log(f"pair {p} {phase:5}: {w['steps']} steps, {w['rows_per_s']:.1f} rows/s, "
                    f"{w['steps_per_s']:.2f} steps/s")
    finally:
        for h in clients:
            await h.aclose()
    return windows


def _window(phase: str, before: dict, after: dict, seconds: float, t0: float, t1: float) -> dict:
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    return {"phase": phase, "seconds": seconds, "steps": steps, "rows": rows, "steps_per_s": steps / seconds,
            "rows_per_s": rows / seconds, "step_seconds": after["step_seconds"] - before["step_seconds"],
            "running_jobs": after["running_jobs"], "t0": t0, "t1": t1}


# ---------------------------------------------------------------- the run

def run_serve(settings: Settings, out: Path, command: str, log: Callable[[str], None] = print) -> dict:
    from colaft.serve import auth
    from colaft.serve.db import Database

    info = machine("cpu")
    with tempfile.TemporaryDirectory(prefix="colaft-bench-serve-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        model = str(tiny_model_dir(tmp / "tiny")) if settings.model == "tiny" else settings.model
        db = Database(f"sqlite:///{data / 'colaft.db'}")
        keys = [auth.add_user(db, f"user{i}")[1] for i in range(settings.users)]
        db.close()
        server = ServerProcess(data, model, settings.backend, tmp / "server.log", ("--log-level", settings.log_level,
                                                                                 "--checkpoint-every", str(settings.checkpoint_every)))
        clients = None
        try:
            t = time.perf_counter()
            server.wait_ready()
            log(f"server ready in {time.perf_counter() - t:.1f} s ({settings.backend} backend)")
            rec = Recorder()
            t = time.perf_counter()
            jobs = asyncio.run(_ramp(server.url, keys, settings, rec))
            if any(j is None for j in jobs):
                raise RuntimeError(f"some jobs could not be created: {rec.errors[:5]}")
            ramp_seconds = time.perf_counter() - t
            log(f"{len(jobs)} jobs created and running in {ramp_seconds:.1f} s")
            client_jobs = [(server.url, keys[i], j) for i, j in enumerate(jobs)
                           if settings.client_every and i % settings.client_every == settings.client_every - 1]
            if client_jobs:
                (tmp / "clients.json").write_text(json.dumps(client_jobs))
                clients = subprocess.Popen([sys.executable, "-c", "from colaft.bench.serve_load import clients_main; "
                                            "clients_main()", str(tmp / "clients.json")], stdout=subprocess.PIPE,
                                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH":
                                                           str(Path(__file__).resolve().parents[2])},
                                           start_new_session=True)
            # the first steps start the backend and add every job's owner: wait them out, then warm up
            first = health(server.url)["steps"]
            deadline = time.monotonic() + settings.ramp_timeout
            while health(server.url)["steps"] < first + 3 and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(settings.warmup)
            windows = asyncio.run(_windows(server.url, keys, jobs, settings, rec, log))
            for key, job in zip(keys, jobs):
                r = httpx.post(f"{server.url}/v1/fine_tuning/jobs/{job}/cancel",
                               headers={"Authorization": f"Bearer {key}"}, timeout=60)
                if r.status_code != 200:
                    rec.errors.append(f"cancel: {r.status_code} {r.text[:200]}")
            client_results = {}
            if clients is not None:
                out_text, _ = clients.communicate(timeout=120)
                client_results = json.loads(out_text.strip().splitlines()[-1]) if out_text.strip() else {}
                clients = None
        finally:
            if clients is not None and clients.poll() is None:
                os.killpg(clients.pid, signal.SIGKILL)
                clients.wait(10)
            server.stop()
            server_log = (tmp / "server.log").read_text()
            if settings.log_level != "warning":  # asked for the server's log: keep it whole, next to the report
                out.mkdir(parents=True, exist_ok=True)
                (out / "serve-server.log").write_text(server_log)
            server_log = server_log[-4000:]
    data = _summarise(settings, info, command, rec, windows, ramp_seconds, client_results, server_log)
    write_report(out, "serve", markdown(data), data)
    return data


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]  # nearest rank


def _stats(samples: list[Sample]) -> dict:
    ms = [1000 * s.seconds for s in samples]
    return {"n": len(ms), "failed": sum(1 for s in samples if not 200 <= s.status < 300),
            "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99), "max_ms": max(ms) if ms else None}


def _summarise(settings, info, command, rec, windows, ramp_seconds, client_results, server_log) -> dict:
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
        "targets": {"no_failed_request": failed == 0,
                    "status_p99_under_100ms": status["p99_ms"] is not None and status["p99_ms"] < 100,
                    "throughput_within_20pct": ratio is not None and ratio >= 0.8},
        "clients": client_results, "server_log_tail": server_log,
        "wall_zero": rec.wall_zero + t_zero,  # Unix time of the first request (to match the server's log)
        "slowest": [{"kind": x.kind, "phase": x.phase, "at_s": round(x.start - t_zero, 3), "ms": round(1000 * x.seconds, 1),
                     "status": x.status} for phase in ("ramp", "load")
                    for x in sorted((y for y in rec.samples if y.phase == phase), key=lambda y: -y.seconds)[:15]],
    }


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
        f"same jobs. {s['pairs']} (quiet, load) pairs of {s['window']:g} s, in ABBA order; the server checkpoints every "
        f"{s['checkpoint_every']} steps.", "",
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
    return "\n".join(lines)


def summary(data: dict) -> str:
    req, st, th = data["requests"], data["status_latency"], data["throughput"]
    return (f"{req['total']} requests, {req['failed']} failed; status p50 {st['p50_ms']:.1f} ms, p99 "
            f"{st['p99_ms']:.1f} ms; training load/quiet {th['ratio']:.2f}")
