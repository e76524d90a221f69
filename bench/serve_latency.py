"""Median/max latency of GET /v1/fine_tuning/jobs/{id} while a job trains, on SQLite or PostgreSQL.

From the repository root: .venv/bin/python bench/serve_latency.py sqlite|postgres [MODEL] [CALLS]
(default smollm2-135m, 50 calls 0.1 s apart once the job has taken a step). postgres starts a
private cluster as tests/serve/test_postgres.py does, and removes it at the end.
"""
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests/serve")
from serve_helpers import CHAT, Server, add_user, upload, wait_for, wait_job

from colaft.serve.launch import free_port

kind = sys.argv[1]
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 50
root = Path(tempfile.mkdtemp(prefix="colaft-latency-"))
data = root / "data"
cluster, options, url = None, [], None
if kind == "postgres":
    from test_postgres import Cluster, _pg_bin
    cluster = Cluster(_pg_bin(), free_port())
    url = cluster.start()
    options = ["--database-url", url]
key = add_user(data, "lat", url)
srv = Server(data, [model], *options).start(timeout=300)
try:
    client = srv.client(key)
    f = upload(client, CHAT * 2)
    job = client.fine_tuning.jobs.create(model=model, training_file=f.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 4})
    wait_job(client, job.id, 300, until=("running",))
    wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data),
             300)
    seconds = []
    with srv.http(key) as h:
        for _ in range(calls):
            t = time.perf_counter()
            r = h.get(f"/v1/fine_tuning/jobs/{job.id}")
            seconds.append(time.perf_counter() - t)
            assert r.json()["status"] == "running"
            time.sleep(0.1)  # spread over several training steps
    steps = sum(1 for e in client.fine_tuning.jobs.list_events(job.id, limit=10000).data if e.type == "metrics")
    client.fine_tuning.jobs.cancel(job.id)
    ms = sorted(1000 * s for s in seconds)
    print(f"{kind} {model}: {calls} status calls while training ({steps} steps done): "
          f"median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9 * len(ms))]:.1f} ms, max {ms[-1]:.1f} ms")
finally:
    srv.stop()
    if cluster:
        cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
