"""What the service remembers: users, files, jobs, events, checkpoints (SQLAlchemy).

Embedded SQLite by default (`<data-dir>/colaft.db`); any SQLAlchemy URL works
(`--database-url postgresql+psycopg://...` with its driver installed). Every change is one
transaction, committed before the API answers, so a killed server loses nothing it
acknowledged. Ids are OpenAI-shaped strings ("file-...", "ftjob-..."); times are Unix seconds.

Written for both SQLite and PostgreSQL (tested on both): times and byte counts are 64-bit
(PostgreSQL's INTEGER ends in 2038 and at 2 GiB), text is cut to its column's length, JSON
holds no NaN (PostgreSQL rejects it), and a row that is read, checked and then changed is
read with `with_for_update()` (PostgreSQL's READ COMMITTED would otherwise let two writers
both act on the old value; SQLite's write lock, taken at BEGIN, already serialises them).
"""
from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

ACTIVE = ("validating_files", "queued", "running", "paused")
"""Job statuses that still hold resources (files may not be deleted, training may go on or resume)."""
FINAL = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


MESSAGE_CHARS = 2000
"""Longest event message stored (Event.message); longer ones are cut."""


def _finite(value):
    """`value` with every NaN or infinity (a diverged loss) replaced by None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _to_json(value) -> str:
    return json.dumps(_finite(value), allow_nan=False)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # sha256 hex of the API key
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(50))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    format: Mapped[str] = mapped_column(String(20))  # "chat" | "classification" | "results"
    rows: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[Any] | None] = mapped_column(default=None)  # classification: the distinct labels, sorted

    def to_api(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": f"{self.rows} {self.format} records"}  # no expires_at: files do not expire


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    model: Mapped[str] = mapped_column(String(500))  # the base model's id
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), default=None)
    hyperparameters: Mapped[dict[str, Any]]  # resolved: n_epochs, batch_size, learning_rate_multiplier
    options: Mapped[dict[str, Any]]  # colaft's own (ColaftOptions), resolved
    seed: Mapped[int] = mapped_column(Integer)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    meta: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # the API's "metadata"
    integrations: Mapped[list[Any] | None] = mapped_column(default=None)  # as given (shown, not acted on)
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(600), default=None)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    labels: Mapped[list[Any] | None] = mapped_column(default=None)  # classification: head output i is labels[i]
    result_files: Mapped[list[Any]] = mapped_column(default=list)
    model_deleted_at: Mapped[int | None] = mapped_column(BigInteger, default=None)  # DELETE /v1/models/{id}
    # the serve process that trains it (colaft.serve.leases), until the database's clock passes the expiry
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[float | None] = mapped_column(Double, default=None)

    @property
    def model_name(self) -> str:
        """The fine-tuned model's id once the job succeeds: ft:<base>:<suffix>:<job id> (OpenAI's
        form, with the base model for the organisation), ft:<base>:<job id> without a suffix."""
        return ":".join(["ft", self.model, *([self.suffix] if self.suffix else []), self.id])

    def to_api(self) -> dict:
        hyper = dict(self.hyperparameters)
        return {"id": self.id, "object": "fine_tuning.job", "created_at": self.created_at, "error": self.error,
                "fine_tuned_model": self.fine_tuned_model, "finished_at": self.finished_at,
                "hyperparameters": hyper, "model": self.model, "organization_id": self.user_id,
                "result_files": list(self.result_files or []), "seed": self.seed, "status": self.status,
                "trained_tokens": self.trained_tokens, "training_file": self.training_file,
                "validation_file": self.validation_file, "estimated_finish": None,
                "integrations": [_integration(i) for i in self.integrations or []],
                "metadata": self.meta, "suffix": self.suffix,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
                "colaft": dict(self.options) | ({"labels": list(self.labels)} if self.labels is not None else {})}


def _integration(integration: dict) -> dict:
    """As OpenAI shows it: a W&B integration's `tags` are a list, left out when none were given."""
    wandb = integration.get("wandb") or {}
    return {**integration, "wandb": {k: v for k, v in wandb.items() if k != "tags" or v is not None}}


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # order of writing
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")  # "message" | "metrics"
    message: Mapped[str] = mapped_column(String(MESSAGE_CHARS))
    data: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    def to_api(self) -> dict:
        return {"id": self.id, "object": "fine_tuning.job.event", "created_at": self.created_at,
                "level": self.level, "message": self.message, "data": self.data or {}, "type": self.type}


CHECKPOINT_METRICS = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                      "full_valid_loss", "full_valid_mean_token_accuracy")
"""The metrics a checkpoint shows (OpenAI's), when they are finite; the rest of its row's (its
trained tokens) is for resuming."""


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    metrics: Mapped[dict[str, Any]]
    path: Mapped[str] = mapped_column(String(1000))  # relative to the data folder
    listed: Mapped[int] = mapped_column(Integer, default=1)  # 0: kept for resuming only

    def to_api(self, model: str) -> dict:
        return {"id": self.id, "object": "fine_tuning.job.checkpoint", "created_at": self.created_at,
                "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{self.step}", "fine_tuning_job_id": self.job_id,
                "metrics": {"step": self.step, **{k: v for k, v in self.metrics.items()
                                                  if k in CHECKPOINT_METRICS and v is not None}},
                "step_number": self.step}


class Server(Base):
    """A `colaft serve` process on this database (colaft.serve.leases): where it answers, its base
    models, and when it last said it was alive (the database's clock, seconds)."""

    __tablename__ = "servers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(500))  # --advertise-url: where other processes send its clients
    models: Mapped[list[Any]]
    started_at: Mapped[int] = mapped_column(BigInteger, default=now)
    heartbeat_at: Mapped[float] = mapped_column(Double)


def clock(dialect: str):
    """The database server's clock in Unix seconds, as SQL: every process compares leases on one
    clock, whatever its own machine's says."""
    if dialect == "sqlite":
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Double)
    return literal_column("CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)", Double)


def active_jobs(s: Session, user_id: str) -> int:
    """The user's jobs that are queued, running or paused (ACTIVE)."""
    return s.scalar(select(func.count()).select_from(Job).where(Job.user_id == user_id, Job.status.in_(ACTIVE)))


def stored_bytes(s: Session, user_id: str) -> int:
    """Bytes of the user's files: uploads and results files."""
    return s.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.user_id == user_id))


def _add_new_columns(engine) -> None:
    """Add the nullable columns a newer colaft has to the tables of an older one's database
    (create_all makes missing tables only): their rows read them as None."""
    tables = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in tables.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(dialect=engine.dialect)
                    connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')


POOL_SIZE = 56
"""Database connections kept open: more than the API's handler threads (colaft.serve.api.HTTP_THREADS
and routes.common.READ_THREADS)."""


class Database:
    """An engine and short sessions, one per unit of work: `with db.session() as s:` (reads and
    writes, committed at the end) or `with db.read() as s:` (reads only)."""

    def __init__(self, url: str):
        sqlite = url.startswith("sqlite")
        self.url = url
        # A connection for every request handler thread and engine: with SQLAlchemy's default
        # pool (5 + 10) the handlers' reads queued for connections that writers held while they
        # waited for SQLite's write lock, and a job's status took seconds under load.
        pool = {"pool_size": POOL_SIZE, "max_overflow": 8}
        if sqlite:
            self.engine = create_engine(url, json_serializer=_to_json, **pool,
                                        connect_args={"check_same_thread": False, "timeout": 30})
        else:  # a database server may restart under us: test each pooled connection before use
            self.engine = create_engine(url, json_serializer=_to_json, pool_pre_ping=True, **pool)
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(connection, _):
                connection.isolation_level = None  # transactions begin as `_begin` says, not as sqlite3 guesses
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the trainer's writes
                cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the API answers
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

            @event.listens_for(self.engine, "begin")
            def _begin(connection):
                # A writing transaction takes the write lock when it begins: one that read first
                # and wrote later would fail (not wait) if another had written in between.
                immediate = connection.get_execution_options().get("immediate", False)
                connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
        Base.metadata.create_all(self.engine)
        _add_new_columns(self.engine)
        self._writers = sessionmaker(self.engine.execution_options(immediate=True), expire_on_commit=False)
        self._readers = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._writers() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._readers() as s, s.begin():
            yield s

    def add_event(self, s: Session, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None) -> Event:
        if len(message) > MESSAGE_CHARS:
            message = message[:MESSAGE_CHARS - 3] + "..."
        e = Event(id=new_id("ftevent"), job_id=job_id, message=message, level=level, type=type, data=data,
                  created_at=now())
        s.add(e)
        return e

    def users_by_key_hash(self, key_hashes: list[str]) -> dict[str, User]:
        """The users of those keys that exist, by key hash (one query per 500 keys)."""
        with self.read() as s:
            return {u.key_hash: u for i in range(0, len(key_hashes), 500)
                    for u in s.scalars(select(User).where(User.key_hash.in_(key_hashes[i:i + 500])))}

    def close(self) -> None:
        self.engine.dispose()
