"""The `colaft serve` and `colaft users` commands (registered in colaft.app.cli.COMMANDS)."""
from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

DATA_DIR = Path("colaft-data")
DEFAULT_MODELS = ["smollm2-135m", "minilm-l6"]  # the built-ins: a chat model and a classifier
SWITCH_INTERVAL = float(os.environ.get("COLAFT_SWITCH_INTERVAL", "0.001"))
"""Seconds a thread holds the GIL before one waiting for it may take it (sys.setswitchinterval)."""


def _database(data_dir: Path, database_url: str | None):
    """The service's database, in a data folder only its owner can read (SQLite's file included)."""
    from colaft.serve.db import Database

    make_private(data_dir)
    if database_url is None:
        # Created 0600 before SQLite opens it: SQLite gives its -wal, -shm and -journal files the
        # database file's mode, and `colaft users` runs without the server's umask.
        os.close(os.open(data_dir / "colaft.db", os.O_CREAT | os.O_WRONLY, 0o600))
    return Database(database_url or f"sqlite:///{data_dir.resolve() / 'colaft.db'}")


DATA_MARKERS = ("colaft.db", "serve.lock", "files", "jobs")
"""What a colaft data folder holds (the database, uploads, jobs' checkpoints and adapters)."""


def make_private(data_dir: Path) -> None:
    """Create `data_dir` 0700, or tighten an existing one: its folders 0700 and files 0600 (an
    older server left them 0755 and 0644). Uploads, adapters and the database are the users'
    data; nobody else on the machine may read them. A folder holding other things (a mistyped
    --data-dir, a home folder) is refused: its modes are not ours to change."""
    if data_dir.is_dir() and any(data_dir.iterdir()) and not any((data_dir / m).exists() for m in DATA_MARKERS):
        raise ValueError(f"--data-dir {str(data_dir)!r} holds other files and no colaft data "
                         f"({', '.join(DATA_MARKERS)}): give a new or empty folder")
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for root, folders, files in os.walk(data_dir):
        for name in folders + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's target may lie outside: leave it as it is
                try:
                    os.chmod(path, 0o700 if name in folders else 0o600)
                except FileNotFoundError:  # a running server's temporary file, renamed since it was listed
                    pass


def parse_model(spec: str) -> tuple[str, str]:
    """--model [ID=]NAME_OR_DIR -> (id, name or folder); the id defaults to the name or the folder's name."""
    model_id, sep, source = spec.partition("=")
    if not sep:
        source = spec
        model_id = spec if "/" not in spec and not Path(spec).is_dir() else Path(spec).resolve().name
    if not model_id or ":" in model_id or not source:
        raise ValueError(f"--model {spec!r}: give NAME_OR_DIR or ID=NAME_OR_DIR (an id has no ':')")
    return model_id, source


def model_task(source: str) -> str:
    """clm for a causal LM (its config's architectures), sc (classification) for anything else."""
    from transformers import AutoConfig

    from colaft.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(source))
    return "clm" if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else "sc"


def serve(
    model: Annotated[Optional[list[str]], typer.Option(
        help="Base model to serve, [ID=]NAME_OR_DIR; repeat for more (default: the built-ins smollm2-135m "
             "and minilm-l6). Causal LMs train on chat data, other models on text/label classification.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Uploaded files, checkpoints, adapters, the SQLite database.")]
    = DATA_DIR,
    database_url: Annotated[Optional[str], typer.Option(
        help="SQLAlchemy URL (default: sqlite in --data-dir; e.g. postgresql+psycopg://...).")] = None,
    backend: Annotated[Optional[str], typer.Option(
        help="Where the fits run: process | ray | inline (default: process when installed, else inline).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes or Ray actors (process, ray).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="An existing Ray cluster (ray backend).")] = None,
    transfer_dtype: Annotated[str, typer.Option(
        help="Precision of the packets sent to the workers and to fit clients: float32 (exact) | bfloat16 "
             "(half the bytes; the fits keep their own precision).")] = "float32",
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (413 past it).")] = 100.0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint each running job every so many steps.")] = 20,
    num_labels: Annotated[int, typer.Option(help="Outputs of a classification model's head.")] = 2,
    max_loaded_adapters: Annotated[int, typer.Option(
        help="Finished jobs' adapters kept loaded per base model for inference; the least recently used "
             "past this are unloaded and loaded from disk again when asked for.")] = 8,
    client_timeout: Annotated[float, typer.Option(
        help="A client-fit job whose `colaft client` has not pulled for so many seconds waits (other jobs "
             "go on) until it is back.")] = 30.0,
    max_active_jobs_per_user: Annotated[int, typer.Option(
        help="Quota: a user's queued, running and paused jobs at once; one more is refused (429). "
             "0: no limit.")] = 32,
    max_stored_mb_per_user: Annotated[float, typer.Option(
        help="Quota: MiB of a user's files (uploads and jobs' results files); an upload past it is refused "
             "(429). 0: no limit.")] = 10240.0,
    max_requests_per_minute_per_user: Annotated[int, typer.Option(
        help="Quota: API requests per user per minute (a moving window); past it 429 with Retry-After. "
             "0 (default): no limit.")] = 0,
    max_polls_per_key: Annotated[int, typer.Option(
        help="Quota: long polls of client-fit jobs' packets (GET .../fit/packets?wait=S) one API key may have "
             "waiting at once; one more is refused (429 with Retry-After). A client holds one per job it fits. "
             "0: no limit.")] = 32,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(
        help="Cap on a completion's prompt tokens; a longer prompt is refused (400, param messages or prompt). "
             "Default: the model's context less the completion cap; never past the context.")] = None,
    max_completion_tokens: Annotated[Optional[int], typer.Option(
        help="Cap on a completion's max_tokens (400 past it, param max_tokens); prompt plus max_tokens must "
             "also fit the model's context. Default: half the model's context, 4096 at most.")] = None,
    max_step_tokens: Annotated[int, typer.Option(
        min=0, help="Padded tokens per training step at most: with more running jobs the engine takes more "
                    "steps, each job still one per turn, so the server's memory does not grow with the "
                    "number of jobs. 0: all personal jobs in one step.")] = 8192,
    training_niceness: Annotated[int, typer.Option(
        min=0, max=19, help="How much lower the CPU priority of training and decoding (and the fit workers they "
                            "start) is than the API's: requests are answered at once however busy the machine. "
                            "0: the same.")] = 10,
    advertise_url: Annotated[Optional[str], typer.Option(
        help="Where the other serve processes on the same --database-url send the clients of the jobs this one "
             "trains (default: http://HOST:PORT, this machine's name for HOST when it listens on all "
             "addresses).")] = None,
    lease_seconds: Annotated[float, typer.Option(
        help="With several serve processes on one --database-url: a dead process's jobs are taken over by "
             "another once their leases are this many seconds past their last renewal.")] = 10.0,
    rate_window: Annotated[int, typer.Option(
        hidden=True, help="Seconds of the request-rate window (tests shorten the minute).")] = 60,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve fine-tuning (OpenAI-shaped API) and inference on one or more base models."""
    import uvicorn

    from colaft.backends import BACKENDS
    from colaft.packets import TRANSFER_DTYPES
    from colaft.runtime import set_threads
    from colaft.serve.api import RedactKeys, Service, create_app, log_config
    from colaft.serve.db import File
    from colaft.serve.leases import Leases
    from colaft.serve.scheduler import Engine
    from colaft.serve.settings import Settings, default_backend

    if checkpoint_every < 1 or num_labels < 2 or max_upload_mb <= 0 or max_loaded_adapters < 1 \
            or client_timeout <= 0:
        raise ValueError("--checkpoint-every >= 1, --num-labels >= 2, --max-upload-mb > 0, "
                         "--max-loaded-adapters >= 1 and --client-timeout > 0, please")
    if min(max_active_jobs_per_user, max_stored_mb_per_user, max_requests_per_minute_per_user,
           max_polls_per_key) < 0 or rate_window < 1:
        raise ValueError("--max-active-jobs-per-user, --max-stored-mb-per-user, --max-requests-per-minute-per-user "
                         "and --max-polls-per-key are >= 0 (0: no limit), please")
    if not 1.0 <= lease_seconds <= 3600:
        raise ValueError("--lease-seconds is between 1 and 3600, please")
    if min(max_prompt_tokens or 1, max_completion_tokens or 1) < 1:
        raise ValueError("--max-prompt-tokens and --max-completion-tokens are >= 1, please")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    options = {k: v for k, v in {"workers": workers, "address": ray_address}.items() if v is not None}
    if transfer_dtype not in TRANSFER_DTYPES:
        raise ValueError(f"--transfer-dtype: unknown transfer dtype {transfer_dtype!r}; "
                         f"use one of {', '.join(TRANSFER_DTYPES)}")
    if (workers is not None and backend not in ("process", "ray")) or (ray_address and backend != "ray"):
        raise ValueError("--workers is an option of the process and ray backends, --ray-address of ray")
    specs = [parse_model(m) for m in (model or DEFAULT_MODELS)]
    if len({i for i, _ in specs}) != len(specs):
        raise ValueError("two --model options have the same id: name them ID=NAME_OR_DIR")
    # Everything this process and the workers it starts write is the users' data, written under
    # --data-dir: files 0600, folders 0700, whichever writer (SQLite, safetensors, shutil) makes
    # them. The server writes nothing meant for other accounts, so no writer needs a wider mode.
    os.umask(0o077)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactKeys())
    set_threads()
    lock = None
    if database_url is None:
        make_private(data_dir)
        lock = _only_server(data_dir)
    db = _database(data_dir, database_url)
    settings = Settings(data_dir=data_dir.resolve(), backend=backend, backend_options=options,
                        transfer_dtype=transfer_dtype,
                        checkpoint_every=checkpoint_every, num_labels=num_labels,
                        max_loaded_adapters=max_loaded_adapters, client_timeout=client_timeout,
                        max_active_jobs=max_active_jobs_per_user,
                        max_stored_bytes=max(1, int(max_stored_mb_per_user * 2**20)) if max_stored_mb_per_user
                        else 0,
                        max_requests=max_requests_per_minute_per_user, rate_window=rate_window,
                        max_polls=max_polls_per_key, training_niceness=training_niceness,
                        max_prompt_tokens=max_prompt_tokens, max_completion_tokens=max_completion_tokens,
                        max_step_tokens=max_step_tokens)
    _remove_orphans(db, settings.data_dir, File, shared=database_url is not None)
    leases = Leases(db, advertise_url or _default_url(host, port), [i for i, _ in specs], ttl=lease_seconds)
    engines = {}
    for model_id, source in specs:
        task = model_task(source)
        engines[model_id] = Engine(model_id, source, task, db, settings, leases)
        print(f"colaft serve: model {model_id} ({source}, {'chat' if task == 'clm' else 'classification'})",
              file=sys.stderr)
    service = Service(settings, db, engines, int(max_upload_mb * 2**20), int(time.time()), leases)
    print(f"colaft serve: http://{host}:{port}/v1 (data in {settings.data_dir}, fits on the {backend} backend)",
          file=sys.stderr, flush=True)
    app = create_app(service)
    # Everything loaded so far (the libraries, the base models) lives as long as the server: out of
    # the garbage collector's sight, a full collection no longer walks millions of objects while
    # holding the GIL (hundreds of milliseconds during which no request is answered).
    gc.collect()
    gc.freeze()
    # The engine thread runs Python between its kernels; a request thread waiting for the GIL
    # gets it after at most the switch interval, and a request waits for it many times (every
    # database call, every socket write gives it up). 5 ms (the default) made a status call
    # ~100-200 ms during 64 jobs' steps; 1 ms keeps it near its unloaded time.
    sys.setswitchinterval(SWITCH_INTERVAL)
    raise_open_files()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), log_config=log_config())
    finally:
        if lock is not None:  # the data folder is free for the next server
            lock.close()


OPEN_FILES = 65536
"""Open files (sockets included) the server asks for: every waiting long poll holds a connection,
and a soft limit of 1024 (a common default) would refuse connections past it."""


def raise_open_files(wanted: int = OPEN_FILES) -> int:
    """Raise this process's soft limit of open files to `wanted` (at most the hard limit); the limit now."""
    try:
        import resource
    except ImportError:  # not on Windows
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


ORPHAN_AGE = 3600.0
"""Seconds an unrecorded file in a shared data folder must have lain there before a starting
server removes it: another process may be between writing an upload and recording it."""


def _remove_orphans(db, data_dir: Path, File, shared: bool = False) -> None:
    """Files a killed server wrote but never recorded (or half-wrote): nobody can reach them.
    `shared`: other processes may be writing the folder; only old files are removed."""
    from sqlalchemy import select

    folder = data_dir / "files"
    if not folder.is_dir():
        return
    with db.read() as s:
        known = set(s.scalars(select(File.id)))
    for path in folder.iterdir():
        if path.name not in known:
            try:
                if shared and time.time() - path.stat().st_mtime < ORPHAN_AGE:
                    continue
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)


def _only_server(data_dir: Path):
    """An exclusive lock on the data folder's embedded database (the open lock file: the lock
    lasts while it is open), or a refusal in one line: SQLite serves one process; several share
    a database server (--database-url)."""
    try:
        import fcntl
    except ImportError:  # not on Windows: nothing to lock with
        return None
    lock = open(data_dir / "serve.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another colaft serve uses --data-dir {str(data_dir)!r}, whose SQLite database serves one "
                         "process: run several on one database with --database-url postgresql+psycopg://...") from None
    return lock


def _default_url(host: str, port: int) -> str:
    """Where this server is reached from other machines: its host, or this machine's name when it
    listens on every address."""
    import socket

    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{name}]' if ':' in name else name}:{port}"


def users(
    action: Annotated[str, typer.Argument(help="add | list | rotate-key")],
    name: Annotated[Optional[str], typer.Argument(help="The user's name (add, rotate-key).")] = None,
    data_dir: Annotated[Path, typer.Option(help="The service's data folder.")] = DATA_DIR,
    database_url: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (default: sqlite in --data-dir).")]
    = None,
) -> None:
    """Manage the service's users: `add NAME` prints its new API key once (stdout, alone on its line)."""
    from colaft.serve import auth

    if action not in ("add", "list", "rotate-key"):
        raise ValueError(f"unknown action {action!r}: add | list | rotate-key")
    if action != "list" and not name:
        raise ValueError(f"users {action} needs a NAME")
    db = _database(data_dir, database_url)
    try:
        if action == "add":
            user, key = auth.add_user(db, name)
            print(f"user {auth.shown(user.name)} ({user.id}) added; its API key, shown only now:", file=sys.stderr)
            print(key)
        elif action == "rotate-key":
            key = auth.rotate_key(db, name)
            print(f"new API key of {auth.shown(name)} (the old one no longer works), shown only now:", file=sys.stderr)
            print(key)
        else:
            for user in auth.list_users(db):
                since = time.strftime('%Y-%m-%d %H:%M', time.localtime(user.created_at))
                print(f"{auth.shown(user.name)}\t{user.id}\tsince {since}")
    finally:
        db.close()
