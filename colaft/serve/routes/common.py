"""What every router shares: the service, the calling user, OpenAI-shaped errors, ownership, pages."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from colaft import formats
from colaft.serve import auth
from colaft.serve.db import Database, User
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
    rate: RateLimit = field(init=False)

    def __post_init__(self):
        self.rate = RateLimit(self.settings.max_requests, self.settings.rate_window)


class RateLimit:
    """At most `limit` requests per user in any `window` seconds (a moving window, in this
    process's memory: a restart forgets it); limit 0: no limit."""

    def __init__(self, limit: int, window: int):
        self.limit, self.window = limit, window
        self.item = RateLimitItemPerSecond(limit, window) if limit else None
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def retry_after(self, user_id: str) -> int | None:
        """Count one request of the user: None if it is allowed, else the seconds until one is."""
        if self.item is None or self.limiter.hit(self.item, user_id):
            return None
        reset = self.limiter.get_window_stats(self.item, user_id).reset_time
        return max(1, math.ceil(reset - time.time()))


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
                body = await request.body()  # cached: the handler reads it again for free
                limit = formats.MAX_JSON_DEPTH
                if body.count(b"[") + body.count(b"{") > limit and formats.too_deep(body.decode(errors="replace")):
                    raise APIError(400, f"body: JSON nested deeper than {limit} levels", "body", "too_deep")
            return await handler(request)
        return bounded


def error_response(status: int, message: str, param=None, code=None, type="invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status,
                        headers=headers)


def service_of(request: Request) -> Service:
    return request.app.state.service


def current_user(request: Request) -> User:
    """The user whose key the request carries (401 otherwise)."""
    user = auth.authenticate(request.app.state.service.db, request.headers.get("authorization"))
    if user is None:
        raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' "
                            "(keys come from 'colaft users add NAME')", code="invalid_api_key")
    return user


def rated_user(request: Request, user: Annotated[User, Depends(current_user)]) -> User:
    """The calling user, within its request rate (colaft serve --max-requests-per-minute-per-user):
    a 429 with Retry-After (seconds) past it. Counted per user after the key check, so a bad
    key never uses up someone's requests, and one user's burst never slows another's."""
    rate = request.app.state.service.rate
    wait = rate.retry_after(user.id)
    if wait is not None:
        raise quota_exceeded(f"Too many requests: at most {rate.limit} per {rate.window} s per user "
                             f"(colaft serve --max-requests-per-minute-per-user); retry after {wait} s",
                             headers={"Retry-After": str(wait)})
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
    return {"object": "list", "data": list(items[:limit]), "has_more": len(items) > limit}
