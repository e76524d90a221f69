"""What the API answers (pydantic): the objects of OpenAI's API reference as this server sends
them, each field documented once. They only describe the answers in /openapi.json (declared on
each route with `responses=`, colaft.serve.routes.openapi, so an answer is neither validated nor
rebuilt on its way out: the handlers' dicts go out as they are); tests hold every answer to them.

The request bodies are in colaft.serve.schemas. Fields are required where the server always
sends them and nullable exactly where it may send null; a field the server sometimes leaves out
(a stream chunk's `usage`, a delta's `role`) has a default and `SkipJsonSchema[None]`, so the
schema shows it optional, never null. Extra fields are forbidden: the schema lists everything.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import SkipJsonSchema

__all__ = ["ChatCompletion", "ChatCompletionChunk", "CheckpointList", "Completion", "CompletionChunk",
           "ErrorResponse", "EventList", "FileDeleted", "FileList", "FileObject", "FineTuningJob",
           "FineTuningJobCheckpoint", "FineTuningJobEvent", "FitOver", "FitUpdate", "Health", "JobList", "Model",
           "ModelDeleted", "ModelList", "Usage"]


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ errors
class Error(_Object):
    message: str
    type: str
    """invalid_request_error, rate_limit_exceeded, quota_exceeded or server_error."""
    param: str | None
    """The request's field at fault (`hyperparameters.n_epochs`, `file`, ...), if one is."""
    code: str | None
    """What went wrong, for programs: invalid_value, not_found, invalid_api_key, quota_exceeded, ..."""


class ErrorResponse(_Object):
    """Every answer that is not a success: OpenAI's error envelope."""

    error: Error


# ------------------------------------------------------------------ files
class FileObject(_Object):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune", "fine-tune-results"]
    """fine-tune: an upload; fine-tune-results: a job's results CSV."""
    status: Literal["processed"]
    status_details: str
    """How many records of which format the file holds."""


class FileDeleted(_Object):
    id: str
    object: Literal["file"]
    deleted: bool


class FileList(_Object):
    """A cursor page: `last_id` is the next page's `after`; both ids are null on an empty page."""

    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ------------------------------------------------------------------ fine-tuning jobs
class JobError(_Object):
    code: str
    message: str
    param: str | None


class JobHyperparameters(_Object):
    """As the job resolved them ("auto" replaced by its value)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class JobSupervised(_Object):
    hyperparameters: JobHyperparameters


class JobMethod(_Object):
    type: Literal["supervised"]
    supervised: JobSupervised


class JobWandb(_Object):
    project: str
    name: str | None
    entity: str | None
    tags: list[str] | SkipJsonSchema[None] = None
    """Left out when the job was created without tags."""


class JobIntegration(_Object):
    type: Literal["wandb"]
    wandb: JobWandb


JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]


class FineTuningJob(_Object):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: JobError | None
    """Why the job failed; null unless it did."""
    fine_tuned_model: str | None
    """ft:<base>[:<suffix>]:<job id> once the job has succeeded; null before."""
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[JobIntegration]
    metadata: dict[str, str] | None
    suffix: str | None
    method: JobMethod
    colaft: dict[str, Any]
    """colaft's own options as the job resolved them (the request's `colaft` field), and a
    classification job's `labels` (head output i is labels[i])."""


class JobList(_Object):
    object: Literal["list"]
    data: list[FineTuningJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FineTuningJobEvent(_Object):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any]
    """A metrics event's numbers (`step`, `total_steps`, `train_loss`, ...); {} for a message."""
    type: Literal["message", "metrics"]


class EventList(_Object):
    """Newest first."""

    object: Literal["list"]
    data: list[FineTuningJobEvent]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CheckpointMetrics(_Object):
    step: int
    train_loss: float | SkipJsonSchema[None] = None
    """The mean training loss since the last checkpoint; left out when it is not finite."""


class FineTuningJobCheckpoint(_Object):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class CheckpointList(_Object):
    object: Literal["list"]
    data: list[FineTuningJobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ------------------------------------------------------------------ client-fit jobs
class FitOver(_Object):
    """A client-fit job's state or packets once it is over (or finishing): no more to fit."""

    status: str
    fine_tuned_model: str | None
    error: JobError | SkipJsonSchema[None] = None
    """Why the job failed, null unless it did; left out while it is finishing."""


class FitUpdate(_Object):
    object: Literal["fine_tuning.job.fit_update"]
    job_id: str
    version: int
    seq: int
    accepted: bool


# ------------------------------------------------------------------ models
class Model(_Object):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    """"colaft" for a base model; the user's id for a fine-tuned one."""


class ModelList(_Object):
    object: Literal["list"]
    data: list[Model]


class ModelDeleted(_Object):
    id: str
    object: Literal["model"]
    deleted: bool


# ------------------------------------------------------------------ completions
class Usage(_Object):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Object):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Object):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None


class AssistantMessage(_Object):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None


class ChatChoice(_Object):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChatLogprobs | None


class ChatCompletion(_Object):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(_Object):
    """A choice's new text; its first delta also has the role (and refusal null), its last none of them."""

    role: Literal["assistant"] | SkipJsonSchema[None] = None
    content: str | SkipJsonSchema[None] = None
    refusal: str | None = None


class ChunkChoice(_Object):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(_Object):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None | SkipJsonSchema[None] = None
    """Only with stream_options.include_usage: null on every chunk but the last, whose choices are []."""


class LegacyLogprobs(_Object):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Object):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: LegacyLogprobs | None


class Completion(_Object):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(CompletionChoice):
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(_Object):
    """One `data:` event of a streamed completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None | SkipJsonSchema[None] = None
    """Only with stream_options.include_usage: null on every chunk but the last, whose choices are []."""


# ------------------------------------------------------------------ health
class Training(_Object):
    steps: int
    rows: int
    step_seconds: float
    running_jobs: int


class Health(_Object):
    status: Literal["ok"]
    models: list[str]
    long_polls: int
    """Long polls of client-fit jobs' packets waiting now, all users together."""
    ready: bool
    """Every base model is loaded."""
    training: dict[str, Training]
    """Per base model: its training steps, rows, seconds in the last step, running jobs."""
