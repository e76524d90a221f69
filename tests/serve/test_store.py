"""The job store (colaft.serve.store), without a server: a job moves on only from an active
status (a job cancelled meanwhile stays cancelled and says so), steps and checkpoints as the
API reads them, and the results file of a job that succeeded."""
from __future__ import annotations

import pytest
from serve_helpers import CHAT, jsonl
from sqlalchemy import select

from colaft.serve.db import Checkpoint, Database, Event, File, Job, User
from colaft.serve.jobs import Run
from colaft.serve.store import JobStore


@pytest.fixture
def store(tmp_path):
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    (data / "files" / "file-1").write_bytes(jsonl(CHAT))
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    with db.session() as s:
        s.add(User(id="user-1", name="u", key_hash="0" * 64))
        s.flush()  # the rows no relationship orders: each before the one that points at it
        s.add(File(id="file-1", user_id="user-1", filename="chat.jsonl", purpose="fine-tune", bytes=1, format="chat",
                   rows=len(CHAT)))
        s.flush()
        for job_id, status in [("job-q", "queued"), ("job-r", "running"), ("job-c", "cancelled")]:
            s.add(Job(id=job_id, user_id="user-1", model="m", training_file="file-1", seed=0, status=status,
                      hyperparameters={}, options={}))
    yield JobStore("m", db, data)
    db.close()


def run(job_id: str, rows: int = 8, batch_size: int = 4, n_epochs: int = 2) -> Run:
    return Run(job_id, "personal", [{"input_ids": [1, 2, 3]}] * rows, [], batch_size, n_epochs, seed=0)


def status(store: JobStore, job_id: str) -> str:
    return store.job(job_id).status


def messages(store: JobStore, job_id: str) -> list[str]:
    with store.db.read() as s:
        return [e.message for e in s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq))]


def test_admission_reads_an_active_job_and_its_newest_checkpoint_if_its_folder_is_there(store):
    assert store.admission("job-c") is None and store.admission("job-nope") is None
    queued = store.admission("job-q")
    assert (queued.job.id, queued.train.id, queued.valid, queued.resumed, queued.checkpoint) == \
        ("job-q", "file-1", None, False, None)
    first = CHAT[0]["messages"]
    assert store.records(queued.train)[0] == {"question": first[:1], "answer": first[1]["content"]}
    r = run("job-r")
    for step in (2, 4):
        r.step = step
        folder = store.checkpoint_folder("job-r", step)
        folder.mkdir(parents=True)
        store.add_checkpoint(r, folder, listed=True, metrics={})
    assert store.admission("job-r").checkpoint.step == 4 and store.admission("job-r").resumed
    store.checkpoint_folder("job-r", 4).rmdir()  # the newest one's folder is gone: no older one is taken instead
    assert store.admission("job-r").checkpoint is None


def test_a_job_starts_fails_or_succeeds_only_while_active(store):
    assert store.start(run("job-q"), resumed=False) and status(store, "job-q") == "running"
    assert store.job("job-q").total_steps == 4
    assert messages(store, "job-q") == ["Fine-tuning job started: 4 steps (2 epochs of 2)"]
    assert not store.start(run("job-c"), resumed=False)  # cancelled meanwhile
    store.fail("job-c", "internal_error", "boom")
    assert not store.succeed(run("job-c"), {})
    assert status(store, "job-c") == "cancelled" and messages(store, "job-c") == []
    store.fail("job-q", "training_diverged", "the loss is nan", "hyperparameters.learning_rate_multiplier")
    job = store.job("job-q")
    assert job.status == "failed" and job.error == {"code": "training_diverged", "message": "the loss is nan",
                                                    "param": "hyperparameters.learning_rate_multiplier"}
    assert messages(store, "job-q")[-1] == "Fine-tuning job failed: the loss is nan"


def test_a_step_advances_only_the_jobs_still_running(store):
    live, cancelled = run("job-r"), run("job-c")
    rows = {"job-r": live.next_rows(), "job-c": cancelled.next_rows()}
    assert store.record_step([live, cancelled], rows, {"job-r": 0.5, "job-c": 0.7}) == {"job-r"}
    assert (live.step, live.tokens, live.losses) == (1, 12, [0.5]) and cancelled.step == 0
    assert messages(store, "job-r") == ["Step 1/4: training loss=0.5000"] and messages(store, "job-c") == []


def test_an_unlisted_checkpoint_replaces_the_older_unlisted_ones(store):
    r = run("job-r")
    for step, listed in [(1, False), (2, True), (3, False), (4, False)]:
        r.step = step
        folder = store.checkpoint_folder("job-r", step)
        folder.mkdir(parents=True)
        store.add_checkpoint(r, folder, listed=listed, metrics={"train_loss": 1.0 / step})
    with store.db.read() as s:
        kept = [(c.step, c.listed) for c in s.scalars(select(Checkpoint).order_by(Checkpoint.step))]
    assert kept == [(2, 1), (4, 0)]
    assert [store.checkpoint_folder("job-r", step).is_dir() for step in (1, 2, 3, 4)] == [False, True, False, True]
    assert messages(store, "job-r") == ["Checkpoint created at step 2"]  # the listed one only


def test_a_job_that_succeeds_gets_its_model_and_a_results_file(store):
    r = run("job-r")
    for loss in (0.9, 0.8):
        store.record_step([r], {"job-r": r.next_rows()}, {"job-r": loss})
    assert store.succeed(r, {"loss": 0.75, "accuracy": 0.5, "users": 1})
    job = store.job("job-r")
    assert (job.status, job.fine_tuned_model, job.trained_tokens) == ("succeeded", "ft:m:job-r", 24)
    (results,) = job.result_files
    assert (store.data_dir / "files" / results).read_text() == "step,train_loss\n1,0.9\n2,0.8\n"
    with store.db.read() as s:
        file = s.get(File, results)
    assert (file.user_id, file.purpose, file.rows, file.filename) == ("user-1", "fine-tune-results", 2,
                                                                     "job-r-results.csv")
    assert messages(store, "job-r")[-3:] == ["Validation: loss=0.7500, accuracy=0.5000",
                                             "New fine-tuned model created: ft:m:job-r",
                                             "The job has successfully completed"]
    assert not store.succeed(r, {})  # once
