"""`colaft train`'s options as one validated model, checked as a whole before anything is loaded.

Field names are the command's parameter names, so a pydantic error's location is the flag
(`batch_size` -> `--batch-size`); the adapter fields reuse ColaConfig's types, so a constraint
is written once, in colaft/config.py. Choices are checked against the live registries (the
adapters, optimizers, tasks...) and a wrong one is answered with the closest valid names.

This module is light (pydantic only) so that `colaft --help` does not import torch: the
registries are imported by the checks, which run only when a command runs.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from importlib import import_module
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from colaft.config import Alpha, ColaConfig, Dropout, Hidden, Rank

# Names for the help texts, kept here so that `--help` needs no registry; tests/app/test_cli.py
# checks that they are the registries' names.
TASK_NAMES = ("clm", "ic", "sc")
ADAPTER_NAMES = ("linear", "lowrank", "mlp")
BACKEND_NAMES = ("inline", "process", "ray")
METHOD_NAMES = ("full", "lora", "adalora", "ia3", "prompt", "prefix", "ptuning")
MODES = ("personal", "collaborative", "shared")
USER_WEIGHTS = ("equal", "rows")
TRANSFER_DTYPES = ("float32", "bfloat16")


def _registry(module: str, name: str):
    """A registry's names, imported only when an option is checked (not for `colaft --help`)."""
    return lambda: getattr(import_module(module), name)


def _schedulers():
    from transformers import SchedulerType
    return [s.value for s in SchedulerType]


CHOICES = {  # option -> (what the error calls it, its valid values)
    "task": ("task", _registry("colaft.tasks", "TASKS")),
    "mode": ("mode", lambda: MODES),
    "user_weights": ("user weighting", lambda: USER_WEIGHTS),
    "adapter": ("adapter", _registry("colaft.adapters", "ADAPTERS")),
    "optimizer": ("optimizer", _registry("colaft.users", "OPTIMIZERS")),
    "scheduler": ("scheduler", _schedulers),
    "backend": ("backend", _registry("colaft.backends", "BACKENDS")),
    "transfer_dtype": ("transfer dtype", lambda: TRANSFER_DTYPES),
}

OPTION_OF_FIELD = {"target_modules": "targets"}
"""Fields named differently on the command line (ColaConfig's)."""

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def flag(field: str) -> str:
    """The command-line flag of a field: `batch_size` -> `--batch-size`."""
    return "--" + OPTION_OF_FIELD.get(field, field).replace("_", "-")


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to `word`: those it begins, then difflib's closest."""
    choices = list(dict.fromkeys(choices))
    starts = [c for c in choices if word and c.lower().startswith(word.lower())]
    return list(dict.fromkeys(starts + difflib.get_close_matches(word, choices, n=n, cutoff=0.5)))[:n]


def choose(value: str, choices: Iterable[str], what: str) -> str:
    """`value` if it is one of `choices`, else a one-line error with the closest names."""
    choices = list(choices)
    if value in choices:
        return value
    near = closest(value, choices)
    hint = f"closest: {', '.join(near)}; " if near else ""
    raise ValueError(f"unknown {what} {value!r}; {hint}use one of {', '.join(choices)}")


def parse_targets(spec: str) -> list[str] | str:
    """--targets: "all-linear", a regex (has regex syntax), or comma-separated module names."""
    if spec == "all-linear" or _REGEX_CHARS.search(spec):
        return spec
    return [name.strip() for name in spec.split(",") if name.strip()]


def new_folder(value: Path | None) -> Path | None:
    """A new folder to write: it must not exist, and its nearest existing parent must be a folder."""
    if value is None:
        return value
    if value.exists():
        raise ValueError(f"{str(value)!r} already exists; choose another folder")
    parent = value.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{str(value)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{str(value)!r}: no permission to write in {str(parent)!r}")
    return value


class TrainOptions(BaseModel):
    """Every option of `colaft train`; None: the task's recipe decides."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    task: str = "sc"
    data: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    image_field: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    user_field: str | None = None
    users: int | None = None  # dealing out checks it against the records (0, or more users than records)
    mode: str = "personal"
    user_weights: str = "equal"
    method: str = "cola"
    targets: str | None = None
    adapter: str = "lowrank"
    rank: Rank = 8
    alpha: Alpha = 16.0
    dropout: Dropout = 0.0
    bias: bool = False
    hidden: Hidden = 128
    merge: bool = False
    optimizer: str = "adamw"
    lr: PositiveFloat | None = None
    weight_decay: NonNegativeFloat = 0.0
    scheduler: str = "linear"
    warmup: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    batch_size: PositiveInt | None = None
    epochs: PositiveInt | None = None
    max_steps: PositiveInt | None = None
    max_length: PositiveInt | None = None
    interval: PositiveInt = 1
    fit_steps: PositiveInt = 1
    seed: int = 0
    init_adapter: Path | None = None
    out: Path | None = None
    export_peft: Path | None = None
    eval_every: NonNegativeInt = 0
    backend: str = "inline"
    workers: PositiveInt | None = None
    ray_address: str | None = None
    staleness: NonNegativeInt = 0
    transfer_dtype: str = "float32"
    save_adapters: bool = True

    # ---------------------------------------------------------------- one field at a time
    @field_validator("out", "export_peft")
    @classmethod
    def _new_folder(cls, v: Path | None) -> Path | None:
        return new_folder(v)

    @field_validator("task", "mode", "user_weights", "adapter", "optimizer", "scheduler", "backend",
                     "transfer_dtype")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        what, choices = CHOICES[info.field_name]
        return choose(v, choices(), what)

    # ---------------------------------------------------------------- across fields
    @property
    def multi(self) -> bool:
        """The records have users (a column, or dealt out)."""
        return bool(self.user_field) or self.users is not None

    @model_validator(mode="after")
    def _together(self):
        if self.user_field and self.users is not None:
            raise ValueError("--user-field and --users both make users: give one")
        if self.merge and self.dropout > 0:  # ColaConfig's own check, named by the flags
            raise ValueError("--merge needs --dropout 0: a merged weight has no separate adapter input")
        if self.mode == "shared" and not self.multi:
            raise ValueError("--mode shared needs users (--user-field or --users) to report on")
        if self.user_weights == "rows" and self.mode != "collaborative":
            raise ValueError(f"--user-weights {self.user_weights!r}: equal, or rows with --mode collaborative")
        if self.workers is not None and self.backend == "inline":
            raise ValueError("--workers: a number >= 1, with --backend process or ray")
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError("--ray-address needs --backend ray")
        self._check_method()
        return self

    def _check_method(self) -> None:
        """Backprop baselines train one model in this process: refuse the options only ColA has."""
        if self.method == "cola":
            return
        from colaft.app.baselines import METHODS, TASK_TYPES
        if self.method not in METHODS:
            near = closest(self.method, ("cola", *METHODS))
            raise ValueError(f"--method {self.method!r}: use cola or one of {', '.join(METHODS)}"
                             + (f"; closest: {', '.join(near)}" if near else ""))
        if self.method != "full" and self.task not in TASK_TYPES:
            raise ValueError(f"--method {self.method}: PEFT methods run on the tasks {', '.join(TASK_TYPES)}; "
                             f"task {self.task} compares ColA with --method full")
        colas = {"--user-field/--users": self.multi, "--backend": self.backend != "inline",
                 "--staleness": self.staleness, "--interval": self.interval != 1, "--fit-steps": self.fit_steps != 1,
                 "--merge": self.merge, "--init-adapter": self.init_adapter, "--export-peft": self.export_peft}
        if given := [name for name, value in colas.items() if value]:
            raise ValueError(f"{', '.join(given)}: options of ColA, not of --method {self.method}")

    def cola_config(self, default_targets: list[str] | str) -> ColaConfig:
        """The adapters' configuration (ColaConfig checks its fields together, e.g. merge with dropout)."""
        return ColaConfig(target_modules=parse_targets(self.targets) if self.targets is not None else default_targets,
                          adapter=self.adapter, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          hidden=self.hidden, merge=self.merge, bias=self.bias)


def check(arguments: Mapping) -> TrainOptions:
    """`colaft train`'s arguments, validated as a whole (raises pydantic's ValidationError)."""
    options = TrainOptions(**arguments)
    options.cola_config("all-linear")  # the adapter fields' own checks, before the task's targets are known
    return options
