"""The gate (colaft.serve.routes.gate): refusals known from memory are answered before routing,
in the routes' own words, and a request it lets in is counted once."""
from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from colaft.serve import auth
from colaft.serve.db import User
from colaft.serve.routes.common import APIError, Me, PollLimit, RateLimit, error_response
from colaft.serve.routes.gate import Gate

GOOD, BAD, NEW = "sk-good", "sk-made-up", "sk-not-seen-yet"


class _Db:
    def __init__(self):
        self.lookups = 0

    def users_by_key_hash(self, key_hashes):
        self.lookups += 1
        return {h: User(id="user-new", name="new") for h in key_hashes if h == auth.hash_key(NEW)}


def _app(rate: int = 0, polls: int = 0):
    db = _Db()
    keys = auth.KeyCache(db)
    keys.lookup([auth.hash_key(GOOD)])  # seen lately: cached (the good user is not in _Db: it must not be asked)
    keys._cache[auth.hash_key(GOOD)] = User(id="user-good", name="good")
    keys.lookup([auth.hash_key(BAD)])  # cached as no such user
    db.lookups = 0
    app = FastAPI()
    app.state.service = SimpleNamespace(keys=keys, rate=RateLimit(rate, 60), polls=PollLimit(polls))
    reached = []

    @app.exception_handler(APIError)  # as the service's app answers them
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.get("/v1/thing")
    def thing(user: Me):
        reached.append(user.id)
        return {"user": user.id}

    @app.get("/v1/fine_tuning/jobs/{job_id}/fit/packets")
    def packets(user: Me, job_id: str):
        reached.append(user.id)
        return {"job": job_id}

    @app.post("/v1/thing")
    def post_thing(user: Me):
        reached.append(user.id)
        return {"user": user.id}

    app.add_middleware(Gate)
    return TestClient(app), reached, db, app.state.service


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_a_known_bad_key_is_refused_before_routing_in_the_routes_words():
    client, reached, db, _ = _app()
    r = client.get("/v1/thing", headers=_auth(BAD))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "colaft users add" in r.json()["error"]["message"]
    assert reached == [] and db.lookups == 0
    # a bodiless request keeps its connection; one with a body unread closes it
    assert r.headers.get("connection") != "close"
    r = client.post("/v1/thing", headers=_auth(BAD), content=b"x" * 100)
    assert r.status_code == 401 and r.headers["connection"] == "close"
    # no key, or a key not seen lately: the route's dependency decides (and asks the database)
    assert client.get("/v1/thing").status_code == 401 and db.lookups == 0
    r = client.get("/v1/thing", headers=_auth(NEW))
    assert r.status_code == 200 and r.json() == {"user": "user-new"} and db.lookups == 1


def test_the_rate_is_counted_once_per_request_and_refused_at_the_gate():
    client, reached, _, _ = _app(rate=3)
    answers = [client.get("/v1/thing", headers=_auth(GOOD)) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]  # counted twice, only 1 would pass
    assert reached == ["user-good"] * 3
    error = answers[3].json()["error"]
    assert error["code"] == "quota_exceeded" and error["type"] == "rate_limit_exceeded"
    assert "--max-requests-per-minute-per-user" in error["message"]
    assert int(answers[3].headers["Retry-After"]) >= 1


def test_a_long_poll_past_the_users_places_is_refused_at_the_gate():
    client, reached, _, service = _app(polls=2)
    service.polls.held["user-good"] = 2  # two polls of the user's wait
    r = client.get("/v1/fine_tuning/jobs/ftjob-1/fit/packets", headers=_auth(GOOD))
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "--max-polls-per-key" in r.text
    assert reached == []
    assert client.get("/v1/thing", headers=_auth(GOOD)).status_code == 200  # other routes: no poll place
    service.polls.held["user-good"] = 1
    assert client.get("/v1/fine_tuning/jobs/ftjob-1/fit/packets", headers=_auth(GOOD)).status_code == 200


def test_no_dependency_of_any_route_takes_a_thread():
    """FastAPI runs a dependency that is a plain function in a worker thread: a hop to a thread
    and back through the event loop for every request. Handlers may (their database work is
    meant for threads); what every request resolves first may not."""
    import inspect

    from colaft.serve.routes import dashboard, files, fit, inference, jobs, models, pausing

    def calls(dependant):
        for d in dependant.dependencies:
            yield d.call
            yield from calls(d)
    seen = set()
    for router in (files.router, jobs.router, pausing.router, fit.router, inference.router, models.router,
                   dashboard.router):
        for route in router.routes:
            for call in calls(route.dependant):
                seen.add(call)
                target = call if inspect.isroutine(call) else type(call).__call__
                assert inspect.iscoroutinefunction(target), (route.path, call)
    assert len(seen) >= 3  # the key, the rate, the service
