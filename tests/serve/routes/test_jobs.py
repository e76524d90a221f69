"""Job creation (colaft.serve.routes.jobs): options that would only fail once the job trains are
refused when it is created, with a 400 naming the field, and nothing is created."""
from __future__ import annotations

import pytest
import torch
from serve_helpers import CHAT, upload


@pytest.mark.parametrize("device", ["meta", "cuda:99", "mps", "xpu:0", "cpu:nope"])
def test_a_fit_device_this_server_cannot_use_is_refused_at_create(server, alice, device):
    f = upload(alice, CHAT)
    with server.http(server.keys["alice"]) as h:
        before = h.get("/v1/fine_tuning/jobs").json()["data"]
        r = h.post("/v1/fine_tuning/jobs", json={"model": "llama", "training_file": f.id,
                                                 "colaft": {"fit_device": device}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "colaft.fit_device" and "fit_device" in error["message"], error
        assert h.get("/v1/fine_tuning/jobs").json()["data"] == before


def test_a_usable_fit_device_is_accepted(server, alice):
    f = upload(alice, CHAT)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    job = alice.fine_tuning.jobs.create(model="llama", training_file=f.id, hyperparameters={"n_epochs": 1},
                                        extra_body={"colaft": {"fit_device": device}})
    assert job.model_extra["colaft"]["fit_device"] == device
    alice.fine_tuning.jobs.cancel(job.id)


def test_a_jobs_status_is_read_while_every_handler_thread_is_held(tmp_path, monkeypatch):
    """Writes waiting for SQLite's write lock can hold every handler thread (64 jobs created at
    once); a job's status and events, which need no lock, are read on threads of their own."""
    import threading

    from fastapi.testclient import TestClient

    from colaft.serve import api, auth
    from colaft.serve.db import Database, Job
    from colaft.serve.routes.common import Service
    from colaft.serve.settings import Settings

    monkeypatch.setattr(api, "HTTP_THREADS", 1)  # one handler thread, held below
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'colaft.db'}")
    user, key = auth.add_user(db, "alice")
    with db.session() as s:
        s.add(Job(id="ftjob-1", user_id=user.id, model="llama", training_file="file-1", seed=0,
                  status="running", hyperparameters={}, options={}))
    app = api.create_app(Service(Settings(data), db, {}, 1 << 20, 0))
    release, held = threading.Event(), threading.Event()

    @app.get("/hold")
    def hold():  # a plain handler: it takes the one handler thread until released
        held.set()
        release.wait(30)
        return {}

    try:
        with TestClient(app) as client:
            auth_header = {"Authorization": f"Bearer {key}"}
            assert client.get("/v1/fine_tuning/jobs/ftjob-1", headers=auth_header).status_code == 200  # key cached
            holder = threading.Thread(target=client.get, args=("/hold",))
            holder.start()
            assert held.wait(10)
            answers = []
            for path in ("/v1/fine_tuning/jobs/ftjob-1", "/v1/fine_tuning/jobs/ftjob-1/events"):
                t = threading.Thread(target=lambda p=path: answers.append(client.get(p, headers=auth_header)))
                t.start()
                t.join(10)  # on the handler threads it would wait for /hold (30 s)
                assert not t.is_alive(), path
            assert [r.status_code for r in answers] == [200, 200]
            assert answers[0].json()["status"] == "running" and answers[1].json()["data"] == []
            release.set()
            holder.join(10)
    finally:
        release.set()
        db.close()


def test_reads_and_handlers_start_no_thread_while_serving(tmp_path, monkeypatch):
    """Every read thread and every handler thread is started with the app: a burst starts none.
    A thread started on demand stalls the event loop until it runs, and the old pool (anyio's,
    for both) started one per concurrent call and let them go after 10 idle seconds, so every
    burst after a lull started them again."""
    import asyncio
    import threading
    import time

    import anyio.to_thread
    from fastapi.testclient import TestClient

    from colaft.serve import api
    from colaft.serve.db import Database
    from colaft.serve.routes.common import READ_THREADS, Service, read
    from colaft.serve.settings import Settings

    service = Service(Settings(tmp_path), Database(f"sqlite:///{tmp_path / 'colaft.db'}"), {}, 1 << 20, 0)
    started, start = [], threading.Thread.start

    def work(*_):
        time.sleep(0.05)  # long enough for the burst to overlap
        return threading.get_ident()

    async def burst():
        reads = asyncio.gather(*(read(service, work) for _ in range(2 * READ_THREADS)))
        handlers = asyncio.gather(*(anyio.to_thread.run_sync(work) for _ in range(2 * api.HTTP_THREADS)))
        return await reads, await handlers

    try:
        with TestClient(api.create_app(service)) as client:
            monkeypatch.setattr(threading.Thread, "start", lambda t: started.append(t.name) or start(t))
            reads, handlers = client.portal.call(burst)
            assert started == []
        assert len(set(reads)) == READ_THREADS and len(set(handlers)) == api.HTTP_THREADS
    finally:
        service.db.close()
