"""Client fits vs server fits on one `colaft serve`: a job's wall time and the bytes a client pulls.

    python bench/remote_fit.py [MODEL] [--epochs N]

Starts `colaft serve --model MODEL --backend inline` on a free loopback port in a temporary
folder, then trains the same job (README's chat pairs, batch 8, same seed) three times, one
after the other: fits on the server, fits by `colaft.client.Client` in this process, and the
same with gzip-compressed packets. Prints each job's seconds from creation to success,
the bytes pulled per step and whether the adapters agree.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import torch
from openai import OpenAI
from safetensors.torch import load as st_load

REPO = Path(__file__).resolve().parents[1]
PAIRS = [("Are you a robot?", "Yes, I am a robot."), ("What is your name?", "My name is Colaft."),
         ("Do you like music?", "I like all kinds of music."), ("Where do you live?", "I live in a computer.")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from colaft.client import Client
    from colaft.serve import auth
    from colaft.serve.db import Database
    from colaft.serve.launch import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        db = Database(f"sqlite:///{data / 'colaft.db'}")
        key = auth.add_user(db, "bench")[1]
        db.close()
        server = ServerProcess(data, [args.model], "--backend", "inline", "--log-level", "warning",
                               log=Path(tmp) / "server.log", threads=None)
        try:
            url = server.start(timeout=600).url
            client = OpenAI(base_url=url + "/v1", api_key=key)
            lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                     for q, a in PAIRS * 4]
            f = client.files.create(file=("chat.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
            adapters = {}
            for name, fit, compress in [("server fits", "server", False), ("client fits", "client", False),
                                        ("client fits, gzip", "client", True)]:
                start = time.perf_counter()
                job = client.fine_tuning.jobs.create(
                    model=args.model, training_file=f.id, seed=1,
                    hyperparameters={"n_epochs": args.epochs, "batch_size": 8, "learning_rate_multiplier": 2},
                    extra_body={"colaft": {"fit": fit}})
                summary = None
                if fit == "client":
                    summary = Client(url, key, job.id, compress=compress, quiet=True).run()
                while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed"):
                    time.sleep(0.2)
                seconds = time.perf_counter() - start
                r = httpx.get(f"{url}/v1/fine_tuning/jobs/{job.id}/adapter?format=colaft",
                              headers={"Authorization": f"Bearer {key}"})
                adapters[name] = st_load(zipfile.ZipFile(io.BytesIO(r.content)).read("adapters.safetensors"))
                steps = job.hyperparameters.n_epochs * 2
                extra = "" if summary is None else (
                    f"; pulled {summary.bytes_pulled / steps / 1e6:.3f} MB/step, pushed "
                    f"{summary.bytes_pushed / summary.updates / 1e6:.3f} MB/update, "
                    f"fitting {summary.fit_seconds:.2f} s")
                print(f"{name:18} {job.status}: {seconds:6.1f} s for {steps} steps{extra}", flush=True)
            ref = adapters["server fits"]
            for name, got in adapters.items():
                err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
                print(f"{name:18} max |adapter - server fits'| = {err:.2e}")
        finally:
            server.stop()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
