"""What the `colaft serve` tests share: the real server in a subprocess, users, uploads, waiting.

Imported by the test modules (pytest puts tests/serve on sys.path), as tiny_models.py is from
tests/. Every server is started in its own process group (colaft.serve.launch), and only
those groups are stopped.
"""
from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import torch
from openai import OpenAI
from safetensors.torch import load as st_load
from tiny_models import BAD, GOOD, QA

from colaft.serve import auth
from colaft.serve.db import Database
from colaft.serve.launch import ServerProcess

REPO = Path(__file__).resolve().parents[2]
CHAT = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 2]
REVIEWS = [{"text": t, "label": "pos"} for t in GOOD] + [{"text": t, "label": "neg"} for t in BAD]
FINAL = ("succeeded", "failed", "cancelled")


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


class Server(ServerProcess):
    """`colaft serve` in a subprocess (colaft.serve.launch), with the clients the tests use."""

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


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


def adapter(server, user: str, job_id: str) -> dict[str, torch.Tensor]:
    """The adapters of `user`'s finished job, downloaded in colaft's form."""
    with server.http(server.keys[user]) as h:
        r = h.get(f"/v1/fine_tuning/jobs/{job_id}/adapter?format=colaft")
    assert r.status_code == 200, r.text
    return st_load(zipfile.ZipFile(io.BytesIO(r.content)).read("adapters.safetensors"))


def assert_same(a: dict, b: dict) -> None:
    """Two trained adapters agree to round-off (the same job, its fits elsewhere or disturbed).

    Round-off, not bits: a server's batches mix whichever jobs run at that moment, and its torch
    threads follow the machine's idle cores, so the sums of two runs may split differently."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it did train
