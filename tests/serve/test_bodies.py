"""Request bodies against a live server: the key and the job are checked before an update's body
is read, every body is capped while it streams (Content-Length or chunked), 413 past the cap,
and the server's memory does not follow what a client sends."""
from __future__ import annotations

import socket
import time

import httpx
import psutil
from serve_helpers import CHAT, upload, wait_job

from colaft.serve.routes.common import JSON_BODY_LIMIT, UPLOAD_SLACK
from colaft.serve.routes.fit import update_limit

MB = 1 << 20


def raw(server, method: str, path: str, key: str | None, headers: dict, body: bytes = b"",
        timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Sends the request line, headers and `body` (which may be far shorter than the declared
    Content-Length) and reads the answer without sending more: (status, answer, seconds)."""
    host, port = server.url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer, time.monotonic() - start


def chunks(total: int, sent: list[int], size: int = MB):
    """A chunked body of `total` bytes; `sent` counts what the client handed to the connection."""
    while sent[0] < total:
        sent[0] += size
        yield b" " * size


def test_an_update_for_an_unknown_job_is_answered_before_its_body(server):
    path = "/v1/fine_tuning/jobs/ftjob-nothere/fit/updates"
    huge = {"Content-Length": str(10**9), "Content-Type": "application/octet-stream"}
    status, answer, seconds = raw(server, "POST", path, server.keys["alice"], huge, b"x" * 100)
    assert status == 404 and b"not_found" in answer and seconds < 5, answer
    assert b"connection: close" in answer.lower()
    status, answer, _ = raw(server, "POST", path, None, huge, b"x" * 100)
    assert status == 401 and b"invalid_api_key" in answer, answer


def test_a_declared_length_over_the_cap_is_refused_at_once(server):
    key = server.keys["alice"]
    for path, length, code in [("/v1/fine_tuning/jobs", JSON_BODY_LIMIT + 1, b"body_too_large"),
                               ("/v1/chat/completions", 10**9, b"body_too_large"),
                               ("/v1/files", int(0.25 * MB) + UPLOAD_SLACK + 1, b"file_too_large")]:
        headers = {"Content-Length": str(length), "Content-Type": "application/json"}
        status, answer, seconds = raw(server, "POST", path, key, headers, b'{"model": ')
        assert status == 413 and code in answer and b"limit of" in answer and seconds < 5, (path, answer)


def test_a_chunked_body_over_the_cap_is_cut_off_with_413(server):
    sent = [0]
    with server.http(server.keys["alice"]) as h:
        r = h.post("/v1/fine_tuning/jobs", content=chunks(8 * MB, sent, 64 * 1024),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"message": f"the request body is larger than the limit of {JSON_BODY_LIMIT} "
                                                "bytes", "type": "invalid_request_error", "param": "body",
                                     "code": "body_too_large"}
        sent[0] = 0
        head = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n')
        r = h.post("/v1/files", content=(c for part in ([head], chunks(MB, sent, 4096)) for c in part),
                   headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large", r.text
        r = h.get("/health")  # the server goes on; an answer to a request read whole keeps the connection
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        r = h.post("/v1/fine_tuning/jobs", json={"model": "nope"})
        assert r.status_code == 400 and r.headers.get("connection") != "close"


def test_the_servers_memory_does_not_follow_a_refused_body(server):
    proc = psutil.Process(server.proc.pid)
    before = proc.memory_info().rss
    for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-nothere/fit/updates"):
        sent = [0]
        with server.http(server.keys["alice"]) as h:
            try:
                r = h.post(path, content=chunks(200 * MB, sent), timeout=60)
                assert r.status_code in (404, 413), r.text
            except httpx.TransportError:  # the server closed the connection before the client read its answer
                pass
        assert sent[0] < 100 * MB, (path, sent[0])
    assert proc.memory_info().rss - before < 50 * MB


def test_an_update_is_capped_by_its_jobs_adapters_after_the_key_and_the_job(server, alice, bob):
    job = alice.fine_tuning.jobs.create(model="llama", training_file=upload(alice, CHAT).id,
                                        extra_body={"colaft": {"fit": "client"}})
    try:
        wait_job(alice, job.id, 60, until=("running",))
        path = f"/v1/fine_tuning/jobs/{job.id}/fit/updates"
        huge = {"Content-Length": str(10**9)}
        status, answer, _ = raw(server, "POST", path, server.keys["bob"], huge, b"x")
        assert status == 404 and b"not_found" in answer, answer  # another user's job: before the body too
        status, answer, seconds = raw(server, "POST", path, server.keys["alice"], huge, b"x")
        assert status == 413 and b"the update is larger than the limit of" in answer and seconds < 5, answer
        limit = int(answer.split(b"limit of ")[1].split(b" ")[0])
        assert update_limit(0) < limit < 10**9
        sent = [0]
        with server.http(server.keys["alice"]) as h:
            try:
                r = h.post(path, content=chunks(limit + 8 * MB, sent))
                assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
            except httpx.TransportError:
                pass
    finally:
        alice.fine_tuning.jobs.cancel(job.id)


def test_a_client_that_leaves_mid_body_leaves_no_error_behind(server):
    """A JSON body cut short by its client (a slow sender given up on, a crashed one): nobody is
    left to answer, and the server's log holds no traceback for it."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.keys['alice']}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    before = server.log_text()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "ll')
        time.sleep(0.5)  # the handler waits for the rest of the body
    time.sleep(1.0)
    added = server.log_text()[len(before):]
    assert "Traceback" not in added and "ClientDisconnect" not in added, added[-2000:]
    assert httpx.get(server.url + "/health").status_code == 200
