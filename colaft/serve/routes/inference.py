"""Inference: /v1/models (the base models and the caller's fine-tuned ones and checkpoints:
colaft.serve.routes.models), /v1/chat/completions and /v1/completions.

A completion is queued on its base model's engine, which generates it a few tokens at a time
with the others in flight, between training steps (colaft.serve.decode); the handler awaits
its future, so the event loop is never blocked. A prompt or max_tokens past the model's caps
(colaft serve --max-prompt-tokens, --max-completion-tokens) is a 400 naming the param, as is
an option colaft does not honour (tools, response_format json, ...; schemas.Sampling.refusal).

`stream: true` answers with server-sent events: the engine hands each turn's new text to the
handler's asyncio queue through the event loop (call_soon_threadsafe), so a streamed request
costs a coroutine, never a thread. The answers' shapes: colaft.serve.routes.answers.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from colaft.serve.db import User
from colaft.serve.inference import Answer, Delta, ModelGone, TooLong
from colaft.serve.inference import Request as InferenceRequest
from colaft.serve.objects import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelList
from colaft.serve.routes import models
from colaft.serve.routes.answers import Shape, sse
from colaft.serve.routes.common import APIError, BoundedJSON, Me, Service, TheService, fingerprint
from colaft.serve.routes.openapi import answers, event_stream
from colaft.serve.scheduler import Engine
from colaft.serve.schemas import MIN_TEMPERATURE, ChatRequest, CompletionRequest

log = logging.getLogger("colaft.serve")
router = APIRouter(route_class=BoundedJSON)


@router.get("/v1/models", responses=answers(ModelList, 401, 429))
def list_models(user: Me, service: TheService):
    return {"object": "list", "data": models.available(service, user)}


def resolve(service: Service, model: str, user: User) -> tuple[Engine, str | None, str]:
    """(engine, the host's user whose adapters answer: None for the base model, mode) of a model
    id the user may call (colaft.serve.routes.models), or a 404."""
    with service.db.read() as s:
        found = models.find(s, service, model, user)
    if found is None:
        raise models.not_found(model)
    return service.engines[found.base], found.user, found.mode


def refusal(e: TooLong | ModelGone, model: str) -> APIError:
    """What the engine refused a request for, as the API answers it: past the model's caps (400
    naming the param), or a model deleted after the request found it (404, as if never there)."""
    if isinstance(e, ModelGone):
        return models.not_found(model)
    return APIError(400, str(e), e.param, e.code)


async def complete(request: InferenceRequest, engine: Engine, model: str) -> Answer:
    """The answer, or the engine's refusal (the prompt's tokens are counted on the engine's
    thread, which holds the tokenizer)."""
    try:
        engine.generation.check(request)
        return await asyncio.wrap_future(engine.infer(request))
    except (TooLong, ModelGone) as e:
        raise refusal(e, model) from None


async def stream(request: InferenceRequest, engine: Engine, shape: Shape, model: str) -> StreamingResponse:
    """Server-sent events of the answer as the engine produces it: each choice's new text every
    engine turn, its finish, the usage when asked, then `data: [DONE]`. The response starts once
    the engine has admitted the request (its first tokens are there), so a request past the caps
    is still a 400; a client that goes away cancels its rows."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:  # on the engine's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: no one is reading
            pass

    request.sink = put
    try:
        engine.generation.check(request)
    except TooLong as e:
        raise refusal(e, model) from None
    future = engine.infer(request)
    future.add_done_callback(lambda _: put(None))  # after every delta the engine sent
    first = await events.get()
    if first is None:
        try:
            future.result()
        except (TooLong, ModelGone) as e:
            raise refusal(e, model) from None
    return StreamingResponse(_events(first, events, request, future, shape), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(item: Delta | None, events: asyncio.Queue, request: InferenceRequest, future, shape: Shape):
    seen: set[int] = set()
    try:
        while item is not None:
            yield "".join(shape.chunks(item, item.index not in seen))
            seen.add(item.index)
            item = await events.get()
        if future.cancelled() or future.exception() is not None:  # the engine failed: the client's stream raises
            log.error("a streamed completion failed: %r", None if future.cancelled() else future.exception())
            yield sse({"error": {"message": "the server failed to complete the request", "type": "server_error",
                                 "param": None, "code": None}})
            return
        if shape.include_usage:
            yield shape.usage_chunk(future.result())
        yield sse("[DONE]")
    finally:
        if not future.done():  # the client went away (the response was cancelled): its rows leave
            request.cancelled.set()


@router.post("/v1/chat/completions",
             responses=answers(ChatCompletion, 400, 401, 404, 429, content=event_stream(ChatCompletionChunk)))
async def chat(user: Me, service: TheService, body: ChatRequest):
    _refuse_unsupported(body)
    engine, job_id, mode = await run_in_threadpool(resolve, service, body.model, user)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    request = InferenceRequest(job_id, mode, messages=messages, **_sampling(body, 128))
    shape = Shape(True, body.model, fingerprint(engine.id), include_usage=_include_usage(body))
    return await _answer(body, request, engine, shape)


@router.post("/v1/completions",
             responses=answers(Completion, 400, 401, 404, 429, content=event_stream(CompletionChunk)))
async def completions(user: Me, service: TheService, body: CompletionRequest):
    _refuse_unsupported(body)
    engine, job_id, mode = await run_in_threadpool(resolve, service, body.model, user)
    request = InferenceRequest(job_id, mode, prompt=body.text(), **_sampling(body, 16))
    shape = Shape(False, body.model, fingerprint(engine.id), prompt_chars=len(body.text()),
                  include_usage=_include_usage(body))
    return await _answer(body, request, engine, shape)


async def _answer(body, request: InferenceRequest, engine: Engine, shape: Shape):
    if body.stream:
        return await stream(request, engine, shape, body.model)
    return shape.whole(await complete(request, engine, body.model))


def _refuse_unsupported(body) -> None:
    refused = body.refusal()
    if refused is not None:
        param, message, code = refused
        raise APIError(400, message, param, code)


def _include_usage(body) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


def _sampling(body, default_max_tokens: int) -> dict:
    temperature = body.temperature or 0.0
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "max_tokens_param": "max_completion_tokens" if body.max_completion_tokens
            else "max_tokens" if body.max_tokens else None,
            # too cold to sample without overflow: greedy (schemas.MIN_TEMPERATURE)
            "temperature": temperature if temperature >= MIN_TEMPERATURE else 0.0,
            "top_p": body.top_p or 1.0, "stops": body.stops(),
            "seed": body.seed, "n": body.n or 1, "logprobs": body.top_logprobs_asked()}
