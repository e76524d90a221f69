"""The HTTP API (FastAPI), shaped like OpenAI's files, fine-tuning and completions APIs.

    request -> key check (auth) -> validate (pydantic, then against the database)
            -> one database transaction -> the engine of the job's base model is told
               (a thread-safe queue; never waited for) -> the answer

Handlers that touch the database are plain functions (FastAPI runs them in its thread
pool); completions await the engine's future. So the event loop never blocks on training.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Another user's
id answers exactly like an id that does not exist (404).
"""
from __future__ import annotations

import asyncio
import io
import re
import secrets
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Form, Query, Request, UploadFile
from fastapi import File as FileParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from colaft.serve import auth
from colaft.serve import files as datafiles
from colaft.serve.db import ACTIVE, FINAL, Checkpoint, Database, Event, File, Job, User, new_id, now
from colaft.serve.inference import Answer
from colaft.serve.inference import Request as InferenceRequest
from colaft.serve.scheduler import Engine, Settings
from colaft.serve.schemas import ChatRequest, CompletionRequest, JobCreate
from colaft.sites import select_sites

AUTO_EPOCHS = 3
_TYPE_TAG = re.compile(r"[-\[]|^(int|float|str|bool|list|dict)$")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def _error(status: int, message: str, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


@dataclass
class Service:
    """Everything the handlers share."""

    settings: Settings
    db: Database
    engines: dict[str, Engine]
    max_upload_bytes: int
    started_at: int


class UploadLimit:
    """ASGI middleware: an upload whose Content-Length is past the limit answers 413 before its body is read."""

    SLACK = 64 * 1024  # multipart headers and the purpose field around the file

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit + self.SLACK:
                await _error(413, f"the upload is larger than the limit of {self.limit} bytes",
                             "file", "file_too_large")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def current_user(request: Request) -> User:
    """The user whose key the request carries (401 otherwise)."""
    user = auth.authenticate(request.app.state.service.db, request.headers.get("authorization"))
    if user is None:
        raise APIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>' "
                            "(keys come from 'colaft users add NAME')", code="invalid_api_key")
    return user


Me = Annotated[User, Depends(current_user)]


def create_app(service: Service) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        for engine in service.engines.values():
            engine.start()
        yield
        await run_in_threadpool(_stop_engines, service)

    app = FastAPI(title="colaft", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(UploadLimit, limit=service.max_upload_bytes)
    db = service.db

    # ------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()  # a value matching no branch of `"auto" | int` fails both: name the number's rule
        first = min(errors, key=lambda x: x["type"] == "literal_error")
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "path")]
        loc = [p for p in loc if not _TYPE_TAG.search(p)]  # pydantic's branch names: "constrained-int", ...
        message = str(first.get("ctx", {}).get("error", first["msg"])) if first["type"] == "value_error" \
            else first["msg"]
        param = ".".join(loc) or None
        return _error(422, f"{param}: {message}" if param else message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):  # logged by the server; the client learns nothing more
        return _error(500, "the server failed to handle the request", type="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    # ------------------------------------------------------------- who is asking
    def owned(s, cls, object_id: str, user: User, what: str, param: str | None = None, lock: bool = False):
        """The user's row, or a 404. `lock`: held until the transaction ends (the caller acts on what it read)."""
        row = s.get(cls, object_id, with_for_update=lock)
        if row is None or row.user_id != user.id:  # someone else's id answers like a missing one
            raise APIError(404, f"No such {what}: {object_id}", param, "not_found")
        return row

    @app.get("/health")
    def health():
        return {"status": "ok", "models": list(service.engines),
                "ready": all(e.ready.is_set() for e in service.engines.values())}

    # ------------------------------------------------------------- models
    @app.get("/v1/models")
    def list_models(user: Me):
        with db.read() as s:
            jobs = s.scalars(select(Job).where(Job.user_id == user.id, Job.status == "succeeded")
                             .order_by(Job.finished_at))
            tuned = [{"id": j.fine_tuned_model, "object": "model", "created": j.finished_at, "owned_by": user.id}
                     for j in jobs]
        base = [{"id": m, "object": "model", "created": service.started_at, "owned_by": "colaft"}
                for m in service.engines]
        return {"object": "list", "data": base + tuned}

    # ------------------------------------------------------------- files
    @app.post("/v1/files")
    def upload_file(user: Me, file: Annotated[UploadFile, FileParam()], purpose: Annotated[str, Form()]):
        if purpose != "fine-tune":
            raise APIError(422, f"purpose {purpose!r}: this server takes only 'fine-tune'", "purpose",
                           "invalid_value")
        data = file.file.read(service.max_upload_bytes + 1)
        if len(data) > service.max_upload_bytes:
            raise APIError(413, f"the upload is larger than the limit of {service.max_upload_bytes} bytes",
                           "file", "file_too_large")
        try:
            fmt, records, labels = datafiles.parse(data)
        except datafiles.DataError as e:
            raise APIError(400, f"{file.filename}: {e}", "file", "invalid_file") from None
        file_id = new_id("file")
        path = service.settings.data_dir / "files" / file_id
        datafiles.write_atomic(path, data)  # on disk before the row that points at it
        try:
            with db.session() as s:
                row = File(id=file_id, user_id=user.id, filename=(file.filename or "upload.jsonl")[:500],
                           purpose=purpose, bytes=len(data), format=fmt, rows=len(records), labels=labels,
                           created_at=now())
                s.add(row)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return row.to_api()

    @app.get("/v1/files")
    def list_files(user: Me, purpose: str | None = None, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=10000)] = 10000, order: Literal["asc", "desc"] = "desc"):
        with db.read() as s:
            query = select(File).where(File.user_id == user.id)
            if purpose:
                query = query.where(File.purpose == purpose)
            rows = list(s.scalars(query.order_by(File.created_at, File.id)))
        return _page([f.to_api() for f in (rows if order == "asc" else rows[::-1])], after, limit)

    @app.get("/v1/files/{file_id}")
    def get_file(user: Me, file_id: str):
        with db.read() as s:
            return owned(s, File, file_id, user, "file").to_api()

    @app.get("/v1/files/{file_id}/content")
    def file_content(user: Me, file_id: str):
        with db.read() as s:
            row = owned(s, File, file_id, user, "file")
        data = (service.settings.data_dir / "files" / row.id).read_bytes()
        return Response(data, media_type="text/csv" if row.format == "results" else "application/jsonl")

    @app.delete("/v1/files/{file_id}")
    def delete_file(user: Me, file_id: str):
        with db.session() as s:
            row = owned(s, File, file_id, user, "file", lock=True)  # no job may start on it meanwhile
            busy = s.scalar(select(Job.id).where(Job.status.in_(ACTIVE),
                                                 (Job.training_file == file_id) | (Job.validation_file == file_id))
                            .limit(1))
            if busy is not None:
                raise APIError(409, f"file {file_id} is used by the {_status_of(s, busy)} job {busy}; "
                                    "cancel it or wait until it ends", "file_id", "file_in_use")
            s.delete(row)
        (service.settings.data_dir / "files" / file_id).unlink(missing_ok=True)  # after the row is gone
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------- fine-tuning jobs
    @app.post("/v1/fine_tuning/jobs")
    def create_job(user: Me, body: JobCreate):
        engine = service.engines.get(body.model)
        if engine is None:
            hint = " (a fine-tuned model cannot be tuned further: use its base)" if body.model.startswith("ft:") \
                else ""
            raise APIError(422, f"model: unknown model {body.model!r}{hint}; models: {', '.join(service.engines)}",
                           "model", "model_not_found")
        options = body.colaft.model_dump()
        options["targets"] = options["targets"] or engine.task.recipe.targets
        try:
            select_sites(engine.base, options["targets"], ["classifier", "score"])
        except ValueError as e:
            raise APIError(422, f"colaft.targets: {e}", "colaft.targets", "invalid_value") from None
        with db.session() as s:
            # locked: a concurrent delete of the file waits for this job's row, then sees it
            train = _data_file(s, owned(s, File, body.training_file, user, "file", "training_file", lock=True),
                               engine, "training_file")
            if body.validation_file:
                valid = _data_file(s, owned(s, File, body.validation_file, user, "file", "validation_file",
                                            lock=True), engine, "validation_file")
                if train.labels is not None and not set(valid.labels) <= set(train.labels):
                    raise APIError(422, "validation_file: it has labels the training file lacks: "
                                        f"{sorted(set(valid.labels) - set(train.labels), key=str)[:5]}",
                                   "validation_file", "invalid_value")
            hyper = _resolve(body.hyperparameters, engine, train.rows)
            job = Job(id=new_id("ftjob"), user_id=user.id, model=body.model, training_file=train.id,
                      validation_file=body.validation_file, hyperparameters=hyper, options=options,
                      seed=body.seed if body.seed is not None else secrets.randbelow(2**31), suffix=body.suffix,
                      meta=body.metadata, labels=train.labels, status="queued", created_at=now())
            s.add(job)
            s.flush()  # the job's row before its events' (foreign key)
            db.add_event(s, job.id, f"Created fine-tuning job: {job.id}")
            db.add_event(s, job.id, f"Files validated: {train.rows} training rows; the job is queued")
        engine.admit(job.id)
        return job.to_api()

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(user: Me, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20):
        with db.read() as s:
            rows = list(s.scalars(select(Job).where(Job.user_id == user.id).order_by(Job.created_at.desc(),
                                                                                       Job.id.desc())))
        return _page([j.to_api() for j in rows], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(user: Me, job_id: str):
        with db.read() as s:
            return owned(s, Job, job_id, user, "fine-tuning job").to_api()

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(user: Me, job_id: str, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=10000)] = 20):
        with db.read() as s:
            owned(s, Job, job_id, user, "fine-tuning job")
            query = select(Event).where(Event.job_id == job_id)
            if after:
                seq = s.scalar(select(Event.seq).where(Event.id == after, Event.job_id == job_id))
                if seq is None:
                    raise APIError(404, f"No such event: {after}", "after", "not_found")
                query = query.where(Event.seq < seq)
            rows = list(s.scalars(query.order_by(Event.seq.desc()).limit(limit + 1)))  # newest first
        return {"object": "list", "data": [e.to_api() for e in rows[:limit]], "has_more": len(rows) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(user: Me, job_id: str, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=100)] = 10):
        with db.read() as s:
            job = owned(s, Job, job_id, user, "fine-tuning job")
            rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.listed == 1)
                                  .order_by(Checkpoint.step.desc())))
        return _page([c.to_api(f"ft:{job.model}:{job.id}") for c in rows], after, limit)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(user: Me, job_id: str):
        with db.session() as s:
            job = owned(s, Job, job_id, user, "fine-tuning job", lock=True)  # the engine may be finishing it
            if job.status in FINAL:
                raise APIError(409, f"the job has already {'been ' if job.status == 'cancelled' else ''}"
                                    f"{job.status}", "job_id", "job_finished")
            job.status, job.finished_at = "cancelled", now()
            db.add_event(s, job.id, "Fine-tuning job cancelled")
        if job.model in service.engines:
            service.engines[job.model].cancel(job_id)
        return job.to_api()

    @app.get("/v1/fine_tuning/jobs/{job_id}/adapter")
    def download_adapter(user: Me, job_id: str, format: Literal["peft", "colaft"] = "peft"):
        with db.read() as s:
            job = owned(s, Job, job_id, user, "fine-tuning job")
        if job.status != "succeeded":
            raise APIError(409, f"the job has no adapter yet (status {job.status})", "job_id", "job_not_finished")
        folder = service.settings.data_dir / "jobs" / job_id / ("peft" if format == "peft" else "adapter")
        if not folder.is_dir():
            raise APIError(409, f"adapter {job.options['adapter']!r} has no PEFT LoRA form: ask for "
                                "format=colaft (ColaModel.from_pretrained reads it)", "format", "no_peft_form")
        return Response(_zip(folder), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-{format}.zip"'})

    # ------------------------------------------------------------- inference
    def resolve(model: str, user: User) -> tuple[Engine, str | None, str]:
        """(engine, job id or None for the base model, mode) of a model id the user may use."""
        if model in service.engines:
            return service.engines[model], None, "personal"
        parts = model.split(":")
        if len(parts) == 3 and parts[0] == "ft":
            with db.read() as s:
                job = s.get(Job, parts[2])
            if job is not None and job.user_id == user.id and job.status == "succeeded" \
                    and job.fine_tuned_model == model and job.model in service.engines:
                return service.engines[job.model], job.id, job.options["mode"]
        raise APIError(404, f"The model {model!r} does not exist or you do not have access to it", "model",
                       "model_not_found")

    async def complete(request: InferenceRequest, engine: Engine) -> Answer:
        return await asyncio.wrap_future(engine.infer(request))

    @app.post("/v1/chat/completions")
    async def chat(user: Me, body: ChatRequest):
        engine, job_id, mode = await run_in_threadpool(resolve, body.model, user)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        answer = await complete(InferenceRequest(job_id, mode, messages=messages, **_sampling(body, 128)), engine)
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text, "refusal": None},
                             "finish_reason": answer.finish_reason, "logprobs": None}],
                "usage": _usage(answer)}

    @app.post("/v1/completions")
    async def completions(user: Me, body: CompletionRequest):
        engine, job_id, mode = await run_in_threadpool(resolve, body.model, user)
        answer = await complete(InferenceRequest(job_id, mode, prompt=body.text(), **_sampling(body, 16)), engine)
        return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None,
                "choices": [{"index": 0, "text": answer.text, "finish_reason": answer.finish_reason,
                             "logprobs": None}],
                "usage": _usage(answer)}

    return app


# ------------------------------------------------------------------ helpers
def _stop_engines(service: Service) -> None:
    for engine in service.engines.values():
        engine.stop()


def _page(items: Sequence[dict], after: str | None, limit: int) -> dict:
    """A cursor page of `items` (already in order): those after the one with id `after`."""
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(404, f"No such object to list after: {after}", "after", "not_found")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": list(items[:limit]), "has_more": len(items) > limit}


def _status_of(s, job_id: str) -> str:
    return s.get(Job, job_id).status


def _data_file(s, row: File, engine: Engine, param: str) -> File:
    """A file this engine's task can train on, or a 422 naming `param`."""
    wanted = datafiles.FORMATS_OF_TASK[engine.task_name]
    if row.purpose != "fine-tune" or row.format not in wanted:
        kind = "chat (messages) or prompt/completion" if engine.task_name == "clm" else "text/label classification"
        raise APIError(422, f"{param}: {row.id} holds {row.format} data, but {engine.id} trains on {kind} data",
                       param, "invalid_file_format")
    if row.labels is not None and len(row.labels) > engine.settings.num_labels:
        raise APIError(422, f"{param}: {row.id} has {len(row.labels)} labels; {engine.id} classifies into at most "
                            f"{engine.settings.num_labels} (colaft serve --num-labels)", param, "too_many_labels")
    return row


def _resolve(hyper, engine: Engine, rows: int) -> dict:
    """The job's hyperparameters with every "auto" replaced by its value."""
    batch = engine.task.recipe.batch_size if hyper.batch_size == "auto" else hyper.batch_size
    return {"n_epochs": AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs,
            "batch_size": min(batch, rows),
            "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto"
            else hyper.learning_rate_multiplier}


def _sampling(body, default_max_tokens: int) -> dict:
    return {"max_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "temperature": body.temperature or 0.0, "top_p": body.top_p or 1.0, "stops": body.stops(),
            "seed": body.seed}


def _usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def _zip(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
