"""Helpers of the tests that run fits on backends (tests/backends/, colaft train's offload options)."""
from __future__ import annotations

import psutil
import torch
from conftest import flat_state
from users_helpers import build_users

from colaft import ColaModel, Trainer

KINDS = {"user.0": dict(adapter="lowrank", rank=4), "user.1": dict(adapter="linear"),
         "user.2": dict(adapter="mlp", hidden=8)}
"""The adapters of each test user: one of every type."""


def new_children() -> set[int]:
    """Child processes of this one, except multiprocessing's resource tracker (started once by
    the first spawned process, shared by all later ones, ended with this process)."""
    out = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                out.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def build(users=("user.0", "user.1"), seed: int = 0) -> ColaModel:
    """A tiny Llama with the users' adapters (KINDS)."""
    return build_users("llama", list(users), [KINDS[u] for u in users], seed)


def states(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every user's adapters on the server, flat: "user/site.param" -> tensor."""
    return {f"{u}/{k}": v for u in trainer.model.users for k, v in flat_state(trainer.model.user_adapters(u)).items()}
