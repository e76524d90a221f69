"""Inference: /v1/models (the base models and the caller's fine-tuned ones), /v1/chat/completions
and /v1/completions.

A completion is queued on its base model's engine, which batches requests across adapters
between training steps (colaft.serve.inference); the handler awaits its future, so the
event loop is never blocked.
"""
from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import APIRouter
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from colaft.serve.db import Job, User
from colaft.serve.inference import Answer
from colaft.serve.inference import Request as InferenceRequest
from colaft.serve.routes.common import APIError, BoundedJSON, Me, Service, TheService, fingerprint
from colaft.serve.scheduler import Engine
from colaft.serve.schemas import MIN_TEMPERATURE, ChatRequest, CompletionRequest

router = APIRouter(route_class=BoundedJSON)


@router.get("/v1/models")
def list_models(user: Me, service: TheService):
    with service.db.read() as s:
        jobs = s.scalars(select(Job).where(Job.user_id == user.id, Job.status == "succeeded")
                         .order_by(Job.finished_at))
        tuned = [{"id": j.fine_tuned_model, "object": "model", "created": j.finished_at, "owned_by": user.id}
                 for j in jobs]
    base = [{"id": m, "object": "model", "created": service.started_at, "owned_by": "colaft"}
            for m in service.engines]
    return {"object": "list", "data": base + tuned}


def resolve(service: Service, model: str, user: User) -> tuple[Engine, str | None, str]:
    """(engine, job id or None for the base model, mode) of a model id the user may use."""
    if model in service.engines:
        return service.engines[model], None, "personal"
    parts = model.split(":")  # ft:<base>[:<suffix>]:<job id>
    if len(parts) >= 3 and parts[0] == "ft":
        with service.db.read() as s:
            job = s.get(Job, parts[-1])
        if job is not None and job.user_id == user.id and job.status == "succeeded" \
                and job.fine_tuned_model == model and job.model in service.engines:
            return service.engines[job.model], job.id, job.options["mode"]
    raise APIError(404, f"The model {model!r} does not exist or you do not have access to it", "model",
                   "model_not_found")


async def complete(request: InferenceRequest, engine: Engine) -> Answer:
    return await asyncio.wrap_future(engine.infer(request))


@router.post("/v1/chat/completions")
async def chat(user: Me, service: TheService, body: ChatRequest):
    engine, job_id, mode = await run_in_threadpool(resolve, service, body.model, user)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    answer = await complete(InferenceRequest(job_id, mode, messages=messages, **_sampling(body, 128)), engine)
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": fingerprint(engine.id),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": _usage(answer)}


@router.post("/v1/completions")
async def completions(user: Me, service: TheService, body: CompletionRequest):
    engine, job_id, mode = await run_in_threadpool(resolve, service, body.model, user)
    answer = await complete(InferenceRequest(job_id, mode, prompt=body.text(), **_sampling(body, 16)), engine)
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": body.model, "system_fingerprint": fingerprint(engine.id),
            "choices": [{"index": 0, "text": answer.text, "finish_reason": answer.finish_reason,
                         "logprobs": None}],
            "usage": _usage(answer)}


def _sampling(body, default_max_tokens: int) -> dict:
    temperature = body.temperature or 0.0
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            # too cold to sample without overflow: greedy (schemas.MIN_TEMPERATURE)
            "temperature": temperature if temperature >= MIN_TEMPERATURE else 0.0,
            "top_p": body.top_p or 1.0, "stops": body.stops(),
            "seed": body.seed}


def _usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}
