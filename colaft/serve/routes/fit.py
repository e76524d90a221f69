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
Another user's job answers 404, a missing or wrong key 401, as everywhere.
"""
from __future__ import annotations

import gzip
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from colaft.io.tensors import state_from_bytes, state_to_bytes
from colaft.serve.db import FINAL, Job
from colaft.serve.fits import Refused
from colaft.serve.routes.common import APIError, Me, Service, TheService, owned, read_body

router = APIRouter()
PREFIX = "/v1/fine_tuning/jobs/{job_id}/fit"


def _channel(service: Service, user, job_id: str):
    """(job, engine, channel); channel None when the job is over."""
    with service.db.read() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job")
    if job.options.get("fit") != "client":
        raise APIError(409, "the job's fits run on the server (create it with \"colaft\": {\"fit\": \"client\"} "
                            "to fit on your device)", "job_id", "not_a_client_job")
    engine = service.engines.get(job.model)
    channel = engine.channels.get(job_id) if engine is not None else None
    if channel is None and job.status not in FINAL:
        raise APIError(409, f"the job is {job.status} and has not started on the server yet; ask again shortly",
                       "job_id", "job_not_started")
    return job, engine, channel


def _over(job: Job) -> dict:
    return {"status": job.status, "fine_tuned_model": job.fine_tuned_model, "error": job.error}


@router.get(PREFIX + "/state")
def fit_state(user: Me, service: TheService, job_id: str):
    job, engine, channel = _channel(service, user, job_id)
    if channel is None:
        return _over(job)
    with channel.cond:
        channel.seen()
        state, seq = channel.state, channel.acked
    meta = {**channel.info, "job": job_id, "seq": seq, "version": state["version"], "staleness": channel.staleness,
            "total_steps": job.total_steps}
    return Response(state_to_bytes(state, meta), media_type="application/octet-stream")


@router.get(PREFIX + "/packets")
def fit_packets(user: Me, service: TheService, job_id: str, after: Annotated[int, Query(ge=0)],
                wait: Annotated[float, Query(ge=0, le=60)] = 20.0, compress: Literal["gzip", "none"] = "none",
                version: Annotated[int | None, Query(ge=0)] = None):
    job, engine, channel = _channel(service, user, job_id)
    if channel is None:
        return _over(job)
    try:
        messages, over = channel.pull(after, wait, version)
    except Refused as e:
        raise APIError(409, str(e), "after", e.code) from None
    if over:
        return {"status": "finishing", "fine_tuned_model": None}
    if not messages:
        return Response(status_code=204)
    body = channel.body(messages)
    headers = {"X-Colaft-Messages": json.dumps([[m.seq, m.kind, len(m.packets)] for m in messages])}
    if compress == "gzip":
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type="application/octet-stream", headers=headers)


@router.post(PREFIX + "/updates")
async def fit_update(user: Me, service: TheService, job_id: str, request: Request):
    # the key (a dependency) and the job are checked before a byte of the body is read
    job, engine, channel = await run_in_threadpool(_channel, service, user, job_id)
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
