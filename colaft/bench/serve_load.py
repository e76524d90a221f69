"""`colaft bench serve`: the service under load, on loopback.

    start `colaft serve` (colaft.serve.launch: a subprocess, its own process group, a free loopback port)
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
    --abuse: the load windows also hold colaft.bench.abuse's hostile clients (their own keys,
           in a process of their own), a /health probe, and one short job per good user, which
           must succeed; the server's resident set is sampled throughout the windows

Bounded in count (users, windows) and time (windows of `window` seconds, a ramp deadline).
Every request's latency and outcome is kept; any non-2xx answer or transport error counts
as a failed request. The simulated users are coroutines of one asyncio loop (httpx), so the
measuring process stays light next to the server. The report is colaft.bench.serve_load_report's.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from colaft.bench import abuse
from colaft.bench.abuse import ATTACKER_NICENESS
from colaft.bench.harness import machine, write_report
from colaft.bench.serve_load_report import Sample, markdown, summarise
from colaft.serve.launch import SOURCE, ServerProcess

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
    abuse: bool = False
    """Hostile clients in the load windows (colaft.bench.abuse)."""
    abuse_scale: float = 1.0
    """Times each attack's concurrency (abuse.ATTACKS)."""
    attacker_niceness: int = ATTACKER_NICENESS
    """The attacking process's niceness (why 10 by default: abuse.ATTACKER_NICENESS)."""
    short_epochs: int = 2
    """Epochs of each good user's short job in the abuse run."""
    jobs_timeout: float = 300.0
    """Seconds after the windows the short jobs have to end."""


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


LONG_EPOCHS, LONG_REPEATS = 50, 20
"""A job that outlasts a run: n_epochs is at most 50 (OpenAI's range), so its file holds its rows
LONG_REPEATS times over."""


def chat_records(user: int, rows: int) -> bytes:
    """A chat JSONL file of `rows` Q/A conversations, starting at QA[user] (users' files differ)."""
    lines = []
    for i in range(rows):
        q, a = QA[(user + i) % len(QA)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    return ("\n".join(lines) + "\n").encode()


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
    hyper = {"n_epochs": LONG_EPOCHS, "batch_size": settings.batch_size}

    async def one(i: int, key: str) -> str | None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
            r = await rec.call(h, "upload", "ramp", "POST", "/v1/files", data={"purpose": "fine-tune"},
                               files={"file": (f"user{i}.jsonl", chat_records(i, settings.rows * LONG_REPEATS))})
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
                           files={"file": (f"more{i}.jsonl", chat_records(i + n, settings.rows))})
            await asyncio.sleep(pause.uniform(0.5, 1.5) * settings.think)
            await rec.call(h, "files", "load", "GET", "/v1/files")
        await asyncio.sleep(pause.uniform(0.5, 1.5) * settings.think)


async def _windows(url: str, keys: list[str], jobs: list[str], settings: Settings, rec: Recorder,
                   log: Callable[[str], None], hostile=None, short: dict | None = None) -> list[dict]:
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
                if hostile is not None and phase == "load":
                    first = not any(w["phase"] == "load" for w in windows)  # the short jobs start with it
                    tasks += [asyncio.create_task(hostile.run_apart(settings.window)),
                              asyncio.create_task(abuse.probe_apart(url, keys[0], jobs[0], settings.window, rec))]
                    tasks += [asyncio.create_task(abuse.short_job(h, j, "bench", settings.short_epochs, rec, short))
                              for h, j in zip(clients, jobs) if first]
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


def _without_folders(log: str, tmp: Path) -> str:
    """The server's log without this machine's folders (the report is meant to be shared): the
    run's temporary folder, the Python environment's and colaft's source."""
    for folder, name in ((tmp, "<run>"), (Path(sys.prefix), "<python>"), (Path(sys.base_prefix), "<python>"),
                         (SOURCE, "<colaft>")):
        log = log.replace(str(folder), name)
    return log


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
        hostile_keys = [auth.add_user(db, f"hostile{i}")[1] for i in range(2 if settings.abuse else 0)]
        db.close()
        limits = ("--max-upload-mb", str(abuse.MAX_UPLOAD_MB), "--max-requests-per-minute-per-user",
                  str(abuse.RATE_PER_MINUTE)) if settings.abuse else ()
        server = ServerProcess(data, [f"bench={model}"], "--backend", settings.backend, "--client-timeout", "120",
                               "--log-level", settings.log_level, "--checkpoint-every", str(settings.checkpoint_every),
                               *limits, log=tmp / "server.log")
        clients, attack = None, None
        try:
            t = time.perf_counter()
            server.start(timeout=300)
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
                clients = subprocess.Popen(
                    [sys.executable, "-c", "from colaft.bench.serve_load import clients_main; clients_main()",
                     str(tmp / "clients.json")], stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SOURCE)}, start_new_session=True)
            # the first steps start the backend and add every job's owner: wait them out, then warm up
            first = health(server.url)["steps"]
            deadline = time.monotonic() + settings.ramp_timeout
            while health(server.url)["steps"] < first + 3 and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(settings.warmup)
            hostile, short, rss = None, {}, None
            if settings.abuse:
                hostile = abuse.Hostile(server.url, hostile_keys, "bench", settings.abuse_scale,
                                        niceness=settings.attacker_niceness)
                asyncio.run(hostile.setup())
                rss = abuse.RssSampler(server.proc.pid).start()
            windows = asyncio.run(_windows(server.url, keys, jobs, settings, rec, log, hostile, short))
            if settings.abuse:
                attack = {"memory": rss.stop(), "outcomes": {k: dict(v) for k, v in hostile.outcomes.items()},
                          "slots": {k: max(1, round(n * settings.abuse_scale)) for k, n in abuse.ATTACKS.items()},
                          "attacker_niceness": hostile.ran_at,
                          "long_jobs": abuse.final_statuses(server.url, dict(zip(jobs, keys)), 0)}
                log(f"attack over; waiting for {len(short)} short jobs")
                attack["short_jobs"] = abuse.final_statuses(server.url, short, settings.jobs_timeout)
                attack["memory"]["settled_mb"] = rss.now_mb()  # the attack and the short jobs over
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
            server_log = _without_folders(server_log[-4000:], tmp)
    data = summarise(settings, info, command, rec, windows, ramp_seconds, client_results, server_log, attack)
    write_report(out, "serve", markdown(data), data)
    return data
