"""What every router shares: the service, the calling user, OpenAI-shaped errors, ownership, pages."""
from __future__ import annotations

import asyncio
import hashlib
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from colaft import __version__, formats
from colaft.serve import auth
from colaft.serve.db import Database, User
from colaft.serve.leases import Leases
from colaft.serve.scheduler import Engine
from colaft.serve.settings import Settings


@dataclass
class Service:
    """Everything the handlers share."""

    settings: Settings
    db: Database
    engines: dict[str, Engine]
    max_upload_bytes: int
    started_at: int
    leases: Leases | None = None  # this process among those on the database (None: it is alone, not registered)
    rate: RateLimit = field(init=False)
    polls: PollLimit = field(init=False)
    keys: auth.KeyCache = field(init=False)
    reads: ThreadPoolExecutor | None = None  # the read-only handlers' threads (`read`), made with the app

    def __post_init__(self):
        self.keys = auth.KeyCache(self.db)
        self.rate = RateLimit(self.settings.max_requests, self.settings.rate_window)
        self.polls = PollLimit(self.settings.max_polls)

    @property
    def shared(self) -> bool:
        """Other serve processes may share the database (and train some of its jobs)."""
        return self.leases is not None and not self.leases.exclusive


READ_THREADS = 8
"""Threads of their own for the reads users poll (a job, its events): a burst of writes (jobs
created at once, each waiting for SQLite's write lock) can hold every handler thread, and a
status read, which needs no lock, would wait for one of them. All are started with the app and
live as long as it: a thread started on demand stalls the event loop until it runs (a
`py-spy --gil` profile under attack caught the loop in `Thread.start`), and anyio's pool lets a
thread go after 10 idle seconds, so every burst after a lull started them again."""


def read_threads() -> ThreadPoolExecutor:
    """The READ_THREADS, every one started now (a pool starts a thread only when none is idle,
    so each of these first tasks waits until all have begun)."""
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="colaft-read")
    started = threading.Barrier(READ_THREADS)
    for f in [pool.submit(started.wait) for _ in range(READ_THREADS)]:
        f.result()
    return pool


async def read(service: Service, query: Callable[[Session], Any]) -> Any:
    """`query(session)` in a read-only transaction, on one of the READ_THREADS."""
    def run():
        with service.db.read() as s:
            return query(s)
    return await asyncio.get_running_loop().run_in_executor(service.reads, run)


class RateLimit:
    """At most `limit` requests per user in any `window` seconds (a moving window, in this
    process's memory: a restart forgets it); limit 0: no limit. Called on the event loop only.

    Each user's last `limit` request times, in a deque. The `limits` package's memory storage did
    this before; it expires entries with a `threading.Timer` that it starts again whenever the
    last one has run out, so under steady traffic it started a thread every ~10 ms, and
    `Thread.start` on the event loop waits until the thread runs (a GIL profile of the server
    under `colaft bench serve --abuse` caught it there).
    """

    def __init__(self, limit: int, window: int, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._times: dict[str, deque[float]] = {}  # user -> its last `limit` requests
        self._swept = clock()

    def refusal(self, user_id: str) -> APIError | None:
        """Count one request of the user: None if it is allowed, else its 429 with Retry-After."""
        if not self.limit:
            return None
        now = self.clock()
        if now - self._swept > self.window:  # forget the users with no request in the window
            self._times = {u: t for u, t in self._times.items() if t[-1] > now - self.window}
            self._swept = now
        times = self._times.setdefault(user_id, deque(maxlen=self.limit))
        if len(times) == self.limit and times[0] >= now - self.window:  # refused: not counted
            wait = max(1, math.ceil(times[0] + self.window - now))
            return quota_exceeded(f"Too many requests: at most {self.limit} per {self.window} s per user "
                                  f"(colaft serve --max-requests-per-minute-per-user); retry after {wait} s",
                                  headers={"Retry-After": str(wait)})
        times.append(now)  # the oldest falls out
        return None


class PollLimit:
    """At most `limit` long polls per user at once (0: no limit). Counted in the event loop's
    thread (the polls are coroutines), so no lock is needed."""

    RETRY_AFTER = 1
    """Seconds a refused poll is told to wait: a place frees as soon as one of the user's polls ends."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held: Counter[str] = Counter()

    @property
    def waiting(self) -> int:
        """Polls in progress, all users together."""
        return self.held.total()

    def refusal(self, user_id: str) -> APIError | None:
        """The 429 of one more poll of the user's, or None while the user has a place left."""
        if self.limit and self.held[user_id] >= self.limit:
            return quota_exceeded(f"Too many polls at once: at most {self.limit} per API key (colaft serve "
                                  f"--max-polls-per-key); retry after {self.RETRY_AFTER} s, when one of yours "
                                  "has answered", headers={"Retry-After": str(self.RETRY_AFTER)})
        return None

    @contextmanager
    def place(self, user_id: str) -> Iterator[None]:
        """Hold one of the user's places while the poll runs, or a 429 with Retry-After."""
        if (error := self.refusal(user_id)) is not None:
            raise error
        self.held[user_id] += 1
        try:
            yield
        finally:
            self.held[user_id] -= 1
            if not self.held[user_id]:
                del self.held[user_id]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def quota_exceeded(message: str, param: str | None = None, headers: dict | None = None) -> APIError:
    """A 429 naming the quota (and the `colaft serve` option that sets it)."""
    return APIError(429, message, param, "quota_exceeded", "rate_limit_exceeded" if headers else "quota_exceeded",
                    headers)


class BoundedJSON(APIRoute):
    """A route whose JSON body may nest arrays and objects at most formats.MAX_JSON_DEPTH levels
    (a request needs 6): a 400 naming `body` otherwise. Without it a body nested past Python's
    recursion limit is refused only by the parser's failure, and one just under it is parsed
    and validated at full depth."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def bounded(request: Request):
            if "json" in request.headers.get("content-type", ""):
                try:
                    body = await request.body()  # cached: the handler reads it again for free
                except ClientDisconnect:  # the client left mid-body: the answer reaches nobody, and logs nothing
                    raise APIError(400, "the client closed the connection before the end of its body", "body",
                                   "incomplete_body") from None
                limit = formats.MAX_JSON_DEPTH
                if body.count(b"[") + body.count(b"{") > limit and formats.too_deep(body.decode(errors="replace")):
                    raise APIError(400, f"body: JSON nested deeper than {limit} levels", "body", "too_deep")
            return await handler(request)
        return bounded


JSON_BODY_LIMIT = 1 << 20
"""Bytes a request body may have on every route but an upload and a client-fit update (1 MiB)."""
UPLOAD_SLACK = 64 * 1024
"""What an upload's body may hold past --max-upload-mb: multipart headers and the purpose field."""
_UPDATES = re.compile(r"/v1/fine_tuning/jobs/[^/]+/fit/updates/?")


def too_large(limit: int, what: str = "the request body", param: str = "body",
              code: str = "body_too_large") -> APIError:
    return APIError(413, f"{what} is larger than the limit of {limit} bytes", param, code)


class BodyLimit:
    """ASGI middleware: every request body is capped while it streams, so the server never holds
    more of one than its route takes. A Content-Length past the cap answers 413 before a byte is
    read; a body that grows past it (chunked, or longer than declared) answers 413 when it does,
    whatever the handler was doing with it. Caps: an upload --max-upload-mb (plus multipart slack),
    a client-fit update its route's (it depends on the job, known only once the job is looked
    up: `read_body`), anything else JSON_BODY_LIMIT.

    An answer sent before the body was read whole (an error, a 404 before an update's body)
    closes the connection: the server does not go on reading what is left of it."""

    def __init__(self, app, upload_limit: int):
        self.app, self.upload_limit = app, upload_limit

    def cap(self, scope) -> tuple[int | None, APIError | None]:
        """The route's cap and the error past it; (None, None) when the route caps its body itself."""
        path = scope["path"]
        if scope["method"] == "POST" and path.rstrip("/") == "/v1/files":
            limit = self.upload_limit + UPLOAD_SLACK
            return limit, too_large(self.upload_limit, "the upload", "file", "file_too_large")
        if _UPDATES.fullmatch(path):
            return None, None
        return JSON_BODY_LIMIT, too_large(JSON_BODY_LIMIT)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, error = self.cap(scope)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if limit is not None and length.isdigit() and int(length) > limit:
            return await refuse(error, scope, receive, send)
        done = length in (b"", b"0") and b"transfer-encoding" not in headers  # no body: nothing left unread
        received, over, started = 0, False, False

        async def counted():
            nonlocal received, over, done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if limit is not None and received > limit:
                    over = True
                    raise error
            return message

        async def answer(message):
            nonlocal started
            if over:
                return  # the handler's answer to the cut body; the 413 goes out instead
            if message["type"] == "http.response.start":
                started = True
                if not done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except Exception:
            if not over or started:
                raise
        if over and not started:
            await refuse(error, scope, receive, send)


async def refuse(error: APIError, scope, receive, send, close: bool = True) -> None:
    """Answer `error` without the app; `close`: and close the connection (a body may be left unread)."""
    response = error_response(error.status, error.message, error.param, error.code, error.type, error.headers)
    if close:
        response.headers["connection"] = "close"
    await response(scope, receive, send)


async def read_body(request: Request, limit: int, what: str = "the request body") -> bytes:
    """The request's body, or a 413 as soon as it is known to be past `limit` (its Content-Length,
    or the bytes received so far): never more than `limit` bytes are held."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit, what)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise too_large(limit, what)
        body += chunk
    return bytes(body)


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status,
                        headers=headers)


async def service_of(request: Request) -> Service:
    # async: FastAPI runs a plain function dependency in a worker thread, a hop there and back
    # through the event loop that every request paid (under load, a loop turn each way)
    return request.app.state.service


BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API key from `colaft users add NAME`: `Authorization: Bearer sk-colaft-...`")
"""The security scheme of every route that takes a key (in the schema; current_user checks the key)."""


def invalid_key() -> APIError:
    return APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' "
                         "(keys come from 'colaft users add NAME')", code="invalid_api_key")


ADMITTED = "colaft.user"
"""The request state's entry where colaft.serve.routes.gate leaves the user it let in, counted."""


def _admitted(request: Request) -> User | None:
    return request.scope.get("state", {}).get(ADMITTED)


async def current_user(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> User:
    """The user whose key the request carries (401 otherwise). A key seen in the last seconds is
    answered from memory, on the event loop; the others wait for the next of the key checks' queries
    (`auth.KeyCache.user`: one at a time, each asking for every key missing meanwhile)."""
    if (user := _admitted(request)) is not None:
        return user
    key = auth.bearer_key(request.headers.get("authorization"))
    if key is not None:
        user = await request.app.state.service.keys.user(auth.hash_key(key))
    if user is None:
        raise invalid_key()
    return user


async def rated_user(request: Request, user: Annotated[User, Depends(current_user)]) -> User:
    """The calling user, within its request rate (colaft serve --max-requests-per-minute-per-user):
    a 429 with Retry-After (seconds) past it. Counted per user after the key check, so a bad
    key never uses up someone's requests, and one user's burst never slows another's (a request
    the gate let in was counted there)."""
    if _admitted(request) is None and \
            (error := request.app.state.service.rate.refusal(user.id)) is not None:
        raise error
    return user


Me = Annotated[User, Depends(rated_user)]
TheService = Annotated[Service, Depends(service_of)]


def owned(s, cls, object_id: str, user: User, what: str, param: str | None = None, lock: bool = False):
    """The user's row, or a 404. `lock`: held until the transaction ends (the caller acts on what it read)."""
    row = s.get(cls, object_id, with_for_update=lock)
    if row is None or row.user_id != user.id:  # someone else's id answers like a missing one
        raise APIError(404, f"No such {what}: {object_id}", param, "not_found")
    return row


def page(items: Sequence[dict], after: str | None, limit: int) -> dict:
    """A cursor page of `items` (already in order): those after the one with id `after`."""
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(404, f"No such object to list after: {after}", "after", "not_found")
        items = items[ids.index(after) + 1:]
    return listed(items[:limit], len(items) > limit)


def listed(data: Sequence[dict], has_more: bool) -> dict:
    """A list as OpenAI's cursor pages have it: the data, the ids of its first and last objects
    (None when it is empty; the last is the next page's `after`) and whether more follow."""
    return {"object": "list", "data": list(data), "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def fingerprint(model: str) -> str:
    """A completion's `system_fingerprint`: which software and base model answered (colaft's and
    torch's versions, the base model's id), so a client can tell when answers may change."""
    import torch

    return "fp_" + hashlib.sha256(f"{__version__}:{torch.__version__}:{model}".encode()).hexdigest()[:10]
