"""Resumable training state: a whole trainer's, or one owner's (a service's job).

    trainer: dir/ = an adapter checkpoint of every user (colaft.io.adapters)
             + trainer.safetensors / trainer_state.json (every owner's adapters, optimizer,
               scheduler, stats; torch RNG) + pending.safetensors (buffered packets)
    owner:   dir/ = a one-user adapter checkpoint + owner.safetensors / owner_state.json
             + pending.safetensors

The trainer is handed in (`trainer`: a Trainer, used through its model, owner_state, pipeline
and fit configs); this module imports neither. Everything is checked before anything changes.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from colaft.io import adapters as adapter_io
from colaft.io.adapters import MARKERS, check_states, load_states
from colaft.io.files import atomic_dir, read_json, require, write_json
from colaft.io.tensors import decode, encode
from colaft.packets import Packet, packets_from_bytes, packets_to_bytes

TRAINER_TENSORS, TRAINER_STATE, PENDING = adapter_io.RESERVED
OWNER_TENSORS = "owner.safetensors"
OWNER_STATE = "owner_state.json"


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _check_pending(trainer, user: str, state: dict, path) -> None:
    interval = trainer.user_fit.get(user, trainer.fit_config).interval
    if state["pending_steps"] >= interval:
        raise ValueError(f"{path}: user {user!r} holds {state['pending_steps']} pending server steps, "
                         f"but this trainer fits every {interval}")


# ---------------------------------------------------------------- a whole trainer: resume bit for bit

def save_trainer(trainer, directory) -> None:
    """Save all that `load_trainer` needs to resume bit for bit (atomic).

    Every owner's state is fetched from the backend once its messages are answered. The
    directory is also an adapter checkpoint of every user (`ColaModel.from_pretrained` reads it).
    """
    owners = [{"user": u, "state": trainer.owner_state(u)} for u in trainer.model.users]  # ids may hold "/"
    pending = [p for owner in owners for p in owner["state"].pop("pending")]
    tensors: dict[str, torch.Tensor] = {}
    state = encode({"owners": owners, "rng": _rng_state(), "stats": trainer.stats}, "", tensors)
    with atomic_dir(directory, MARKERS) as tmp:
        adapter_io.write_adapters(trainer.model, tmp)
        save_file(tensors, tmp / TRAINER_TENSORS)
        write_json(tmp / TRAINER_STATE, state)
        (tmp / PENDING).write_bytes(packets_to_bytes(pending))


def load_trainer(trainer, directory) -> None:
    """Restore a `save_trainer` checkpoint into `trainer`: every user's server adapters and owner, the mode.

    `trainer` must be built like the saved one (same base model, users and their ColaConfigs,
    optimizer and scheduler types, intervals); everything is checked before anything is changed.
    """
    path = require(directory, TRAINER_TENSORS, TRAINER_STATE, PENDING)
    saved, mode = adapter_io.read(path)
    model = trainer.model
    state = decode(read_json(path / TRAINER_STATE), load_file(path / TRAINER_TENSORS))
    owners = state["owners"]
    owners = {o["user"]: o["state"] for o in owners} if isinstance(owners, list) else owners  # older: by id
    pending = packets_from_bytes((path / PENDING).read_bytes())
    if len(saved) == 1 == len(owners):  # one user: its owner's id is the server's (older files named only that)
        saved[0].user = next(iter(owners))
    if sorted(owners) != sorted(model.users) or sorted(s.user for s in saved) != sorted(model.users):
        raise ValueError(f"{path}: saved for users {sorted(owners)}, this trainer has {sorted(model.users)}")
    for s in saved:
        config = model.user_configs[s.user].to_dict()
        if s.config != config:
            diff = {k: (v, config.get(k)) for k, v in s.config.items() if config.get(k) != v}
            raise ValueError(f"{path}: user {s.user!r} saved with another ColaConfig "
                             f"(field: (saved, this trainer's)): {diff}")
        check_states(model.user_adapters(s.user), s.states, f"{s.source} (server adapters of {s.user!r})")
        model.check_head_bases(s.user, s.heads, s.source)
    for user, owner in owners.items():
        _check_pending(trainer, user, owner, path)
        check_states(model.user_adapters(user), owner["adapters"], f"{path} (owner adapters of {user!r})")
        owner["pending"] = [p for p in pending if p.user == user]
    heads = {s.user: s.heads for s in saved}
    for s in saved:  # a head's delta and its owner's copy shift together onto this model's head
        load_states(model.user_adapters(s.user), model.adopt_head_bases(s.user, s.heads, s.states))
    for user, owner in owners.items():
        owner["adapters"] = model.adopt_head_bases(user, heads[user], owner["adapters"])
        trainer.pipeline.load_state(user, owner)
    if mode:
        model.set_mode(mode["mode"], mode["weights"])
    _set_rng_state(state["rng"])
    trainer.stats.update(state["stats"])


# ---------------------------------------------------------------- one user of a trainer (a service's job)

def save_owner(trainer, user: str, directory, state: dict | None = None) -> None:
    """One user's server adapters and owner (optimizer, scheduler, buffered packets, version), atomically.

    What a service needs to resume one user's training while other users train on: the
    directory is also a one-user adapter checkpoint (`from_pretrained(..., user=)` reads it).
    The RNG is shared by all users and is not saved (it matters only with dropout).
    `state`: the owner's state when the owner runs outside the trainer (a remote user).
    """
    state = dict(trainer.owner_state(user) if state is None else state)
    pending = state.pop("pending")
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode(state, "", tensors)
    with atomic_dir(directory, MARKERS) as tmp:
        adapter_io.write_adapters(trainer.model, tmp, user)
        save_file(tensors, tmp / OWNER_TENSORS)
        write_json(tmp / OWNER_STATE, encoded)
        (tmp / PENDING).write_bytes(packets_to_bytes(pending))


def load_owner(trainer, user: str, directory) -> None:
    """Restore a `save_owner` checkpoint into `trainer`'s user `user` (added already, with the
    same ColaConfig and interval); everything is checked before anything is changed."""
    trainer.pipeline.load_state(user, read_owner(trainer, user, directory))


def read_owner(trainer, user: str, directory) -> dict:
    """Check a `save_owner` checkpoint against `trainer`'s user `user`, load its server adapters
    and return the owner's state (for a remote user, whose owner the trainer does not hold)."""
    path = require(directory, adapter_io.CONFIG, adapter_io.ADAPTERS, OWNER_TENSORS, OWNER_STATE, PENDING)
    model = trainer.model
    model.check_users([user])
    saved = adapter_io.pick(adapter_io.read(path)[0], user, path)
    if saved.config != model.user_configs[user].to_dict():
        raise ValueError(f"{path}: user {user!r} was saved with another ColaConfig")
    check_states(model.user_adapters(user), saved.states, f"{path} (server adapters of {user!r})")
    model.check_head_bases(user, saved.heads, path)
    state = decode(read_json(path / OWNER_STATE), load_file(path / OWNER_TENSORS))
    _check_pending(trainer, user, state, path)
    check_states(model.user_adapters(user), state["adapters"], f"{path} (owner adapters of {user!r})")
    state["pending"] = [Packet(p.site, p.x, p.grad, user) for p in packets_from_bytes((path / PENDING).read_bytes())]
    others = set(model.users) - {user}  # other jobs train on the heads as they are
    load_states(model.user_adapters(user), model.adopt_head_bases(user, saved.heads, saved.states, keep=others))
    state["adapters"] = model.adopt_head_bases(user, saved.heads, state["adapters"], keep=others)
    return state
