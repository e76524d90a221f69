"""The service's database (colaft.serve.db) on SQLite; tests/serve/test_postgres.py runs the service on PostgreSQL."""
from __future__ import annotations


def test_the_database_keeps_no_nan_and_cuts_long_messages(tmp_path):
    """A diverged loss (NaN) is stored as null (PostgreSQL's JSON, and the API's, have no NaN);
    an event message past its column's length is cut, not refused by PostgreSQL."""
    from colaft.serve.db import MESSAGE_CHARS, Database, Event, Job, User

    db = Database(f"sqlite:///{tmp_path / 'colaft.db'}")
    try:
        with db.session() as s:
            s.add(User(id="user-1", name="u", key_hash="0" * 64))
            s.flush()  # the rows no relationship orders: each before the one that points at it
            s.add(Job(id="ftjob-1", user_id="user-1", model="m", training_file="file-1", hyperparameters={},
                      options={}, seed=0, status="running"))
            s.flush()
            db.add_event(s, "ftjob-1", "x" * (MESSAGE_CHARS + 10), type="metrics",
                         data={"train_loss": float("nan"), "more": [float("inf"), 1.5]})
        with db.read() as s:
            event = s.query(Event).one()
        assert len(event.message) == MESSAGE_CHARS and event.message.endswith("...")
        assert event.data == {"train_loss": None, "more": [None, 1.5]}
    finally:
        db.close()


def test_a_database_of_an_older_colaft_gets_the_new_columns(tmp_path):
    """Columns added since (jobs.integrations, the leases) are added to an existing table, its rows
    reading None, and a table added since (servers) is made: its jobs are claimed as any."""
    import sqlite3

    from colaft.serve.db import Database, Job, User
    from colaft.serve.leases import Leases

    path = tmp_path / "colaft.db"
    Database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as c:
        for column in ("integrations", "lease_owner", "lease_expires_at"):  # as an older colaft made it
            c.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        c.execute("DROP TABLE servers")
        c.execute("INSERT INTO users (id, name, key_hash, created_at) VALUES ('user-1', 'u', 'k', 0)")
        c.execute("INSERT INTO jobs (id, user_id, model, training_file, hyperparameters, options, seed, status, "
                  "created_at, total_steps, result_files) VALUES ('ftjob-1', 'user-1', 'm', 'f', '{}', '{}', 0, "
                  "'queued', 0, 0, '[]')")
    db = Database(f"sqlite:///{path}")
    try:
        with db.read() as s:
            job = s.get(Job, "ftjob-1")
            assert job.integrations is None and job.to_api()["integrations"] == [] and job.lease_owner is None
            assert s.get(User, "user-1").name == "u"
        leases = Leases(db, "", ["m"])
        assert leases.claim("m") == ["ftjob-1"]
        with db.read() as s:
            assert s.get(Job, "ftjob-1").lease_owner == leases.id
    finally:
        db.close()


def test_a_read_is_answered_while_every_handler_thread_waits_to_write(tmp_path):
    """A writer holds SQLite's write lock (a step being recorded) and every other API handler
    thread waits for it, each holding a connection: a read (a job's status) still gets a
    connection and its answer. With SQLAlchemy's default pool (15) it waited for a writer."""
    import threading
    import time

    from colaft.serve.api import HTTP_THREADS
    from colaft.serve.auth import add_user, list_users
    from colaft.serve.db import Database

    db = Database(f"sqlite:///{tmp_path / 'colaft.db'}")
    add_user(db, "alice")
    held, release, threads = threading.Event(), threading.Event(), []

    def hold_the_write_lock():
        with db.session() as s:
            s.connection()  # BEGIN IMMEDIATE: the write lock
            held.set()
            release.wait(60)

    def write():
        with db.session() as s:
            s.connection()  # a connection, then BEGIN IMMEDIATE: waits for the lock

    try:
        threads.append(threading.Thread(target=hold_the_write_lock))
        threads[0].start()
        assert held.wait(30)
        threads += [threading.Thread(target=write) for _ in range(HTTP_THREADS - 1)]
        for t in threads[1:]:
            t.start()
        # until every writer holds its connection (or a few seconds: the pool has none left, and
        # the writers holding one keep it while they wait, up to SQLite's 30 s busy timeout)
        deadline = time.monotonic() + 5
        while db.engine.pool.checkedout() < HTTP_THREADS and time.monotonic() < deadline:
            time.sleep(0.05)
        names = []
        reader = threading.Thread(target=lambda: names.extend(u.name for u in list_users(db)))
        reader.start()
        reader.join(15)  # a deadlock guard, not a speed limit: the writers wait until it is over
        assert names == ["alice"], "the read waited for a connection held by a waiting writer"
    finally:
        release.set()
        for t in threads:
            t.join(60)
        db.close()
