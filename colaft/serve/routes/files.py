"""/v1/files: upload (JSONL or CSV, checked line by line), list, read, delete (not while a job uses the file)."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileParam
from fastapi.responses import Response
from sqlalchemy import select

from colaft.io.files import write_atomic
from colaft.serve import files as datafiles
from colaft.serve.db import ACTIVE, File, Job, User, new_id, now, stored_bytes
from colaft.serve.objects import FileDeleted, FileList, FileObject
from colaft.serve.routes.common import APIError, Me, TheService, owned, page, quota_exceeded, too_large
from colaft.serve.routes.openapi import TEXT, answers

router = APIRouter()


@router.post("/v1/files", responses=answers(FileObject, 400, 401, 429))
def upload_file(user: Me, service: TheService, file: Annotated[UploadFile, FileParam()],
                purpose: Annotated[str, Form()]):
    if purpose != "fine-tune":
        raise APIError(400, f"purpose {purpose!r}: this server takes only 'fine-tune'", "purpose",
                       "invalid_value")
    quota = service.settings.max_stored_bytes
    if quota:  # refused before the upload is read when the user's files already fill the quota
        with service.db.read() as s:
            _within_stored_quota(stored_bytes(s, user.id), 0, quota)
    data = file.file.read(service.max_upload_bytes + 1)
    if len(data) > service.max_upload_bytes:
        raise too_large(service.max_upload_bytes, "the upload", "file", "file_too_large")
    name = datafiles.upload_name(file.filename, data)
    try:
        fmt, records, labels = datafiles.parse(data, name)
    except datafiles.DataError as e:
        raise APIError(400, f"{name}: {e}", "file", "invalid_file") from None
    file_id = new_id("file")
    path = service.settings.data_dir / "files" / file_id
    write_atomic(path, data)  # on disk before the row that points at it
    try:
        with service.db.session() as s:
            if quota:  # the user's row locked: two uploads at once are counted one after the other
                s.get(User, user.id, with_for_update=True)
                _within_stored_quota(stored_bytes(s, user.id), len(data), quota)
            row = File(id=file_id, user_id=user.id, filename=name[:500],
                       purpose=purpose, bytes=len(data), format=fmt, rows=len(records), labels=labels,
                       created_at=now())
            s.add(row)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return row.to_api()


@router.get("/v1/files", responses=answers(FileList, 400, 401, 404, 429))
def list_files(user: Me, service: TheService, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, order: Literal["asc", "desc"] = "desc"):
    with service.db.read() as s:
        query = select(File).where(File.user_id == user.id)
        if purpose:
            query = query.where(File.purpose == purpose)
        rows = list(s.scalars(query.order_by(File.created_at, File.id)))
    return page([f.to_api() for f in (rows if order == "asc" else rows[::-1])], after, limit)


@router.get("/v1/files/{file_id}", responses=answers(FileObject, 401, 404, 429))
def get_file(user: Me, service: TheService, file_id: str):
    with service.db.read() as s:
        return owned(s, File, file_id, user, "file").to_api()


@router.get("/v1/files/{file_id}/content", response_class=Response,
            responses=answers(None, 401, 404, 429, content={"application/jsonl": TEXT, "text/csv": TEXT},
                              description="The file as uploaded (JSONL), or a results file (CSV)"))
def file_content(user: Me, service: TheService, file_id: str):
    with service.db.read() as s:
        row = owned(s, File, file_id, user, "file")
    data = (service.settings.data_dir / "files" / row.id).read_bytes()
    csv = row.format == "results" or row.filename.lower().endswith(".csv")
    return Response(data, media_type="text/csv" if csv else "application/jsonl")


@router.delete("/v1/files/{file_id}", responses=answers(FileDeleted, 401, 404, 409, 429))
def delete_file(user: Me, service: TheService, file_id: str):
    with service.db.session() as s:
        row = owned(s, File, file_id, user, "file", lock=True)  # no job may start on it meanwhile
        busy = s.scalar(select(Job.id).where(Job.status.in_(ACTIVE),
                                             (Job.training_file == file_id) | (Job.validation_file == file_id))
                        .limit(1))
        if busy is not None:
            raise APIError(409, f"file {file_id} is used by the {s.get(Job, busy).status} job {busy}; "
                                "cancel it or wait until it ends", "file_id", "file_in_use")
        s.delete(row)
    (service.settings.data_dir / "files" / file_id).unlink(missing_ok=True)  # after the row is gone
    return {"id": file_id, "object": "file", "deleted": True}


def _within_stored_quota(stored: int, size: int, quota: int) -> None:
    """A 429 if `size` more bytes take the user's files (`stored` bytes now) past `quota`; size 0
    (not yet known): if they already fill it."""
    if stored + size > quota or stored >= quota:
        more = f"; this upload's {size} more would pass" if size else ", which fills"
        raise quota_exceeded(f"Quota exceeded: your files hold {stored} bytes{more} the limit of {quota} bytes "
                             "(colaft serve --max-stored-mb-per-user); delete files first", "file")
