"""`colaft serve --database-url postgresql+psycopg://...` end to end, on a private PostgreSQL cluster
(the `postgres_url` fixture of conftest.py: colaft.bench.postgres.Cluster, started for the module
and stopped at its end; skipped only where no PostgreSQL server binaries exist).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from serve_helpers import CHAT, REPO, Server, upload, wait_for, wait_job


def _users_add(url: str, data: Path, name: str) -> str:
    """`colaft users add NAME --database-url URL`, the real command; returns the printed key."""
    out = subprocess.run([sys.executable, "-c", "import sys; from colaft.app.cli import main; sys.exit(main())",
                          "users", "add", name, "--database-url", url, "--data-dir", str(data)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_postgres_holds_everything_across_a_sigkill(postgres_url, tmp_path, tiny_llama_dir):
    import openai

    data = tmp_path / "data"
    key = _users_add(postgres_url, data, "erin")
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--database-url", postgres_url, "--checkpoint-every", "5").start()
    try:
        client = srv.client(key)
        f = upload(client, CHAT)
        done = wait_job(client, client.fine_tuning.jobs.create(model="llama", training_file=f.id, seed=1,
                                                               hyperparameters={"n_epochs": 2}).id)
        assert done.status == "succeeded", done.error
        done_events = [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)]
        messages = [e.message for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)]
        assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created")
        assert [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=3, after=done_events[1]).data] == \
            done_events[2:5]  # the cursor pages through PostgreSQL's event order
        assert client.files.content(done.result_files[0]).text.startswith("step,train_loss\n1,")
        answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                                messages=[{"role": "user", "content": "who are you"}])

        # cancel (a locked read-modify-write on PostgreSQL) and a file in use
        busy = client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 50,
                                                                                    "batch_size": 1})
        wait_job(client, busy.id, 60, until=("running",))
        with pytest.raises(openai.ConflictError):
            client.files.delete(f.id)
        assert client.fine_tuning.jobs.cancel(busy.id).status == "cancelled"

        long = client.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 50})
        wait_for(lambda: any(e.message.startswith("Step 12/") for e in
                             client.fine_tuning.jobs.list_events(long.id, limit=30).data), 120)
        before = [e.id for e in client.fine_tuning.jobs.list_events(long.id, limit=10000)]
        srv.stop(signal.SIGKILL)

        client = srv.start().client(key)
        assert {x.id for x in client.files.list()} == {f.id, *done.result_files}
        assert client.fine_tuning.jobs.retrieve(busy.id).status == "cancelled"
        assert [e.id for e in client.fine_tuning.jobs.list_events(done.id, limit=1000)] == done_events
        assert client.chat.completions.create(
            model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "who are you"}]
        ).choices[0].message.content == answer.choices[0].message.content
        finished = wait_job(client, long.id, 240)
        assert finished.status == "succeeded", finished.error
        events = list(client.fine_tuning.jobs.list_events(long.id, limit=10000))
        assert set(before) <= {e.id for e in events}
        resumed = [e.message for e in events if e.message.startswith("Resumed from the checkpoint at step")]
        assert len(resumed) == 1 and int(resumed[0].split("step ")[1].split()[0]) >= 10
        steps = [e.data["step"] for e in events[::-1] if e.type == "metrics"]
        assert steps[-1] == 100 and sorted(set(steps)) == list(range(1, 101))  # 50 epochs of 2 steps
    finally:
        srv.stop()
    # it all lived in PostgreSQL: no SQLite file beside the data, and the rows are there
    assert not (data / "colaft.db").exists()
    with psycopg.connect(postgres_url.replace("+psycopg", "")) as c:
        assert c.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3
        assert c.execute("SELECT count(*) FROM events WHERE job_id = %s", (long.id,)).fetchone()[0] == len(events)
