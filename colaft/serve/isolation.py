"""Blame the job that failed: when the shared server step of a batch raises, which jobs' rows
make it fail, so that they fail alone and the others step on.

    a batch's server step raised (Trainer.step: before any packet left, so no adapter, owner
    or optimizer changed; only the random state moved, and `rewind` puts it back)
      -> blame: try the server step alone (`check`: nothing sent) on each half of the batch's
         jobs, and again on the halves of each half that fails, down to single jobs
      -> the jobs blamed fail (`training_failed`, with why); the others are stepped again as
         ONE batch, from the same state: the very step they take when the blamed jobs never
         existed (no step skipped or repeated; their rows are the same, as a job's cursor only
         moves when its step is recorded)
      -> no half fails alone (the batch's size, say): nobody is blamed; the halves step apart

A fault of one job's own fit or update (its device, non-finite weights) is not the shared
step's: Trainer.step finishes every other job's step and names it (colaft.pipeline.UserFaults);
the engine fails it with `fit_failed`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

R = TypeVar("R")  # a colaft.serve.jobs.Run, or anything with a job_id

WHY_CHARS = 300
"""The longest reason kept in a job's error and event: the exception's type and first line."""


def why(error: BaseException) -> str:
    """The exception in one short line ("Type: first line of its message"), for a job's error."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line if len(line) <= WHY_CHARS else line[:WHY_CHARS - 3] + "..."


@contextmanager
def rewind() -> Iterator[None]:
    """Put the random state (CPU, and CUDA once used) back as it was if the block raises: a
    failed step retried draws the dropout masks the first attempt drew."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    except BaseException:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        raise


def _fails(check: Callable[[list[R]], None], runs: list[R]) -> BaseException | None:
    try:
        with rewind():
            check(runs)
            raise _Passed
    except _Passed:
        return None
    except Exception as e:  # noqa: BLE001 - what the step raises on these jobs' rows
        return e


class _Passed(Exception):
    """Raised by a check that passed, so that `rewind` restores the state it drew from."""


def blame(runs: Sequence[R], error: BaseException, check: Callable[[list[R]], None]
          ) -> tuple[dict[str, str], list[list[R]]]:
    """`runs`' step raised `error`: (the jobs to fail -> why, the groups of jobs to step again).

    `check(runs)` runs the server step of `runs`' rows with nothing sent or applied (and
    raises as the step would); the random state is put back after each."""
    runs = list(runs)
    if len(runs) == 1:
        return {runs[0].job_id: why(error)}, []
    blamed = _culprits(runs, check)
    if not blamed:
        half = len(runs) // 2
        return {}, [runs[:half], runs[half:]]
    rest = [r for r in runs if r.job_id not in blamed]
    return blamed, [rest] if rest else []


def _culprits(runs: list[R], check: Callable[[list[R]], None]) -> dict[str, str]:
    """The single jobs, found by halving, whose rows make `check` raise; {} when only more
    jobs together do."""
    blamed: dict[str, str] = {}
    half = len(runs) // 2
    for part in (runs[:half], runs[half:]):
        error = _fails(check, part)
        if error is None:
            continue
        blamed.update({part[0].job_id: why(error)} if len(part) == 1 else _culprits(part, check))
    return blamed
