"""`colaft serve` in a process of its own, started and stopped by a program (tests, benchmarks).

    ServerProcess(data_dir, ["llama=FOLDER"], "--backend", "inline").start()
      -> python -m colaft.app.cli serve --model llama=FOLDER --data-dir DATA_DIR --port PORT
         --backend inline, in a new process group, on a free loopback port; its output
         appended to the log; it runs this colaft (whose folder leads PYTHONPATH)
      -> GET /health until every base model's engine is ready; the server's exit before that
         raises, with the end of its log
    stop()   the process group (the server and the workers it started, nothing else) gets
             SIGTERM, as Ctrl-C would, and SIGKILL if it is still there after 60 s
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SOURCE = Path(__file__).resolve().parents[2]
"""The folder holding this colaft package: first on the server's PYTHONPATH, however colaft is installed."""


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`colaft serve` for the base models `models` ([ID=]NAME_OR_DIR each) on `data_dir`, with
    further command-line `options`.

    Args:
        log: where its output goes (default: DATA_DIR-server.log beside the data folder);
            appended to, so a restarted server's output follows the first one's.
        threads: the server's OMP_NUM_THREADS (its torch threads and how many workers it
            starts by default); None: the server chooses, as `colaft serve` alone does.
    """

    def __init__(self, data_dir: Path, models: list[str], *options: str, log: Path | None = None,
                 threads: int | None = 1):
        self.data_dir, self.models, self.options, self.threads = data_dir, models, options, threads
        self.log = log or data_dir.parent / f"{data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.url = ""

    def start(self, timeout: float = 120.0, port: int | None = None, wait: bool = True) -> ServerProcess:
        """Start it and wait until it is ready (`wait`; else call `wait_ready`). `port`: the same
        one again (a client that outlives the server finds it there), else a free one."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "colaft.app.cli", "serve", *[a for m in self.models for a in ("--model", m)],
                "--data-dir", str(self.data_dir), "--port", str(self.port), *self.options]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SOURCE), os.environ.get("PYTHONPATH"))
                                                            if p)}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).json()["ready"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server was not ready after {timeout:g} s:\n{self.log_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to its process group and wait for the server (SIGKILL after 60 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text()
