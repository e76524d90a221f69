"""A job while it trains (Run), and what its row says about its adapters and its fits.

    queued job -> admitted by its engine (colaft.serve.scheduler): the task encodes the job's
                  file (rows tagged with the job id as user); `cola_config` and `fit_settings`
                  make it a user of its base model's ColaModel (colaft.serve.host); a job that
                  was running when the server died resumes from its newest checkpoint
    every step -> `Run.next_rows` joins the step's batch; `Run.advance` counts the step; a
                  checkpoint every `checkpoint_every` steps and at the ends of the last LISTED epochs
    last step  -> its adapters are saved (colaft and PEFT forms), its results file written
                  (colaft.serve.store), and it succeeds; its adapters stay for inference until evicted
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from colaft.config import ColaConfig

LISTED = 3
"""Checkpoints the API shows per job: the ends of its last epochs."""


def step_groups(runs: list[Run], rows: dict[str, list[dict]], max_tokens: int) -> list[list[Run]]:
    """`runs` in batches of at most `max_tokens` padded tokens (rows x the longest row) each.

    A step's memory grows with its tokens (a causal LM's logits are tokens x vocabulary, kept
    for the backward several times over), so one batch of every running job would make the
    server's memory follow the number of tenants. A personal job's step depends on its own rows
    only, so splitting changes no job's result. A job's rows are never split: one past the cap
    alone is a batch of its own. Jobs of similar length go together (less padding). 0: one batch.
    """
    if max_tokens <= 0 or len(runs) < 2:
        return [runs] if runs else []
    width = {r.job_id: max((len(f.get("input_ids", ())) for f in rows[r.job_id]), default=0) or 1 for r in runs}
    groups: list[list[Run]] = []
    count = longest = 0
    for r in sorted(runs, key=lambda r: width[r.job_id]):
        n, w = len(rows[r.job_id]), width[r.job_id]
        if groups and (count + n) * max(longest, w) <= max_tokens:
            groups[-1].append(r)
            count, longest = count + n, max(longest, w)
        else:
            groups.append([r])
            count, longest = n, w
    position = {r.job_id: i for i, r in enumerate(runs)}  # each batch in the jobs' own order (as one batch was)
    return sorted((sorted(g, key=lambda r: position[r.job_id]) for g in groups), key=lambda g: position[g[0].job_id])


@dataclass
class Run:
    """A running job, in memory."""

    job_id: str
    mode: str
    features: list[dict]  # encoded training rows, each with "user" = job id
    eval_features: list[dict]
    batch_size: int
    n_epochs: int
    seed: int
    step: int = 0
    tokens: int = 0
    saved_step: int = -1  # the step of the newest checkpoint
    losses: list[float] = field(default_factory=list)  # this epoch's step losses
    paused: bool = False  # out of the batches until resumed (colaft.serve.control)
    # client-fit jobs (colaft.serve.fits): the engine never waits for their fits
    client: bool = False
    due: tuple[bool, dict] | None = None  # a checkpoint (listed, metrics) waiting for the fits in flight
    finishing: bool = False  # the last step is done; the last updates are awaited
    waiting: bool = False  # the client is gone; the job's rows left the batches
    seen_client: bool = False  # a client has connected since the job was admitted

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.n_epochs * self.steps_per_epoch

    def next_rows(self) -> list[dict]:
        """The rows of this job's next step: epoch by epoch, each shuffled by (seed, epoch)."""
        epoch, i = divmod(self.step, self.steps_per_epoch)
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.features[j] for j in order[i * self.batch_size:(i + 1) * self.batch_size].tolist()]

    def advance(self, rows: list[dict], loss: float) -> None:
        """A step on `rows` is done, with this job's mean loss `loss`."""
        self.step += 1
        self.tokens += sum(len(f["input_ids"]) for f in rows)
        self.losses.append(loss)

    @property
    def epoch(self) -> int:
        """The epoch of the last step taken, from 1."""
        return (self.step - 1) // self.steps_per_epoch + 1


def cola_config(options: dict) -> ColaConfig:
    """The adapters a job's options ask for (a job's "colaft" object, targets resolved)."""
    return ColaConfig(target_modules=options["targets"], adapter=options["adapter"], rank=options["rank"],
                      alpha=options["alpha"], hidden=options["hidden"])


def fit_settings(base_lr: float, options: dict, hyperparameters: dict, total_steps: int) -> dict:
    """The job's fit, in Trainer's names: AdamW from `base_lr` (the task's) times the job's
    multiplier, decaying linearly over its steps, fitted every `interval` steps."""
    fit = {"optimizer": "adamw", "lr": base_lr * hyperparameters["learning_rate_multiplier"],
           "scheduler": "linear", "total_steps": total_steps, "interval": options["interval"]}
    if options["fit_device"]:
        fit["fit_device"] = options["fit_device"]
    return fit
