"""API keys (colaft.serve.auth), through the real server: no key, a wrong key or another scheme answers 401."""
from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from colaft.serve.auth import KeyCache, hash_key
from colaft.serve.routes.common import APIError, Me, RateLimit, error_response


def test_missing_or_wrong_key_answers_401(server):
    for key in (None, "sk-colaft-wrong", server.keys["alice"] + "x"):
        with server.http(key) as h:
            for method, path in [("GET", "/v1/files"), ("GET", "/v1/fine_tuning/jobs"), ("GET", "/v1/models"),
                                 ("POST", "/v1/chat/completions")]:
                r = h.request(method, path, json={} if method == "POST" else None)
                assert r.status_code == 401, (key, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-colaft-nope").files.list()
    with server.http(None) as h:
        r = h.get("/v1/files", headers={"Authorization": f"Basic {server.keys['alice']}"})
        assert r.status_code == 401


class _CountingDb:
    """The one query KeyCache makes, counted: key hashes -> the users of those that exist."""

    def __init__(self, users: dict):
        self.users, self.queries, self.asked = users, 0, []

    def users_by_key_hash(self, key_hashes: list[str]) -> dict:
        self.queries += 1
        self.asked.append(sorted(key_hashes))
        return {h: self.users[h] for h in key_hashes if h in self.users}


def _me_app(db, rate: RateLimit) -> FastAPI:
    """An app of one route, GET /me, behind the service's key check and request rate."""
    app = FastAPI()
    app.state.service = SimpleNamespace(db=db, keys=KeyCache(db), rate=rate)
    app.add_exception_handler(APIError, lambda request, e: error_response(e.status, e.message, e.param, e.code,
                                                                           headers=e.headers))

    @app.get("/me")
    async def me(user: Me):
        return {"name": user.name}
    return app


def test_a_key_checked_lately_is_answered_from_memory_until_it_expires():

    now = [0.0]
    db = _CountingDb({hash_key("sk-colaft-good"): "alice"})
    keys = KeyCache(db, ttl=2.0, timer=lambda: now[0])
    good, bad = hash_key("sk-colaft-good"), hash_key("sk-colaft-made-up")
    assert keys.cached(good) == (False, None)
    assert keys.lookup([good, bad]) == {good: "alice", bad: None}
    for _ in range(100):
        assert keys.cached(good) == (True, "alice")
        assert keys.cached(bad) == (True, None)  # a made-up key is refused from memory too
    assert db.queries == 1
    now[0] = 2.5  # a rotated key stops working once its entry expires
    assert keys.cached(good) == (False, None) and keys.cached(bad) == (False, None)


def test_a_flood_past_the_rate_quota_is_refused_without_a_query_per_request():
    """Every request's key check was a database query in a handler thread: a flood past its
    quota queued every other user's requests behind its own key checks."""

    db = _CountingDb({hash_key("sk-colaft-good"): SimpleNamespace(id="user-1", name="alice")})
    app = _me_app(db, RateLimit(3, 60))

    with TestClient(app) as h:
        codes = [h.get("/me", headers={"Authorization": "Bearer sk-colaft-good"}).status_code for _ in range(30)]
    assert codes == [200] * 3 + [429] * 27
    assert db.queries == 1


def test_a_burst_of_requests_after_a_lull_costs_one_query_at_a_time():
    """After a lull every key's entry has expired, and the first burst (64 users' first
    requests; 200 long polls of one key opening at once) took a handler thread and a query per
    request, every other request queued behind them. Now the keys missing from memory are
    asked together, one query at a time: those asked meanwhile wait for the next; a waiter that
    gives up cancels no one else's answer."""
    import asyncio
    import time

    import httpx

    class SlowDb(_CountingDb):
        def users_by_key_hash(self, key_hashes):
            time.sleep(0.2)  # long enough for every request below to arrive meanwhile
            return super().users_by_key_hash(key_hashes)

    keys = {f"sk-colaft-{i}": SimpleNamespace(id=f"user-{i}", name=f"u{i}") for i in range(20)}
    db = SlowDb({hash_key(k): u for k, u in keys.items()})
    app = _me_app(db, RateLimit(0, 60))

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as h:
            def get(key):
                return h.get("/me", headers={"Authorization": f"Bearer {key}"})
            first = asyncio.ensure_future(get("sk-colaft-0"))  # these two arrive together: one query
            gives_up = asyncio.ensure_future(get("sk-colaft-1"))
            await asyncio.sleep(0.05)
            gives_up.cancel()  # its client leaves while it waits
            rest = [get(k) for k in keys for _ in range(5)] + [get("sk-colaft-made-up")]
            return [await first, *await asyncio.gather(*rest)]

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 101 + [401]
    assert [r.json()["name"] for r in answers[1:101]] == [f"u{i}" for i in range(20) for _ in range(5)]
    early = ["sk-colaft-0", "sk-colaft-1"]  # the one that gave up got its answer all the same: cached
    assert db.asked == [sorted(map(hash_key, early)),
                        sorted(hash_key(k) for k in [*keys, "sk-colaft-made-up"] if k not in early)]
    assert not app.state.service.keys._next and not app.state.service.keys._asked  # nothing left waiting


def test_the_request_rate_is_a_moving_window_kept_without_a_thread(monkeypatch):
    """The `limits` package's memory storage, used before, started a `threading.Timer` whenever
    its last one had run out (every ~10 ms under steady traffic), from the event loop, which waits
    in `Thread.start` until the thread runs."""
    import threading

    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    now = [100.0]
    rate = RateLimit(3, 60, clock=lambda: now[0])
    for t in (100.0, 110.0, 120.0):
        now[0] = t
        assert rate.refusal("alice") is None
    now[0] = 159.5
    refused = rate.refusal("alice")
    assert refused.status == 429 and refused.headers["Retry-After"] == "1"  # 100 + 60 - 159.5, rounded up
    assert rate.refusal("bob") is None  # another user's window is its own
    now[0] = 160.0  # the request at 100 is exactly 60 s old: still inside the window
    assert rate.refusal("alice") is not None
    now[0] = 160.5  # it has left: one place, taken; a refused request was not counted
    assert rate.refusal("alice") is None and rate.refusal("alice").headers["Retry-After"] == "10"
    now[0] = 300.0  # a window with no request: alice and bob are forgotten, then alice counted again
    assert rate.refusal("alice") is None and set(rate._times) == {"alice"}
    assert started == []
