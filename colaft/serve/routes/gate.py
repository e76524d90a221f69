"""The gate: refusals answered before routing.

Under a flood most requests are refusals: a made-up key, a user past its request rate, one long
poll too many. Answered by the routes' dependencies, each costs the event loop FastAPI's whole
path (routing, dependency injection, exception handlers), and a profile of the server under
`colaft bench serve --abuse` found the event loop holding the GIL most of the time, so every
other request (a job's status among them) queued behind them. The gate answers the same refusals,
in the same words, from what is already in memory:

    Authorization: Bearer KEY, the key's user cached (colaft.serve.auth.KeyCache)
      no such user                          -> 401 invalid_api_key
      past --max-requests-per-minute-per-user -> 429 with Retry-After (the request is counted here)
      a long poll past --max-polls-per-key  -> 429 with Retry-After
      else: in, the user left in the request's state (colaft.serve.routes.common.ADMITTED)

A key it has not seen lately goes in as it came: the route's dependency asks the database (off
the event loop) and refuses or counts it there.
"""
from __future__ import annotations

import re

from colaft.serve import auth
from colaft.serve.routes.common import ADMITTED, invalid_key, refuse

_POLLS = re.compile(r"/v1/fine_tuning/jobs/[^/]+/fit/packets/?")


class Gate:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope["headers"])
            key = auth.bearer_key(headers.get(b"authorization", b"").decode("latin-1"))
            if key is not None:
                service = scope["app"].state.service
                known, user = service.keys.cached(auth.hash_key(key))
                if known:
                    error = invalid_key() if user is None else service.rate.refusal(user.id)
                    if error is None and scope["method"] == "GET" and _POLLS.fullmatch(scope["path"]):
                        error = service.polls.refusal(user.id)  # the route takes the place itself
                    if error is not None:  # a body left unread closes the connection; none keeps it
                        body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
                        return await refuse(error, scope, receive, send, close=body)
                    scope.setdefault("state", {})[ADMITTED] = user
        await self.app(scope, receive, send)
