"""Configuration of the adapted model: where adapters go and what they are.

One typed dataclass, validated by pydantic; each field is documented once, here.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

PositiveInt = Annotated[int, Field(gt=0)]

# The adapter fields' types, shared by every front end that takes them (`colaft train`'s options,
# the service's "colaft" field), so that a constraint is written once, here.
Rank = PositiveInt
"""Rank r of `lowrank` adapters."""
Alpha = Annotated[float, Field(gt=0)]
"""`lowrank` scale is alpha / rank (PEFT's lora_alpha)."""
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
"""Dropout on the adapter's input."""
Hidden = PositiveInt
"""Hidden width of `mlp` adapters."""

DEFAULT_USER = "default"
"""The id of a model's only user when none is named."""


@dataclass(config=ConfigDict(extra="forbid"))
class ColaConfig:
    """Where to attach adapters and which adapter to attach.

    Selection follows PEFT: a list matches a module name exactly or as a dotted suffix, a
    string is a regex that must match the whole name, and "all-linear" takes every linear
    layer (nn.Linear, transformers' Conv1D) except the output head and the task heads.
    """

    target_modules: list[str] | str
    """Modules that get an adapter (see above)."""
    adapter: str = "lowrank"
    """Adapter type, a key of the adapter registry (`colaft.adapters.ADAPTERS`)."""
    rank: Rank = 8
    """Rank r of `lowrank` adapters."""
    alpha: Alpha = 16.0
    """`lowrank` scale is alpha / rank (PEFT's lora_alpha)."""
    dropout: Dropout = 0.0
    """Dropout on the adapter's input (not on embeddings). Needs merge=False."""
    hidden: Hidden = 128
    """Hidden width of `mlp` adapters."""
    layers: Annotated[int, Field(ge=2)] = 2
    """Number of linear layers of `mlp` adapters (2: in -> hidden -> out)."""
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    """Activation between the layers of `mlp` adapters."""
    bias: bool = False
    """Whether `linear` adapters learn a bias delta too."""
    merge: bool = False
    """Run the server on W + delta_W instead of running the adapter (mergeable adapters only)."""
    heads: list[str] = dataclasses.field(default_factory=lambda: ["classifier", "score"])
    """Task heads (matched as name or dotted suffix, when present): sites with a `linear`
    adapter with bias, so the server still holds no trainable parameter."""

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v):
        if not v:
            raise ValueError("target_modules is empty")
        return v

    @model_validator(mode="after")
    def _merge_without_dropout(self):
        if self.merge and self.dropout > 0:
            raise ValueError("dropout needs merge=False: a merged weight has no separate adapter input")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ColaConfig:
        return cls(**d)
