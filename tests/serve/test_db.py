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
    """A column added since (jobs.integrations) is added to an existing table, its rows reading None."""
    import sqlite3

    from colaft.serve.db import Database, Job, User

    path = tmp_path / "colaft.db"
    Database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as c:
        c.execute("ALTER TABLE jobs DROP COLUMN integrations")  # as an older colaft made it
        c.execute("INSERT INTO users (id, name, key_hash, created_at) VALUES ('user-1', 'u', 'k', 0)")
        c.execute("INSERT INTO jobs (id, user_id, model, training_file, hyperparameters, options, seed, status, "
                  "created_at, total_steps, result_files) VALUES ('ftjob-1', 'user-1', 'm', 'f', '{}', '{}', 0, "
                  "'queued', 0, 0, '[]')")
    db = Database(f"sqlite:///{path}")
    try:
        with db.read() as s:
            job = s.get(Job, "ftjob-1")
            assert job.integrations is None and job.to_api()["integrations"] == []
            assert s.get(User, "user-1").name == "u"
    finally:
        db.close()
