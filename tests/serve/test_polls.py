"""Long polls of client-fit jobs (GET .../fit/packets?wait=S) against a live server: a waiting
poll costs a coroutine, not a thread, so hundreds of them leave /health and a job's status
answering; a key holds at most --max-polls-per-key polls at once (429 with Retry-After past
it), and a poll whose client goes away frees its place."""
from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest
from serve_helpers import CHAT, Server, add_user, upload, wait_for

POLLS = 200  # the test server's --max-polls-per-key, and the polls each test holds open
WAIT = 30  # seconds each poll may wait (the job cancelled at the end answers them sooner)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data = tmp_path_factory.mktemp("polls") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"llama={tiny_llama_dir}"], "--backend", "inline", "--max-polls-per-key", str(POLLS),
                 "--client-timeout", "120").start()
    srv.keys = keys
    yield srv
    srv.stop()


def client_job(server, user: str) -> str:
    """A running client-fit job (S = 0) whose step 1 was sent: no step 2 comes before its update,
    so a poll after message 1 waits."""
    client = server.client(server.keys[user])
    job = client.fine_tuning.jobs.create(model="llama", training_file=upload(client, CHAT).id,
                                         hyperparameters={"n_epochs": 2, "batch_size": 4},
                                         extra_body={"colaft": {"fit": "client"}})
    with server.http(server.keys[user]) as h:
        wait_for(lambda: h.get(packets(job.id), params={"after": 0, "wait": 10}).status_code == 200)
    return job.id


def packets(job: str) -> str:
    return f"/v1/fine_tuning/jobs/{job}/fit/packets"


def waiting(server) -> int | None:
    return httpx.get(server.url + "/health", timeout=60).json().get("long_polls")


async def hold(h: httpx.AsyncClient, job: str, n: int) -> list[asyncio.Task]:
    """`n` polls of `job` waiting on the server (each its own connection)."""
    return [asyncio.create_task(h.get(packets(job), params={"after": 1, "version": 0, "wait": WAIT}))
            for _ in range(n)]


async def until_held(server, n: int, pid: int | None = None) -> int:
    """Waits until the server says `n` polls wait (or half their wait has passed); the most threads
    the server process had meanwhile."""
    most, deadline = 0, time.monotonic() + WAIT / 2
    while time.monotonic() < deadline:
        if pid is not None:
            most = max(most, psutil.Process(pid).num_threads())
        if await asyncio.to_thread(waiting, server) == n:
            break
        await asyncio.sleep(0.2)
    return most


def async_http(server, user: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.keys[user]}"},
                             timeout=WAIT + 60, limits=httpx.Limits(max_connections=POLLS + 10))


def test_waiting_polls_hold_no_thread_and_other_requests_answer(server):
    job = client_job(server, "alice")
    pid = server.proc.pid
    alice = server.client(server.keys["alice"])
    before = psutil.Process(pid).num_threads()

    async def main():
        async with async_http(server, "alice") as h:
            polls = await hold(h, job, POLLS)
            most = await until_held(server, POLLS, pid)
            assert most - before < POLLS // 2, (before, most)  # not a thread per waiting poll
            assert await asyncio.to_thread(waiting, server) == POLLS
            # while they all wait, the server answers others
            status = await asyncio.to_thread(lambda: alice.fine_tuning.jobs.retrieve(job).status)
            assert status == "running"
            assert not any(p.done() for p in polls)
            await asyncio.to_thread(alice.fine_tuning.jobs.cancel, job)  # wakes every poll: the job is over
            answers = await asyncio.gather(*polls)
        assert [r.status_code for r in answers] == [200] * POLLS
        assert {r.json()["status"] for r in answers} <= {"finishing", "cancelled"}

    asyncio.run(main())
    assert waiting(server) == 0


def test_a_key_holds_at_most_max_polls_per_key_and_a_gone_client_frees_its_polls(server):
    job, theirs = client_job(server, "alice"), client_job(server, "bob")

    async def main():
        async with async_http(server, "alice") as h:
            polls = await hold(h, job, POLLS)
            await until_held(server, POLLS)
            r = await h.get(packets(job), params={"after": 1, "version": 0, "wait": 0})
            assert r.status_code == 429, r.text
            error = r.json()["error"]
            assert (error["code"], error["type"]) == ("quota_exceeded", "rate_limit_exceeded")
            assert f"at most {POLLS}" in error["message"] and "--max-polls-per-key" in error["message"]
            assert int(r.headers["retry-after"]) >= 1
            with server.http(server.keys["bob"]) as bob:  # another key's polls are counted apart
                assert bob.get(packets(theirs), params={"after": 1, "version": 0, "wait": 0}).status_code == 204
            for p in polls:  # the clients go away: their connections close
                p.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
        wait_for(lambda: waiting(server) == 0, 30)  # the server stopped waiting for them
        with server.http(server.keys["alice"]) as alice:
            assert alice.get(packets(job), params={"after": 1, "version": 0, "wait": 0}).status_code == 204

    asyncio.run(main())
    for user, j in (("alice", job), ("bob", theirs)):
        server.client(server.keys[user]).fine_tuning.jobs.cancel(j)
