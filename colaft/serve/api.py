"""The HTTP API (FastAPI), shaped like OpenAI's files, fine-tuning and completions APIs.

    request -> key check (auth) -> validate (pydantic, then against the database)
            -> one database transaction -> the engine of the job's base model is told
               (a thread-safe queue; never waited for) -> the answer

Handlers that touch the database are plain functions (FastAPI runs them in its thread
pool), each a few short queries; completions await the engine's future and a client-fit
job's long poll awaits its channel, so nothing waits in a thread and the event loop never
blocks on training.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}; an invalid request
(a body or query that breaks the schema) is a 400 `invalid_request_error` naming the field in
`param`, as OpenAI answers. Another user's id answers exactly like an id that does not exist (404).

This module assembles the app: middleware, error handlers, /health, and the routers of
colaft.serve.routes (files, fine-tuning jobs and their pause and resume, inference, models, the
dashboard page at /), and its OpenAPI schema (/openapi.json, /docs): FastAPI's, from the routes' declared answers
(colaft.serve.objects) and security (routes.common.BEARER), less the 422 FastAPI assumes and
this server never sends (an invalid request is a 400). A method a path does not take is a 405
whose Allow lists the methods it does take.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import math
import re
import threading
from contextlib import asynccontextmanager

import anyio.to_thread
from anyio._backends._asyncio import WorkerThread
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from colaft import __version__
from colaft.serve.heap import Heap
from colaft.serve.objects import Health
from colaft.serve.routes import dashboard, files, fit, inference, jobs, models, pausing
from colaft.serve.routes.common import APIError, BodyLimit, Service, error_response, read_threads
from colaft.serve.routes.gate import Gate
from colaft.serve.routes.openapi import answers, truthful

__all__ = ["APIError", "RedactKeys", "Service", "create_app", "log_config", "redact"]

HTTP_THREADS = 40
"""Threads that run the plain-function handlers (anyio's default). None of them waits on a
client or on the engine (a long poll is a coroutine), so this bounds the handlers' work at
once, not the clients a server can hold."""

_KEY = re.compile(r"sk(?:-|%2d)colaft(?:-|%2d)[\w%-]*", re.IGNORECASE)  # keys are URL-safe base64
_SECRET_PARAM = re.compile(r"([?&;][^=&;\s]*(?:key|token|secret|password|auth)[^=&;\s]*=)[^&;#\s\"]*",
                           re.IGNORECASE)


class RedactKeys(logging.Filter):
    """Keeps keys out of every log line: an API key (by its prefix, also percent-encoded), and the
    value of any query parameter named like a secret (`?api_key=...`, `token=`, ...).

    The server takes keys only from the Authorization header, which is never logged; a client
    that puts one in a URL anyway gets a 401, and uvicorn's access log would print that URL.
    The access log formats its record's arguments (the path with its query), so they are
    redacted too, not only the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def redact(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1[redacted]", _KEY.sub("sk-colaft-[redacted]", text))


def log_config() -> dict:
    """uvicorn's logging configuration with RedactKeys on each of its handlers (access and errors)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_keys"] = {"()": RedactKeys}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_keys")
    return config


_TYPE_TAG = re.compile(r"[-\[]|^(int|float|str|bool|list|dict)$")


async def start_handler_threads() -> None:
    """Every handler thread started now and kept for the app's life. anyio starts a thread when
    none is idle, and the event loop waits until it runs; it lets a thread go after 10 idle
    seconds. So each burst after a lull stalled the loop on thread starts: under `colaft bench
    serve --abuse` the slowest status answers came in the first seconds of each load window,
    after 15 quiet seconds."""
    WorkerThread.MAX_IDLE_TIME = math.inf  # anyio's own setting; it has no public one
    started = threading.Barrier(HTTP_THREADS)
    await asyncio.gather(*(anyio.to_thread.run_sync(started.wait) for _ in range(HTTP_THREADS)))


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = HTTP_THREADS
        await start_handler_threads()
        service.reads = read_threads()
        heap = Heap()
        heap.start()  # no long garbage collection pause while serving (colaft.serve.heap)
        if service.leases is not None:
            await run_in_threadpool(service.leases.start)
        for engine in service.engines.values():
            engine.start()
        yield
        await run_in_threadpool(_stop_engines, service)
        service.reads.shutdown(wait=False)
        heap.stop()

    app = FastAPI(title="colaft", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  description="Fine-tuning as a service, shaped like OpenAI's files, fine-tuning, models and "
                              "completions APIs. Every error is OpenAI's envelope "
                              "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
    app.state.service = service
    app.add_middleware(BodyLimit, upload_limit=service.max_upload_bytes)
    app.add_middleware(Gate)  # outermost: refusals known from memory cost no routing (routes/gate.py)
    for router in (files.router, jobs.router, pausing.router, fit.router, inference.router, models.router,
                   dashboard.router):
        app.include_router(router)

    # ------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()  # a value matching no branch of `"auto" | int` fails both: name the number's rule
        first = min(errors, key=lambda x: x["type"] == "literal_error")
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "path")]
        loc = [p for p in loc if not _TYPE_TAG.search(p)]  # pydantic's branch names: "constrained-int", ...
        message = str(first.get("ctx", {}).get("error", first["msg"])) if first["type"] == "value_error" \
            else first["msg"]
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {message}" if param else message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # logged by the server; the client learns nothing more
        return error_response(500, "the server failed to handle the request", type="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):  # an unknown path (404) or method (405)
        headers = dict(e.headers or {})
        if e.status_code == 405:
            headers["Allow"] = allowed_methods(app, request.url.path, headers.get("Allow", ""))
        return error_response(e.status_code, str(e.detail), headers=headers or None)

    @app.get("/health", responses=answers(Health))
    async def health():  # in the event loop: no thread, no database, whatever else is going on
        return {"status": "ok", "models": list(service.engines), "long_polls": service.polls.waiting,
                "ready": all(e.ready.is_set() for e in service.engines.values()),
                "training": {m: {"steps": e.steps, "rows": e.rows, "step_seconds": round(e.step_seconds, 6),
                                 "running_jobs": len(e.runs)} for m, e in service.engines.items()}}

    schema = app.openapi
    app.openapi = lambda: truthful(app, schema)
    return app


def allowed_methods(app: FastAPI, path: str, fallback: str) -> str:
    """The Allow of a 405 at `path`: every method the schema has there (Starlette's 405 names
    only one route's, and a path may have several), or `fallback` at a path not in the schema."""
    methods = {method.upper() for template, operations in app.openapi()["paths"].items()
               if compile_path(template)[0].match(path) for method in operations}
    return ", ".join(sorted(methods)) or fallback


def _stop_engines(service: Service) -> None:
    for engine in service.engines.values():
        engine.stop()
    if service.leases is not None:  # after the engines' last checkpoints: the others take over at once
        service.leases.stop()
