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
