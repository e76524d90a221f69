"""What the `colaft serve` tests share: the real server in a subprocess, users, uploads, waiting.

Imported by the test modules (pytest puts tests/serve on sys.path), as tiny_models.py is from tests/. Every
server is started in its own process group, and only those groups are stopped.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI
from tiny_models import BAD, GOOD, QA

from colaft.serve import auth
from colaft.serve.db import Database

REPO = Path(__file__).resolve().parents[2]
CHAT = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 2]
REVIEWS = [{"text": t, "label": "pos"} for t in GOOD] + [{"text": t, "label": "neg"} for t in BAD]
FINAL = ("succeeded", "failed", "cancelled")


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


class Server:
    """`colaft serve` in a subprocess (its own process group) on a free loopback port."""

    def __init__(self, data_dir: Path, models: list[str], *options: str):
        self.data_dir, self.models, self.options = data_dir, models, options
        self.log = data_dir.parent / f"{data_dir.name}-server.log"
        self.proc = None

    def start(self, timeout: float = 120.0, port: int | None = None) -> Server:
        """`port`: the same one again (a client that outlives the server finds it there), else a free one."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-c", "import sys; from colaft.app.cli import main; sys.exit(main())", "serve",
                *[a for m in self.models for a in ("--model", m)], "--data-dir", str(self.data_dir),
                "--port", str(self.port), *self.options]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/health", timeout=2).json()["ready"]
            except httpx.HTTPError:
                return False
        wait_for(ready, timeout, 0.3)
        return self

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the server and the workers it started, nothing else
        except ProcessLookupError:
            return
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text()


def add_user(data_dir: Path, name: str, database_url: str | None = None) -> str:
    """A new user's API key, written straight to the service's database (SQLite in `data_dir` by default)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(database_url or f"sqlite:///{data_dir / 'colaft.db'}")
    try:
        return auth.add_user(db, name)[1]
    finally:
        db.close()


def wait_job(client: OpenAI, job_id: str, timeout: float = 180.0, until=FINAL):
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in until and j, timeout)


def upload(client: OpenAI, records, name="data.jsonl"):
    return client.files.create(file=(name, jsonl(records)), purpose="fine-tune")
