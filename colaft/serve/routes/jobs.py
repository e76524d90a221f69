"""/v1/fine_tuning/jobs: create (validated against the base model and the files), list, read,
events, checkpoints, cancel, and the trained adapter as a zip.

A created or cancelled job is handed to its base model's engine through a queue (never
waited for); everything the client reads comes from the database.
"""
from __future__ import annotations

import io
import secrets
import zipfile
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy import select

from colaft.serve import files as datafiles
from colaft.serve.db import FINAL, Checkpoint, Event, File, Job, User, active_jobs, new_id, now
from colaft.serve.objects import CheckpointList, EventList, FineTuningJob, JobList
from colaft.serve.routes.common import APIError, BoundedJSON, Me, TheService, listed, owned, page, quota_exceeded, read
from colaft.serve.routes.openapi import BINARY, answers
from colaft.serve.scheduler import Engine
from colaft.serve.schemas import JobCreate
from colaft.sites import select_sites

AUTO_EPOCHS = 3
"""Epochs of a job whose n_epochs is "auto"."""
MIN_LR, MAX_LR = 2.0 ** -126, 3.4e38
"""The learning rates a job may resolve to: float32's normal numbers. Below, the fit's rate is
subnormal or 0 in float32; above, infinite; either way the job would only fail when it starts."""

router = APIRouter(route_class=BoundedJSON)


@router.post("/v1/fine_tuning/jobs", responses=answers(FineTuningJob, 400, 401, 404, 429))
def create_job(user: Me, service: TheService, body: JobCreate):
    engine = service.engines.get(body.model)
    if engine is None:
        hint = " (a fine-tuned model cannot be tuned further: use its base)" if body.model.startswith("ft:") \
            else ""
        raise APIError(400, f"model: unknown model {body.model!r}{hint}; models: {', '.join(service.engines)}",
                       "model", "model_not_found")
    multiplier, lr = body.hyperparameters.learning_rate_multiplier, engine.host.task.recipe.lr
    if multiplier != "auto" and not MIN_LR <= lr * multiplier <= MAX_LR:
        raise APIError(400, f"hyperparameters.learning_rate_multiplier: {multiplier} makes the learning rate "
                            f"{lr} x {multiplier} {'smaller' if lr * multiplier < MIN_LR else 'larger'} than "
                            f"float32's normal numbers ({MIN_LR:.3g} to {MAX_LR:.3g})",
                       "hyperparameters.learning_rate_multiplier", "invalid_value")
    options = body.colaft.model_dump()
    options["targets"] = options["targets"] or engine.host.task.recipe.targets
    try:
        select_sites(engine.host.base, options["targets"], ["classifier", "score"])
    except ValueError as e:
        raise APIError(400, f"colaft.targets: {e}", "colaft.targets", "invalid_value") from None
    with service.db.session() as s:
        _within_active_quota(s, user, service.settings.max_active_jobs)
        # locked: a concurrent delete of the file waits for this job's row, then sees it
        train = _data_file(s, owned(s, File, body.training_file, user, "file", "training_file", lock=True),
                           engine, "training_file")
        if body.validation_file:
            valid = _data_file(s, owned(s, File, body.validation_file, user, "file", "validation_file",
                                        lock=True), engine, "validation_file")
            if train.labels is not None and not set(valid.labels) <= set(train.labels):
                raise APIError(400, "validation_file: it has labels the training file lacks: "
                                    f"{sorted(set(valid.labels) - set(train.labels), key=str)[:5]}",
                               "validation_file", "invalid_value")
        hyper = _resolve(body.hyperparameters, engine, train.rows)
        job = Job(id=new_id("ftjob"), user_id=user.id, model=body.model, training_file=train.id,
                  validation_file=body.validation_file, hyperparameters=hyper, options=options,
                  seed=body.seed if body.seed is not None else secrets.randbelow(2**31), suffix=body.suffix,
                  meta=body.metadata, labels=train.labels,
                  integrations=[i.model_dump() for i in body.integrations or []],
                  status="queued", created_at=now())
        s.add(job)
        s.flush()  # the job's row before its events' (foreign key)
        service.db.add_event(s, job.id, f"Created fine-tuning job: {job.id}")
        service.db.add_event(s, job.id, f"Files validated: {train.rows} training rows; the job is queued")
    engine.admit(job.id)
    return job.to_api()

@router.get("/v1/fine_tuning/jobs", responses=answers(JobList, 400, 401, 404, 429))
def list_jobs(user: Me, service: TheService, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20):
    with service.db.read() as s:
        rows = list(s.scalars(select(Job).where(Job.user_id == user.id).order_by(Job.created_at.desc(),
                                                                                   Job.id.desc())))
    return page([j.to_api() for j in rows], after, limit)

@router.get("/v1/fine_tuning/jobs/{job_id}", responses=answers(FineTuningJob, 401, 404, 429))
async def get_job(user: Me, service: TheService, job_id: str):
    return await read(service, lambda s: owned(s, Job, job_id, user, "fine-tuning job").to_api())

@router.get("/v1/fine_tuning/jobs/{job_id}/events", responses=answers(EventList, 400, 401, 404, 429))
async def list_events(user: Me, service: TheService, job_id: str, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=10000)] = 20):
    def events(s):
        owned(s, Job, job_id, user, "fine-tuning job")
        query = select(Event).where(Event.job_id == job_id)
        if after:
            seq = s.scalar(select(Event.seq).where(Event.id == after, Event.job_id == job_id))
            if seq is None:
                raise APIError(404, f"No such event: {after}", "after", "not_found")
            query = query.where(Event.seq < seq)
        rows = list(s.scalars(query.order_by(Event.seq.desc()).limit(limit + 1)))  # newest first
        return listed([e.to_api() for e in rows[:limit]], len(rows) > limit)
    return await read(service, events)

@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints",
            responses=answers(CheckpointList, 400, 401, 404, 429))
def list_checkpoints(user: Me, service: TheService, job_id: str, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10):
    with service.db.read() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job")
        rows = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.listed == 1)
                              .order_by(Checkpoint.step.desc())))
    return page([c.to_api(job.model_name) for c in rows], after, limit)

@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=answers(FineTuningJob, 401, 404, 409, 429))
def cancel_job(user: Me, service: TheService, job_id: str):
    with service.db.session() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job", lock=True)  # the engine may be finishing it
        if job.status in FINAL:
            raise APIError(409, f"the job has already {'been ' if job.status == 'cancelled' else ''}"
                                f"{job.status}", "job_id", "job_finished")
        job.status, job.finished_at = "cancelled", now()
        service.db.add_event(s, job.id, "Fine-tuning job cancelled")
    if job.model in service.engines:
        service.engines[job.model].cancel(job_id)
    return job.to_api()


@router.get("/v1/fine_tuning/jobs/{job_id}/adapter", response_class=Response,
            responses=answers(None, 400, 401, 404, 409, 429, content={"application/zip": BINARY},
                              description="The trained adapter, zipped (PEFT LoRA folder, or colaft's own form)"))
def download_adapter(user: Me, service: TheService, job_id: str,
                     format: Literal["peft", "colaft"] = "peft"):
    with service.db.read() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job")
    if job.status != "succeeded":
        raise APIError(409, f"the job has no adapter yet (status {job.status})", "job_id", "job_not_finished")
    if job.model_deleted_at is not None:
        raise APIError(409, f"the job's model {job.fine_tuned_model} was deleted, and its adapter with it",
                       "job_id", "model_deleted")
    folder = service.settings.data_dir / "jobs" / job_id / ("peft" if format == "peft" else "adapter")
    if not folder.is_dir():
        raise APIError(409, f"adapter {job.options['adapter']!r} has no PEFT LoRA form: ask for "
                            "format=colaft (ColaModel.from_pretrained reads it)", "format", "no_peft_form")
    return Response(_zip(folder), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{job_id}-{format}.zip"'})


def _within_active_quota(s, user: User, limit: int) -> None:
    """A 429 if the user already has `limit` queued, running or paused jobs (0: no limit). The user's row is
    locked until the job is added: two creations at once are counted one after the other."""
    if not limit:
        return
    s.get(User, user.id, with_for_update=True)
    count = active_jobs(s, user.id)
    if count >= limit:
        raise quota_exceeded(f"Quota exceeded: {count} of your jobs are queued, running or paused, and the limit is "
                             f"{limit} (colaft serve --max-active-jobs-per-user); cancel one or wait until "
                             "one ends", "model")


def _data_file(s, row: File, engine: Engine, param: str) -> File:
    """A file this engine's task can train on, or a 400 naming `param`."""
    wanted = datafiles.FORMATS_OF_TASK[engine.host.task_name]
    if row.purpose != "fine-tune" or row.format not in wanted:
        kind = "chat (messages) or prompt/completion" if engine.host.task_name == "clm" \
            else "text/label classification"
        raise APIError(400, f"{param}: {row.id} holds {row.format} data, but {engine.id} trains on {kind} data",
                       param, "invalid_file_format")
    if row.labels is not None and len(row.labels) > engine.settings.num_labels:
        raise APIError(400, f"{param}: {row.id} has {len(row.labels)} labels; {engine.id} classifies into at most "
                            f"{engine.settings.num_labels} (colaft serve --num-labels)", param, "too_many_labels")
    return row


def _resolve(hyper, engine: Engine, rows: int) -> dict:
    """The job's hyperparameters with every "auto" replaced by its value."""
    batch = engine.host.task.recipe.batch_size if hyper.batch_size == "auto" else hyper.batch_size
    return {"n_epochs": AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs,
            "batch_size": min(batch, rows),
            "learning_rate_multiplier": 1.0 if hyper.learning_rate_multiplier == "auto"
            else hyper.learning_rate_multiplier}


def _zip(folder) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
