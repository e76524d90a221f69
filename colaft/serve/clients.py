"""The engine's client-fit jobs (colaft.serve.fits) between its steps: when one may step, and
what its channel brought - updates, a client gone or back, a checkpoint or an end that waited
for its fits in flight. Called only from the engine's thread (colaft.serve.scheduler)."""
from __future__ import annotations

from collections.abc import Callable

from colaft.serve.fits import Channel
from colaft.serve.host import ModelHost
from colaft.serve.jobs import Run
from colaft.serve.store import JobStore
from colaft.users import Update


def may_step(run: Run, channel: Channel | None, timeout: float) -> bool:
    """Never a paused job; a server-fit job always; a client-fit job while its fits in flight
    are within its staleness bound, its client was seen lately and no checkpoint waits for its fits."""
    if run.paused or not run.client:
        return not run.paused
    if run.finishing or not channel.runnable(timeout):
        return False
    return run.due is None or channel.pending_steps > 0  # at a fit boundary a due checkpoint comes first


def tend(channels: dict[str, Channel], runs: dict[str, Run], host: ModelHost, store: JobStore, timeout: float,
         checkpoint: Callable[..., None], finish: Callable[[Run], None]) -> None:
    """Apply the updates clients brought, take due checkpoints, end jobs whose last update came,
    and say in the events when a job waits for its client or resumes."""
    for job_id, channel in list(channels.items()):
        run = runs.get(job_id)
        if run is None:
            continue
        for accepted in channel.take_updates():
            host.apply_update(Update(job_id, accepted.version, accepted.states))
        gone = channel.gone(timeout)
        if gone and not run.waiting:
            store.add_event(job_id, f"Waiting for the fit client: none has pulled for {timeout:g} s; the job's "
                            "steps pause while other jobs go on", level="warn", data={"fit_client": "waiting"})
        elif not gone and channel.connected and (run.waiting or not run.seen_client):
            text = "The fit client is back" if run.seen_client else "The fit client connected"
            store.add_event(job_id, text + (": training resumes" if run.waiting else ""),
                            data={"fit_client": "connected"})
        run.waiting = gone
        run.seen_client = run.seen_client or channel.connected
        if run.due is not None and channel.idle():
            checkpoint(run, *run.due)
        if run.finishing and channel.idle():
            finish(run)
