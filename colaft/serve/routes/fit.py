"""/v1/fine_tuning/jobs/{id}/fit/...: where a client-fit job's owner (`colaft client`) gets
its state and packets and brings its updates (colaft.serve.fits holds the server's side).

    GET  .../fit/state                  safetensors: the owner's state after the last applied
                                        update, with what the client needs to build the owner
    GET  .../fit/packets?after=SEQ      safetensors packets of the messages after SEQ (long
         &version=V&wait=S              poll: 204 after S s with nothing new); the header
         [&compress=gzip]               X-Colaft-Messages lists [seq, kind, packets] per message;
                                        409 resync when SEQ or V is not where the server is
    POST .../fit/updates                safetensors: the owner's state at the new version;
                                        409 duplicate_update / unexpected_update / job_finished;
                                        413 past update_limit (the key and the job are
                                        checked before the body is read)

A job that is over answers JSON ({"status", "fine_tuned_model"}) on state and packets.
When several serve processes share the database (colaft.serve.leases), a job trained by
another process answers 307 with `Location` at that process's --advertise-url (same path and
query): `colaft client` follows it with its key, and when that process cannot be reached any
more it asks again at the process it was first given (or any other it learned from fit/state's
`servers`), which sends it to the job's new holder. A redirect rather than a proxy: the
packets go straight from the process that makes them to the client.
Another user's job answers 404, a missing or wrong key 401, as everywhere.

A waiting poll is a coroutine (the channel's `poll`), never a thread: the key check and the
job's lookup are short calls in the thread pool, then it awaits the channel's event. A key
holds at most --max-polls-per-key polls at once (429 with Retry-After past it); a poll whose
client goes away stops waiting and frees its place at once.
"""
from __future__ import annotations

import asyncio
import gzip
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from colaft.io.tensors import state_from_bytes, state_to_bytes
from colaft.serve.db import FINAL, Job
from colaft.serve.fits import Refused
from colaft.serve.objects import FitOver, FitUpdate
from colaft.serve.routes.common import APIError, Me, Service, TheService, owned, read_body
from colaft.serve.routes.openapi import BINARY, answers

router = APIRouter()
PREFIX = "/v1/fine_tuning/jobs/{job_id}/fit"


def _channel(service: Service, user, job_id: str, request: Request | None = None):
    """(job, engine, channel); channel None when the job is over. A 307 to the process that
    trains the job when it is another one."""
    with service.db.read() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job")
    if job.options.get("fit") != "client":
        raise APIError(409, "the job's fits run on the server (create it with \"colaft\": {\"fit\": \"client\"} "
                            "to fit on your device)", "job_id", "not_a_client_job")
    engine = service.engines.get(job.model)
    channel = engine.channels.get(job_id) if engine is not None else None
    if channel is None and job.status not in FINAL and request is not None and service.shared \
            and (url := service.leases.holder(job_id)):
        target = url.rstrip("/") + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise APIError(307, f"the job is trained by the serve process at {url}: ask there", "job_id",
                       "job_elsewhere", headers={"Location": target})
    if channel is None and job.status not in FINAL:
        raise APIError(409, f"the job is {job.status} and has not started on the server yet; ask again shortly",
                       "job_id", "job_not_started")
    return job, engine, channel


def _running(service: Service, user, job_id: str):
    """The channel of the user's running client-fit job, found in memory (no thread, no query); else None."""
    for engine in service.engines.values():
        channel = engine.channels.get(job_id)
        if channel is not None and channel.user == user.id:
            return channel
    return None


def _over(job: Job) -> dict:
    return {"status": job.status, "fine_tuned_model": job.fine_tuned_model, "error": job.error}


@router.get(PREFIX + "/state", responses=answers(
    FitOver, 307, 401, 404, 409, 429, content={"application/octet-stream": BINARY},
    description="safetensors: the owner's state (JSON once the job is over)"))
def fit_state(request: Request, user: Me, service: TheService, job_id: str):
    job, engine, channel = _channel(service, user, job_id, request)
    if channel is None:
        return _over(job)
    with channel.lock:
        channel.seen()
        state, seq = channel.state, channel.acked
    meta = {**channel.info, "job": job_id, "seq": seq, "version": state["version"], "staleness": channel.staleness,
            "total_steps": job.total_steps}
    if service.shared:
        meta["servers"] = service.leases.servers()  # where to ask again if this process goes away
    return Response(state_to_bytes(state, meta), media_type="application/octet-stream")


@router.get(PREFIX + "/packets", responses={
    **answers(FitOver, 307, 400, 401, 404, 409, 429, content={"application/octet-stream": BINARY},
              description="safetensors: the packets of the steps after `after` (JSON once the job is over)"),
    204: {"description": "Nothing new within `wait` seconds"}})
async def fit_packets(request: Request, user: Me, service: TheService, job_id: str,
                      after: Annotated[int, Query(ge=0)], wait: Annotated[float, Query(ge=0, le=60)] = 20.0,
                      compress: Literal["gzip", "none"] = "none", version: Annotated[int | None, Query(ge=0)] = None):
    with service.polls.place(user.id):
        channel = _running(service, user, job_id)
        if channel is None:  # not running (yet or any more), not a client-fit job, or not the user's
            job, engine, channel = await run_in_threadpool(_channel, service, user, job_id, request)
            if channel is None:
                return _over(job)
        try:
            got = await _unless_gone(request, channel.poll(after, wait, version))
        except Refused as e:
            raise APIError(409, str(e), "after", e.code) from None
    if got is None:
        return Response(status_code=204)  # its client went away: nobody reads this
    messages, over = got
    if over and channel.final == "moved":  # another process took the job over: the client starts again there
        raise APIError(409, "the job moved to another serve process: fetch its state again", "after", "job_moved")
    if over:
        return {"status": "finishing", "fine_tuned_model": None}
    if not messages:
        return Response(status_code=204)
    return await run_in_threadpool(_packets, channel, messages, compress)


async def _unless_gone(request: Request, poll):
    """`poll`'s result, or None as soon as the client disconnects (the poll is cancelled)."""
    waiting, gone = asyncio.ensure_future(poll), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiting, gone):
            task.cancel()
    if waiting.done() and not waiting.cancelled():
        return waiting.result()
    gone.result()  # a body sent with the poll past its cap raises here (413)
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the server reads the connection meanwhile)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _packets(channel, messages, compress: str) -> Response:
    """The messages' packets as a response (serialised, and compressed when asked, in a worker thread)."""
    body = channel.body(messages)
    headers = {"X-Colaft-Messages": json.dumps([[m.seq, m.kind, len(m.packets)] for m in messages])}
    if compress == "gzip":
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type="application/octet-stream", headers=headers)


@router.post(PREFIX + "/updates", responses=answers(FitUpdate, 307, 400, 401, 404, 409, 429),
             openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": BINARY}}})
async def fit_update(user: Me, service: TheService, job_id: str, request: Request):
    # the key (a dependency) and the job are checked before a byte of the body is read
    job, engine, channel = await run_in_threadpool(_channel, service, user, job_id, request)
    if channel is None:
        raise APIError(409, f"the job has {job.status}: no update is taken", "job_id", "job_finished")
    body = await read_body(request, update_limit(channel.elements), "the update")
    return await run_in_threadpool(_take_update, channel, job_id, body)


def update_limit(elements: int) -> int:
    """The largest update body taken for adapters of `elements` values: 32 bytes a value (the
    adapter and Adam's two moments, even in float64, with room to spare), plus 1 MiB for the
    header and metadata. An update is the owner's state just after a fit: nothing buffered."""
    return 32 * elements + (1 << 20)


def _take_update(channel, job_id: str, body: bytes) -> dict:
    try:
        state, meta = state_from_bytes(body)
        version, seq, skipped = int(meta["version"]), int(meta["seq"]), bool(meta.get("skipped", False))
        int(state["version"])  # the channel reads it too: a bad one is the client's fault, a 400 here
    except (ValueError, KeyError, TypeError, OverflowError) as e:  # OverflowError: JSON's Infinity
        raise APIError(400, f"not an update: {e}", "body", "invalid_update") from None
    try:
        channel.push(version, seq, state, skipped)
    except Refused as e:
        raise APIError(e.status, str(e), e.param, e.code) from None
    return {"object": "fine_tuning.job.fit_update", "job_id": job_id, "version": version, "seq": seq,
            "accepted": True}
