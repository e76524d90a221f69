"""POST /v1/fine_tuning/jobs/{id}/pause and /resume (OpenAI's, answering the job).

A queued or running job pauses: its status is "paused" at once (with the event "Job paused"),
and its engine (colaft.serve.control) takes it out of the shared batches before its next step,
keeping its adapters, owner and data position and saving a checkpoint of them; the other jobs
on its base model go on. Resumed, it steps again from there, as if it had never stopped. A
paused job still counts as active: its files cannot be deleted and it counts against the
active-job quota; it can be cancelled. Pausing a job that is over, or already paused, and
resuming one that is not paused, are 400s.
"""
from __future__ import annotations

from fastapi import APIRouter

from colaft.serve.db import FINAL, Job
from colaft.serve.objects import FineTuningJob
from colaft.serve.routes.common import APIError, Me, Service, TheService, owned
from colaft.serve.routes.openapi import answers

router = APIRouter()


@router.post("/v1/fine_tuning/jobs/{job_id}/pause", responses=answers(FineTuningJob, 400, 401, 404, 429))
def pause_job(user: Me, service: TheService, job_id: str):
    with service.db.session() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job", lock=True)  # the engine may be finishing it
        if job.status in FINAL:
            raise APIError(400, f"The job has {job.status}: only a queued or running job can be paused",
                           "job_id", "job_finished")
        if job.status == "paused":
            raise APIError(400, "The job is paused already: resume it with POST "
                                f"/v1/fine_tuning/jobs/{job_id}/resume", "job_id", "job_paused")
        job.status = "paused"
        service.db.add_event(s, job.id, "Job paused")
    _tell(service, job)
    return job.to_api()


@router.post("/v1/fine_tuning/jobs/{job_id}/resume", responses=answers(FineTuningJob, 400, 401, 404, 429))
def resume_job(user: Me, service: TheService, job_id: str):
    with service.db.session() as s:
        job = owned(s, Job, job_id, user, "fine-tuning job", lock=True)
        if job.status != "paused":
            raise APIError(400, f"The job is {job.status}, not paused: only a paused job can be resumed",
                           "job_id", "job_not_paused")
        job.status = "running" if job.total_steps else "queued"  # its engine had not started it yet
        service.db.add_event(s, job.id, "Job resumed")
    _tell(service, job)
    return job.to_api()


def _tell(service: Service, job: Job) -> None:
    engine = service.engines.get(job.model)
    if engine is not None:
        engine.control.status_changed(job.id)
