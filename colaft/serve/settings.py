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
    transfer_dtype: str = "float32"
    """Precision of the packets sent to workers and fit clients: float32 (exact) | bfloat16 (half the bytes)."""
    training_niceness: int = 10
    """The engines' threads (training, decoding) and their fit workers run this much nicer than the
    API's event loop (colaft.runtime.yield_cpu): on a busy machine a request waits for no step."""
    max_step_tokens: int = 8192
    """Padded tokens per training step at most: more running jobs take more steps, not more memory
    (colaft.serve.jobs.step_groups). 0: every personal job in one step."""
    checkpoint_every: int = 20
    """Save each running job's state every so many of its steps (and at every epoch end)."""
    num_labels: int = 2
    """Classification heads have this many outputs; a job may use up to that many labels."""
    max_inference_batch: int = 32
    """Completions in flight at once per base model (generated together); more wait their turn."""
    decode_steps: int = 8
    """Tokens every completion in flight takes per turn of the engine, between training steps."""
    max_prompt_tokens: int | None = None
    """Cap on a prompt's tokens, past it a 400 (None: the model's context less the completion cap)."""
    max_completion_tokens: int | None = None
    """Cap on max_tokens, past it a 400 (None: half the model's context, 4096 at most)."""
    max_loaded_adapters: int = 8
    """Finished personal jobs whose adapters stay loaded for inference; the least recently
    used one past this is unloaded, and loaded from disk again when next asked for."""
    client_timeout: float = 30.0
    """A client-fit job whose client has not pulled for this many seconds waits (its rows
    leave the batches) until the client is back."""
    max_active_jobs: int = 32
    """Quota: a user's jobs that are queued, running or paused at once (0: no limit); one more is a 429."""
    max_stored_bytes: int = 10 * 2**30
    """Quota: bytes of a user's files, uploads and results files together (0: no limit); an
    upload past it is a 429. Results files are written whatever the total (a job never fails
    for them), so they can take a user past it; the next upload is refused."""
    max_requests: int = 0
    """Quota: authenticated requests a user may make per `rate_window` seconds (0: no limit);
    past it a 429 with Retry-After."""
    rate_window: int = 60
    max_polls: int = 32
    """Quota: a key's long polls of client-fit jobs' packets in progress at once (0: no limit);
    one more is a 429 with Retry-After. A client holds one per job it fits, and a user may
    have --max-active-jobs-per-user jobs (32 by default)."""
