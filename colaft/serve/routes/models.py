"""/v1/models/{id}: one model (GET) and deleting one of the caller's (DELETE); and which models
a user may call, for /v1/models and the completions (colaft.serve.routes.inference).

A user's models are the base models, the fine-tuned model of each of its succeeded jobs
(ft:<base>[:<suffix>]:<job id>) and each listed checkpoint of its personal jobs
(<fine-tuned model>:ckpt-step-<N>, the adapters saved at that step). A collaborative job's
checkpoint is not a model: its job's model is the mean of every collaborative job's delta,
which no checkpoint holds. Another user's model answers exactly like one that does not exist.

DELETE removes a fine-tuned model's adapters (colaft and PEFT folders) or a checkpoint's
(its folder and its row): the engine unloads them once no completion in flight uses them,
then removes them from the disk. The job stays, `fine_tuned_model` still naming the model,
which no longer answers. A base model cannot be deleted (403); neither can the model of a job
still queued, running or paused (400: cancel it first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import APIRouter
from sqlalchemy import select

from colaft.serve.db import ACTIVE, Checkpoint, Job, User, now
from colaft.serve.objects import Model as ModelObject
from colaft.serve.objects import ModelDeleted
from colaft.serve.routes.common import APIError, Me, Service, TheService
from colaft.serve.routes.openapi import answers

router = APIRouter()
_CHECKPOINT = re.compile(r"ckpt-step-(\d+)")


@dataclass
class Model:
    """A model a user may call: a base model (`user` None), a fine-tuned one or a checkpoint."""

    id: str
    created: int
    owned_by: str
    base: str  # the base model's id: its engine answers
    user: str | None = None  # the host's user whose adapters answer: the job's id, or the checkpoint's
    mode: str = "personal"
    checkpoint: Checkpoint | None = None  # a checkpoint's model: its row

    def to_api(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}


def not_found(model_id: str) -> APIError:
    return APIError(404, f"The model {model_id!r} does not exist or you do not have access to it", "model",
                    "model_not_found")


def _base(service: Service, model_id: str) -> Model:
    return Model(model_id, service.started_at, "colaft", model_id)


def _tuned(job: Job) -> Model:
    return Model(job.fine_tuned_model, job.finished_at, job.user_id, job.model, job.id, job.options["mode"])


def _checkpoint(job: Job, checkpoint: Checkpoint) -> Model:
    return Model(f"{job.model_name}:ckpt-step-{checkpoint.step}", checkpoint.created_at, job.user_id, job.model,
                 checkpoint.id, "personal", checkpoint)


def _named_job(s, service: Service, model_id: str, user: User, lock: bool = False) -> tuple[Job | None, int | None]:
    """The user's job that `model_id` names (ft:<base>[:<suffix>]:<job id>[:ckpt-step-<N>]),
    whatever its status, and the checkpoint's step (None: the job's own model). `lock`: the
    job's row is held until the transaction ends."""
    parts = model_id.split(":")
    match = _CHECKPOINT.fullmatch(parts[-1])
    if parts[0] != "ft" or len(parts) < 3 + bool(match):
        return None, None
    job = s.get(Job, parts[-2] if match else parts[-1], with_for_update=lock)
    if job is None or job.user_id != user.id or job.model not in service.engines:
        return None, None
    step = int(match[1]) if match else None
    name = job.model_name if step is None else f"{job.model_name}:ckpt-step-{step}"
    return (job, step) if name == model_id else (None, None)


def find(s, service: Service, model_id: str, user: User) -> Model | None:
    """The model `model_id` if the user may call it, else None."""
    if model_id in service.engines:
        return _base(service, model_id)
    job, step = _named_job(s, service, model_id, user)
    if job is None:
        return None
    if step is None:
        return _tuned(job) if job.status == "succeeded" and job.model_deleted_at is None else None
    if job.options["mode"] == "collaborative":
        return None
    checkpoint = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step,
                                                   Checkpoint.listed == 1))
    return _checkpoint(job, checkpoint) if checkpoint is not None else None


def available(service: Service, user: User) -> list[dict]:
    """The models the user may call: the base models, its fine-tuned models (oldest first),
    then its checkpoints (oldest first)."""
    with service.db.read() as s:
        jobs = list(s.scalars(select(Job).where(Job.user_id == user.id, Job.model.in_(list(service.engines)))
                              .order_by(Job.finished_at, Job.created_at)))
        tuned = [_tuned(j) for j in jobs if j.status == "succeeded" and j.model_deleted_at is None]
        personal = {j.id: j for j in jobs if j.options["mode"] != "collaborative"}
        checkpoints = [_checkpoint(personal[c.job_id], c) for c in s.scalars(
            select(Checkpoint).where(Checkpoint.job_id.in_(list(personal)), Checkpoint.listed == 1)
            .order_by(Checkpoint.created_at, Checkpoint.step))]
    return [m.to_api() for m in [*(_base(service, m) for m in service.engines), *tuned, *checkpoints]]


@router.get("/v1/models/{model_id:path}", responses=answers(ModelObject, 401, 404, 429))
def get_model(user: Me, service: TheService, model_id: str):
    with service.db.read() as s:
        model = find(s, service, model_id, user)
    if model is None:
        raise not_found(model_id)
    return model.to_api()


@router.delete("/v1/models/{model_id:path}", responses=answers(ModelDeleted, 400, 401, 403, 404, 429))
def delete_model(user: Me, service: TheService, model_id: str):
    if model_id in service.engines:
        raise APIError(403, f"{model_id!r} is a base model of this server: only your fine-tuned models and their "
                            "checkpoints can be deleted", "model", "model_not_deletable")
    with service.db.session() as s:
        job, _ = _named_job(s, service, model_id, user, lock=True)  # a cancel or the job's end waits
        if job is not None and job.status in ACTIVE:
            raise APIError(400, f"The model's job {job.id} is {job.status}: cancel it first (POST "
                                f"/v1/fine_tuning/jobs/{job.id}/cancel), then delete the model", "model",
                           "job_not_finished")
        model = find(s, service, model_id, user) if job is not None else None
        if model is None:
            raise not_found(model_id)
        if model.checkpoint is not None:
            folders = [service.settings.data_dir / model.checkpoint.path]
            s.delete(model.checkpoint)
            service.db.add_event(s, job.id, f"Checkpoint model deleted: {model_id}")
        else:
            folders = [service.settings.data_dir / "jobs" / job.id / name for name in ("adapter", "peft")]
            job.model_deleted_at = now()
            service.db.add_event(s, job.id, f"Fine-tuned model deleted: {model_id}")
    # the engine unloads them and removes their folders (it alone loads them, at a completion's first use)
    service.engines[model.base].control.forget(model.user, folders)
    return {"id": model_id, "object": "model", "deleted": True}
