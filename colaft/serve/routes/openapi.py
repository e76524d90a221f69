"""What the routes declare in the OpenAPI schema (/openapi.json, /docs): each route's answers
(`answers`: its 200 as colaft.serve.objects has it, in each media type it is sent in, and every
error status it may answer, with OpenAI's error envelope), and the schema itself: FastAPI's,
from those declarations and the routes' security (common.BEARER), less what this server never
answers (`truthful`).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from colaft.serve.objects import ChatCompletionChunk, CompletionChunk, ErrorResponse

STATUS = {
    307: "The job is trained by another serve process on the same database: ask again at `Location`",
    400: "Invalid request: a field, a query parameter or a file is wrong (`param` names it)",
    401: "Missing or incorrect API key (`Authorization: Bearer KEY`)",
    403: "The object cannot be changed (e.g. a base model cannot be deleted)",
    404: "No such object, or not yours",
    409: "The object's state does not allow it",
    413: "The request body is past its cap (`file_too_large` for uploads, `body_too_large` otherwise)",
    429: "A quota or the request rate is exceeded; Retry-After (seconds) when waiting helps",
    500: "The server failed to handle the request",
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying: sent when the request rate or "
                                              "the long polls per key are exceeded, not for the stored-bytes "
                                              "and active-jobs quotas (they free only when you act)",
                               "required": False, "schema": {"type": "integer", "minimum": 1}}}
LOCATION = {"Location": {"description": "The same request at the serve process that trains the job",
                         "required": True, "schema": {"type": "string", "format": "uri"}}}
BINARY = {"schema": {"type": "string", "format": "binary"}}
TEXT = {"schema": {"type": "string"}}
STREAMED = (ChatCompletionChunk, CompletionChunk)
"""The models only a text/event-stream answer refers to (`truthful` adds them to the components)."""


def answers(ok: type[BaseModel] | None = None, *errors: int, content: dict | None = None,
            description: str | None = None) -> dict:
    """A route's `responses=`: its 200 (the model `ok` as JSON, and/or `content` by media type)
    and the error statuses it may answer besides 413 and 500 (any body may be past its cap, any
    handler may fail), each with the error envelope. Only declared: the answer goes out as the
    handler made it (no response_model validates or rebuilds it)."""
    success: dict[str, Any] = {"model": ok} if ok is not None else {}
    if content:
        success["content"] = content
    if description:
        success["description"] = description
    declared: dict[int | str, dict] = {200: success}
    for status in sorted({*errors, 413, 500}):
        declared[status] = {"model": ErrorResponse, "description": STATUS[status]}
        if status == 429:
            declared[status]["headers"] = RETRY_AFTER
        if status == 307:
            declared[status]["headers"] = LOCATION
    return declared


def event_stream(chunk: type[BaseModel]) -> dict:
    """The text/event-stream content of a streamed answer, one event at a time (`itemSchema`, as
    FastAPI writes its own streams): `data: <chunk JSON>` events, then `data: [DONE]`."""
    ref = {"$ref": f"#/components/schemas/{chunk.__name__}"}
    return {"text/event-stream": {"itemSchema": {
        "description": f"With `stream: true`: `data: <{chunk.__name__}>` events, then `data: [DONE]`",
        "type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
            {"type": "string", "contentMediaType": "application/json", "contentSchema": ref},
            {"const": "[DONE]"}]}}}}}


def truthful(app, schema) -> dict:
    """FastAPI's OpenAPI schema (`schema`: the app's own `openapi`), made once, with no 422 (never
    answered: an invalid request is a 400) and with the models only a stream's events refer to."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = schema()
    for operations in document["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _, streamed = models_json_schema([(m, "serialization") for m in STREAMED],
                                     ref_template="#/components/schemas/{model}")
    for name, definition in streamed.get("$defs", {}).items():
        components.setdefault(name, definition)
    app.openapi_schema = document
    return document
