"""Request bodies of the API (pydantic): what a client may send, each field documented once.

Shaped like OpenAI's fine-tuning and chat APIs, so their clients work unchanged; colaft's
own job options travel in the extra field "colaft" (`extra_body={"colaft": {...}}` with the
openai package).

Every number is bounded and finite (`allow_inf_nan=False`: JSON's 1e999 parses to inf): a value
out of range is a 400 (OpenAI's `invalid_request_error`) naming its field in `param`, before
anything is created. Ranges are OpenAI's where it has one (hyperparameters, metadata, suffix).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from colaft.adapters import ADAPTERS
from colaft.config import Alpha, Hidden, Rank

Auto = Literal["auto"]


FINITE = ConfigDict(extra="forbid", allow_inf_nan=False)

MIN_TEMPERATURE = 1e-2
"""Temperatures below this are greedy: dividing logits by a tiny temperature overflows them to
inf (NaN probabilities), and sampling that cold picks the top token anyway."""


class Hyperparameters(BaseModel):
    model_config = FINITE

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    """Passes over the training file, 1 to 50 as OpenAI's ("auto": 3)."""
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    """This job's rows in every mixed batch, 1 to 256 as OpenAI's ("auto": the task's default, at
    most the file's rows)."""
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0)] = "auto"
    """Times the task's learning rate (1e-3 for both tasks; "auto": 1); any positive number, as
    OpenAI's, as long as the rate stays a normal float32 (checked against the task's rate)."""


class ColaftOptions(BaseModel):
    """colaft's own job options (the request's "colaft" field)."""

    model_config = FINITE

    adapter: str = "lowrank"
    """Adapter type: lowrank | linear | mlp (or a registered one)."""
    # ColaConfig's field types (one definition of each constraint), with the service's caps on top
    rank: Annotated[Rank, Field(le=1024)] = 8
    """Rank of lowrank adapters."""
    alpha: Annotated[Alpha, Field(le=1e6)] = 16.0
    """lowrank scale is alpha / rank."""
    hidden: Annotated[Hidden, Field(le=8192)] = 128
    """Hidden width of mlp adapters."""
    targets: list[str] | str | None = None
    """Adapted modules: names, a regex or "all-linear" (None: the task's default)."""
    mode: Literal["personal", "collaborative"] = "personal"
    """personal: the job's rows see its own adapters. collaborative: they see the mean delta
    of every collaborative job on the base model (mergeable adapters)."""
    interval: Annotated[int, Field(ge=1, le=1024)] = 1
    """Server steps per fit (ColA's I)."""
    fit_device: str | None = None
    """Where the fit runs (a torch device, e.g. "cpu", "cuda:0"; None: where the server's adapters are)."""
    max_length: Annotated[int, Field(ge=8, le=32768)] = 128
    """Token cap per example."""
    fit: Literal["server", "client"] = "server"
    """Where the job's adapters are fitted: on the server's backend, or on the user's device by
    `colaft client --job ID` (the job waits while no client is there; other jobs go on)."""
    staleness: Annotated[int, Field(ge=0, le=64)] = 0
    """A client-fit job's S: server steps it may run ahead of its client's updates (0: synchronous,
    the adapters of a server-fit job exactly)."""

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, v: str) -> str:
        if v not in ADAPTERS:
            raise ValueError(f"unknown adapter {v!r}; adapters: {', '.join(ADAPTERS)}")
        return v

    @field_validator("fit_device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import torch
        try:
            device = torch.device(v)
        except RuntimeError as e:
            raise ValueError(f"not a torch device: {e}") from None
        # refused here rather than when the job's first fit fails: only devices the fit can train
        # on and the server can read the weights back from ("meta" holds no data)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        mps = torch.backends.mps.is_available()
        usable = {"cpu": True, "cuda": (device.index or 0) < gpus, "mps": mps and not device.index}
        if not usable.get(device.type, False):
            here = ["cpu"] + ([f"cuda:0 to cuda:{gpus - 1}"] if gpus else []) + (["mps"] if mps else [])
            raise ValueError(f"device {v!r} is not available on this server (it has {', '.join(here)})")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if v is not None and not v:
            raise ValueError("targets is empty")
        return v

    @model_validator(mode="after")
    def _client_options(self):
        if self.fit == "server" and self.staleness:
            raise ValueError("staleness is a setting of client-fit jobs (\"fit\": \"client\")")
        if self.fit == "client" and self.fit_device is not None:
            raise ValueError("fit_device is where the server fits: a client-fit job fits where `colaft client` runs")
        return self

    @model_validator(mode="after")
    def _collaborative_merges(self):
        if self.mode == "collaborative" and self.adapter == "mlp":
            raise ValueError("collaborative mode averages mergeable deltas: use adapter lowrank or linear")
        return self


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="allow")
    hyperparameters: Hyperparameters | None = None


METHODS = ("supervised",)
"""OpenAI's fine-tuning methods this server trains with (not "dpo" nor "reinforcement")."""


class Method(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["supervised"] = "supervised"  # METHODS
    supervised: SupervisedMethod | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _supported(cls, v):  # before the Literal's check: the answer names the method asked for
        if v not in METHODS:
            raise ValueError(f"method {v!r:.80} is not supported: this server fine-tunes with "
                             f"{', '.join(repr(m) for m in METHODS)} only")
        return v


METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
"""OpenAI's limits on an object's metadata: pairs, characters of a key, characters of a value."""


class Wandb(BaseModel):
    """A Weights & Biases integration's settings, as OpenAI's (recorded and shown on the job;
    this server sends nothing to W&B)."""

    model_config = ConfigDict(extra="forbid")
    project: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(max_length=256)] | None = None
    entity: Annotated[str, Field(max_length=256)] | None = None
    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=50)] | None = None


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: Wandb


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs."""

    model_config = FINITE

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    """OpenAI's newer form: {"type": "supervised", "supervised": {"hyperparameters": {...}}}."""
    suffix: Annotated[str, Field(max_length=64)] | None = None
    """Part of the fine-tuned model's name: ft:<base>:<suffix>:<job id> (empty: ft:<base>:<job id>)."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[str, str] | None = None
    """At most 16 pairs, keys of at most 64 characters, values of at most 512 (OpenAI's limits)."""
    integrations: Annotated[list[Integration], Field(max_length=16)] | None = None
    colaft: ColaftOptions = ColaftOptions()

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None):
        if v is None:
            return v
        if len(v) > METADATA_PAIRS:
            raise ValueError(f"{len(v)} pairs; at most {METADATA_PAIRS}")
        for key, value in v.items():
            if len(key) > METADATA_KEY:
                raise ValueError(f"key {key[:METADATA_KEY]!r}... is longer than {METADATA_KEY} characters")
            if len(value) > METADATA_VALUE:
                raise ValueError(f"the value of {key!r} is longer than {METADATA_VALUE} characters")
        return v

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self):
        from_method = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        if self.hyperparameters is not None and from_method is not None:
            raise ValueError("give hyperparameters once: top-level or in method.supervised")
        self.hyperparameters = self.hyperparameters or from_method or Hyperparameters()
        return self


class ContentPart(BaseModel):
    """One part of a message's content list; only "text" parts are read."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):  # one message for a bad part, not a failure per branch of the union
        if isinstance(v, list):
            for i, part in enumerate(v):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"part {i} is not a content part: an object with a string \"type\"")
                if part.get("text") is not None and not isinstance(part["text"], str):
                    raise ValueError(f"part {i}'s text is not a string")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


PENALTIES = {"frequency_penalty", "presence_penalty", "logit_bias"}
CHAT_UNSUPPORTED = PENALTIES | {"audio", "function_call", "functions", "modalities", "parallel_tool_calls",
                                "prediction", "reasoning_effort", "tool_choice", "tools", "verbosity",
                                "web_search_options"}
COMPLETION_UNSUPPORTED = PENALTIES | {"best_of", "echo", "suffix"}
"""OpenAI's options of each endpoint that colaft does not honour: a request that sets one is a 400 naming it."""
NEUTRAL = {"frequency_penalty": [0], "presence_penalty": [0], "logit_bias": [{}], "modalities": [["text"]],
           "best_of": [1], "echo": [False], "suffix": [""]}
"""Values of those options that ask for nothing (what OpenAI does without them): accepted, as is null."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    """A last chunk with the usage of the whole request (and no choices); every other chunk has usage null."""
    include_obfuscation: bool | None = None
    """Accepted and not needed: chunks are never padded."""


class Sampling(BaseModel):
    """Generation settings shared by both completion endpoints.

    Other fields are refused (`refusal`, a 400 naming the field): OpenAI's options that colaft
    does not honour (tools, response formats other than text, penalties, ...) and unknown ones;
    the schema says so (no additional properties)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, json_schema_extra={"additionalProperties": False})

    model: str
    # bounded here; the model's cap (colaft serve --max-completion-tokens) is a 400 past it
    max_tokens: Annotated[int, Field(ge=1, le=2**20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**20)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    """0 or absent: greedy (deterministic); from MIN_TEMPERATURE: sampling; in between: greedy."""
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    """Choices (rows of the same prompt); greedy ones are all equal. The server's --max-inference-batch caps it too."""
    stop: Annotated[str, Field(max_length=1000)] | Annotated[
        list[Annotated[str, Field(max_length=1000)]], Field(max_length=4)] | None = None
    """Up to 4 strings: the text ends right before the first of them to appear (finish "stop")."""
    seed: Annotated[int, Field(ge=-2**63, le=2**64 - 1)] | None = None
    """torch's seed range: 64 bits."""
    stream: bool | None = None
    """Server-sent events: a chunk per choice per engine turn, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token the request asks for (None: no logprobs)."""
        raise NotImplementedError

    @classmethod
    def _unsupported(cls) -> set[str]:
        raise NotImplementedError

    def refusal(self) -> tuple[str, str, str | None] | None:
        """(param, message, code) of the first field of the request that colaft does not honour, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in self._unsupported():
                if value is None or value in NEUTRAL.get(name, []):
                    continue
                return name, f"Unsupported parameter: '{name}' is not supported by colaft.", "unsupported_parameter"
            return name, f"Unrecognized request argument supplied: {name}", "unrecognized_argument"
        if self.stream_options is not None and not self.stream:
            return ("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    "invalid_value")
        return None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    """Only "text" (json_object and json_schema are refused: 400 naming response_format)."""


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    """Each content token's log-probability under the model (before temperature and top-p)."""
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    """The most likely tokens at each place, with their log-probabilities (needs logprobs: true)."""
    response_format: ResponseFormat | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    """Accepted; not stored."""
    store: bool | None = None
    """Only false: completions are never stored."""
    service_tier: str | None = None
    """Accepted: there is one tier."""
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @classmethod
    def _unsupported(cls) -> set[str]:
        return CHAT_UNSUPPORTED

    def refusal(self) -> tuple[str, str, str | None] | None:
        if (refused := super().refusal()) is not None:
            return refused
        if self.response_format is not None and self.response_format.type != "text":
            return ("response_format", f"Unsupported parameter: response_format of type "
                    f"{self.response_format.type!r} is not supported by colaft (only 'text').",
                    "unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "logprobs must be set to true if top_logprobs is set.", "invalid_value"
        if self.store:
            return "store", "Unsupported parameter: 'store' is not supported by colaft.", "unsupported_parameter"
        return None


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    """The log-probability of each token and of the `logprobs` most likely ones at its place."""

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @classmethod
    def _unsupported(cls) -> set[str]:
        return COMPLETION_UNSUPPORTED
