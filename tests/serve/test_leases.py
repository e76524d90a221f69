"""Leases (colaft.serve.leases) between processes on one PostgreSQL database, without a server:
two Leases objects stand for two processes. A claim takes a fair share and never a live lease;
an expired one is taken over; the process that lost a job writes nothing more about it
(colaft.serve.store's fencing); collaborative jobs go to one process; a stop releases."""
from __future__ import annotations

import time

import pytest
from serve_helpers import CHAT, jsonl
from sqlalchemy import update

from colaft.serve.db import Database, File, Job, User
from colaft.serve.jobs import Run
from colaft.serve.leases import Leases
from colaft.serve.store import JobStore

TTL = 1.0


@pytest.fixture
def db(postgres, request, tmp_path):
    database = Database(postgres.database(f"leases_{request.node.name.lower()}"[:60]))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-1").write_bytes(jsonl(CHAT))
    with database.session() as s:
        s.add(User(id="user-1", name="u", key_hash="0" * 64))
        s.flush()
        s.add(File(id="file-1", user_id="user-1", filename="chat.jsonl", purpose="fine-tune", bytes=1, format="chat",
                   rows=len(CHAT)))
    yield database
    database.close()


def add_jobs(db: Database, n: int, mode: str = "personal", first: int = 0) -> list[str]:
    ids = [f"job-{mode[0]}{first + i}" for i in range(n)]
    with db.session() as s:
        for i, job_id in enumerate(ids):
            s.add(Job(id=job_id, user_id="user-1", model="m", training_file="file-1", seed=0, status="queued",
                      hyperparameters={}, options={"mode": mode}, created_at=first + i))
    return ids


@pytest.fixture
def two(db):
    """Two processes' leases, "a" and "b", on `db`; stopped at the end (again, for one stopped already)."""
    pair = [Leases(db, f"http://{name}", ["m"], ttl=TTL) for name in "ab"]
    for leases in pair:
        leases.start()
    yield pair
    for leases in pair:
        leases.stop()


def test_claims_take_a_fair_share_and_never_a_live_lease(db, two):
    a, b = two
    jobs = add_jobs(db, 5)
    mine = a.claim("m")
    assert mine == jobs[:3]  # ceil(5 / 2)
    assert a.claim("m") == []  # at its share
    assert b.claim("m") == jobs[3:]  # the rest; none of a's
    assert b.claim("m") == [] and a.claim("m") == []
    assert b.holder(jobs[0]) == "http://a" and a.holder(jobs[0]) is None and a.servers()[0] == "http://a"


def test_an_expired_lease_is_taken_over_and_the_loser_writes_nothing(db, two, tmp_path):
    a, b = two
    job = add_jobs(db, 1)[0]
    assert a.claim("m") == [job]
    with db.session() as s:  # a's job runs, at step 2
        s.execute(update(Job).where(Job.id == job).values(status="running"))
    a._stop.set()  # a stalls: no more renewals (as a killed process)
    a._thread.join(5)
    assert b.claim("m") == []  # a's lease is live yet
    time.sleep(TTL + 0.5)
    assert b.claim("m") == [job]
    loser, winner = JobStore("m", db, tmp_path, owner=a.id), JobStore("m", db, tmp_path, owner=b.id)
    r = Run(job, "personal", [{"input_ids": [1, 2]}] * 4, [], 2, 2, seed=0)
    assert not loser.owns(job) and winner.owns(job)
    assert loser.record_step([r], {job: [{"input_ids": [1, 2]}]}, {job: 1.0}) == set() and r.step == 0
    folder = loser.checkpoint_folder(job, 0)
    folder.mkdir(parents=True)
    loser.add_checkpoint(r, folder, listed=True, metrics={})
    loser.fail(job, "internal_error", "lost")
    assert not loser.succeed(r, {})
    assert winner.admission(job).checkpoint is None and winner.job(job).status == "running"
    assert winner.record_step([r], {job: [{"input_ids": [1, 2]}]}, {job: 1.0}) == {job} and r.step == 1


def test_collaborative_jobs_go_to_one_process_whatever_its_share(db, two):
    a, b = two
    together = add_jobs(db, 2, "collaborative")
    alone = add_jobs(db, 2, first=10)
    assert a.claim("m") == together  # its share, ceil(4 / 2) = 2, is theirs
    assert b.claim("m") == alone
    more = add_jobs(db, 1, "collaborative", first=20)
    assert b.claim("m") == [] and a.claim("m") == more


def test_a_stop_releases_the_leases_and_leaves_the_servers(db, two):
    a, b = two
    jobs = add_jobs(db, 2)
    assert a.claim("m") == jobs[:1] and b.claim("m") == jobs[1:]
    a.stop()
    assert b.servers() == ["http://b"]
    assert b.claim("m") == jobs[:1]  # at once, not after the lease
