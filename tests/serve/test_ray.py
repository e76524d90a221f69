"""`colaft serve --backend ray`: the fits on the actors of a private Ray instance the server starts.

One worker (one actor of one CPU) and one small job keep it to about half a minute, most
of it Ray starting. The server is stopped with SIGTERM, as Ctrl-C would: its Ray processes
must go with it.
"""
from __future__ import annotations

import io
import signal
import time
import zipfile

import psutil
from serve_helpers import CHAT, Server, add_user, upload, wait_job


def test_a_job_trains_on_ray_actors_and_its_adapter_downloads(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    key = add_user(data, "fay")
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--backend", "ray", "--workers", "1").start()
    started: list[psutil.Process] = []
    try:
        client = srv.client(key)
        f = upload(client, CHAT)
        job = client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 2},
                                             extra_body={"colaft": {"adapter": "lowrank"}})
        job = wait_job(client, job.id, 240)
        assert job.status == "succeeded", (job.error, srv.log_text()[-3000:])
        started = psutil.Process(srv.proc.pid).children(recursive=True)  # Ray's processes among them
        assert started, "the ray backend runs its actors in processes of their own"
        assert "fits on the ray backend" in srv.log_text()
        with srv.http(key) as h:
            for fmt, name in (("peft", "adapter_config.json"), ("colaft", "adapters.safetensors")):
                r = h.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", params={"format": fmt})
                assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
                assert name in zipfile.ZipFile(io.BytesIO(r.content)).namelist()
        answer = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=3,
                                                messages=[{"role": "user", "content": "who are you"}])
        assert answer.choices[0].finish_reason in ("stop", "length")
        srv.stop(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"Ray processes outlived the server: {[p.name() for p in left]}"
    finally:
        srv.stop(signal.SIGKILL)
        for p in started:  # only the processes this test's server started
            try:
                p.kill()
            except psutil.Error:
                pass
