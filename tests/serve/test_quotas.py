"""Per-user quotas of `colaft serve`: active jobs, stored bytes and request rate, each a 429
(code quota_exceeded) naming the quota, and none of them touching another user."""
from __future__ import annotations

import time

import pytest
from serve_helpers import REVIEWS, Server, add_user, jsonl


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory, tiny_bert_dir):
    """Two active jobs and 2,000 bytes of files per user (REVIEWS is 752 bytes: two fit, three do not)."""
    data = tmp_path_factory.mktemp("quotas") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob", "carol", "dave", "erin")}
    srv = Server(data, [f"bert={tiny_bert_dir}"], "--max-active-jobs-per-user", "2",
                 "--max-stored-mb-per-user", str(2000 / 2**20)).start()
    srv.keys = keys
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def rate_server(tmp_path_factory, tiny_bert_dir):
    """Five requests per user per 3-second window."""
    data = tmp_path_factory.mktemp("rate") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"bert={tiny_bert_dir}"], "--max-requests-per-minute-per-user", "5",
                 "--rate-window", "3").start()
    srv.keys = keys
    yield srv
    srv.stop()


def _upload(h, name="reviews.jsonl"):
    return h.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (name, jsonl(REVIEWS))})


def _job(h, file_id):
    return h.post("/v1/fine_tuning/jobs", json={"model": "bert", "training_file": file_id,
                                                "hyperparameters": {"n_epochs": 50, "batch_size": 1}})


def _quota_error(r, *words):
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "quota_exceeded"
    for word in words:
        assert word in error["message"], error["message"]
    return error


def test_active_jobs_quota(quota_server):
    with quota_server.http(quota_server.keys["alice"]) as alice, quota_server.http(quota_server.keys["bob"]) as bob:
        f = _upload(alice).json()["id"]
        jobs = [_job(alice, f) for _ in range(2)]
        assert all(r.status_code == 200 for r in jobs), [r.text for r in jobs]
        _quota_error(_job(alice, f), "2 of your jobs", "limit is 2", "--max-active-jobs-per-user")
        assert len(alice.get("/v1/fine_tuning/jobs").json()["data"]) == 2  # the refused one was not made
        r = _job(bob, _upload(bob).json()["id"])  # another user's jobs are counted apart
        assert r.status_code == 200, r.text
        assert alice.post(f"/v1/fine_tuning/jobs/{jobs[0].json()['id']}/cancel").status_code == 200
        r = _job(alice, f)  # a cancelled job no longer counts
        assert r.status_code == 200, r.text
        for j in [jobs[1].json()["id"], r.json()["id"]]:
            alice.post(f"/v1/fine_tuning/jobs/{j}/cancel")


def test_stored_bytes_quota(quota_server):
    with quota_server.http(quota_server.keys["carol"]) as carol, quota_server.http(quota_server.keys["dave"]) as dave:
        first = _upload(carol)
        assert first.status_code == 200 and _upload(carol).status_code == 200
        _quota_error(_upload(carol), "1504 bytes", "752 more", "2000 bytes", "--max-stored-mb-per-user")
        assert len(carol.get("/v1/files").json()["data"]) == 2  # nothing of the refused upload is kept
        assert len(list((quota_server.data_dir / "files").iterdir())) >= 2
        assert _upload(dave).status_code == 200  # another user's files are counted apart
        assert carol.delete(f"/v1/files/{first.json()['id']}").status_code == 200
        assert _upload(carol).status_code == 200  # deleting frees the quota


def test_request_rate_quota(rate_server):
    with rate_server.http(rate_server.keys["alice"]) as alice, rate_server.http(rate_server.keys["bob"]) as bob, \
            rate_server.http(None) as anyone:
        assert all(anyone.get("/health").status_code == 200 for _ in range(8))  # not limited
        assert all(alice.get("/v1/models").status_code == 200 for _ in range(5))
        r = alice.get("/v1/models")
        _quota_error(r, "at most 5 per 3 s", "--max-requests-per-minute-per-user")
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 3
        assert alice.get("/v1/files").status_code == 429  # every authenticated route counts
        assert bob.get("/v1/models").status_code == 200  # another user is unaffected
        assert anyone.get("/health").status_code == 200 and anyone.get("/").status_code == 200
        assert rate_server.http("sk-colaft-wrong").get("/v1/models").status_code == 401  # a bad key is not throttled
        time.sleep(wait)
        assert alice.get("/v1/models").status_code == 200  # allowed again after Retry-After


def test_full_stored_quota_refuses_before_reading(quota_server):
    records = [dict(r) for r in REVIEWS]
    records[0]["text"] += "x" * (2000 - len(jsonl(REVIEWS)))  # exactly the quota
    assert len(jsonl(records)) == 2000
    with quota_server.http(quota_server.keys["erin"]) as erin:
        r = erin.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("full.jsonl", jsonl(records))})
        assert r.status_code == 200, r.text  # up to the quota is allowed
        r = erin.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("one.jsonl", b"x")})
        _quota_error(r, "2000 bytes, which fills the limit of 2000 bytes")  # not a 400 for the bad file
