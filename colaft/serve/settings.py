"""How the service trains: `colaft serve`'s options, shared by every base model's engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from colaft.backends import BACKENDS


def default_backend() -> str:
    """"process" when that backend is installed (fits off the server's process), else "inline"."""
    return "process" if "process" in BACKENDS else "inline"


@dataclass
class Settings:
    """How the service trains; set by `colaft serve`'s options."""

    data_dir: Path
    backend: str = "inline"
    backend_options: dict = field(default_factory=dict)
    """Keyword arguments of the backend (workers, address)."""
    checkpoint_every: int = 20
    """Save each running job's state every so many of its steps (and at every epoch end)."""
    num_labels: int = 2
    """Classification heads have this many outputs; a job may use up to that many labels."""
    max_inference_batch: int = 32
    max_loaded_adapters: int = 8
    """Finished personal jobs whose adapters stay loaded for inference; the least recently
    used one past this is unloaded, and loaded from disk again when next asked for."""
    client_timeout: float = 30.0
    """A client-fit job whose client has not pulled for this many seconds waits (its rows
    leave the batches) until the client is back."""
