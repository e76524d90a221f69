"""Checkpoints: every user's adapters, and resumable trainer state.

One user (old checkpoints too):
    dir/colaft_config.json      {"user", "config": ColaConfig, "sites", "mode", "weights", "colaft_version"}
    dir/adapters.safetensors    <site>.<param>
Several users:
    dir/colaft_users.json       {"users": [{"user": id, "folder": name}, ...] in order, "mode", "weights", ...}
    dir/<folder>/               one user's files as above (user ids are free-form; folders are safe names)
save_trainer adds trainer.safetensors / trainer_state.json (every owner's adapters, optimizer,
scheduler, stats; torch RNG) and pending.safetensors (buffered packets) next to those.
PEFT LoRA export/import lives in colaft.peft_io.

No pickle: tensors go to safetensors, structure to JSON. Every writer fills a temporary
sibling directory and swaps it in only when complete, so a crash never leaves a
half-written checkpoint and an existing one survives a failed save. Loaders check
everything before they change anything.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from torch import nn

import colaft
from colaft.config import ColaConfig
from colaft.model import DEFAULT_USER, ColaModel
from colaft.packets import Packet, packets_from_bytes, packets_to_bytes

CONFIG = "colaft_config.json"
ADAPTERS = "adapters.safetensors"
USERS = "colaft_users.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer_state.json"
PENDING = "pending.safetensors"
MARKERS = (CONFIG, USERS)  # an adapter checkpoint holds one of these

States = dict[str, dict[str, torch.Tensor]]  # site name -> adapter state_dict


# ---------------------------------------------------------------- atomic directories

@contextmanager
def _atomic_dir(directory: str | Path, markers: tuple[str, ...]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; when the block succeeds it replaces `directory`.

    An existing `directory` is replaced only if it is empty or holds one of `markers` (one of
    our checkpoints), so a mistyped path never wipes unrelated files.
    """
    target = Path(directory).resolve()  # a name to put the sibling next to, also for "."
    ours = target.is_dir() and (not any(target.iterdir()) or any((target / m).is_file() for m in markers))
    if target.exists() and not ours:
        raise FileExistsError(f"{target} exists and is not a checkpoint (no {' or '.join(markers)}): "
                              "refusing to replace it")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")  # not mkdtemp: keep the umask's mode
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that list them
            _fsync(f)  # the data is on disk before the rename makes it visible
        _swap(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def _swap(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is deleted only once `new` is in place.

    POSIX cannot rename onto a non-empty directory, so the old one steps aside first. A hard
    crash between the two renames leaves both complete versions as hidden siblings.
    """
    old = new.with_name(new.name + ".old")
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync elsewhere
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require(directory: str | Path, *names: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


# ---------------------------------------------------------------- nested state <-> JSON + tensors

def _encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """A JSON form of a nested state (state_dicts, lists, numbers); its tensors go to `tensors`."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would both be stored as {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{key}: only str and int keys can be stored")
        items = [[k, _encode(v, f"{key}/{k}" if key else str(k), tensors)] for k, v in obj.items()]
        # optimizer state is keyed by int, and JSON object keys are strings: keep the pairs
        return dict(items) if all(isinstance(k, str) for k in obj) else {"__items__": items}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__tuple__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj, tensors: Mapping[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _read_json(path: Path):
    return json.loads(path.read_text())


# ---------------------------------------------------------------- adapter states

def _states(adapters: Mapping[str, nn.Module]) -> States:
    return {name: a.state_dict() for name, a in adapters.items()}


def _nest(flat: Mapping[str, torch.Tensor], sites: list[str]) -> States:
    """Split `<site>.<param>` keys by the site list (a site name has dots too: the longest match wins)."""
    states: States = {s: {} for s in sites}
    for key, t in flat.items():
        site = max((s for s in sites if key.startswith(s + ".")), key=len, default=None)
        if site is None:
            raise ValueError(f"tensor {key!r} belongs to no site of the checkpoint's config")
        states[site][key[len(site) + 1:]] = t
    return states


def _check_states(adapters: Mapping[str, nn.Module], states: States, source) -> None:
    """Raise a ValueError naming the first difference between `states` and the adapters' own."""
    extra, missing = sorted(set(states) - set(adapters)), sorted(set(adapters) - set(states))
    if extra or missing:
        raise ValueError(f"{source}: sites differ from this model's; only in the checkpoint: {extra or 'none'}; "
                         f"only in the model: {missing or 'none'}")
    for name, adapter in adapters.items():
        own, saved = adapter.state_dict(), states[name]
        if set(own) != set(saved):
            raise ValueError(f"{source}: site {name} holds {sorted(saved)}, its adapter has {sorted(own)} "
                             f"(another adapter type?)")
        for k, t in saved.items():
            if t.shape != own[k].shape:
                raise ValueError(f"{source}: site {name}: {k} is {tuple(t.shape)} in the checkpoint, "
                                 f"{tuple(own[k].shape)} in the model (another rank or model size?)")


def _load_states(adapters: Mapping[str, nn.Module], states: States) -> None:
    for name, adapter in adapters.items():
        adapter.load_state_dict(states[name])


# ---------------------------------------------------------------- users on disk

def safe_names(ids: list[str], pattern: str, reserved: tuple[str, ...] = (),
               refuse: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """Distinct names for free-form ids: characters matching `pattern` become "_", clashes get "-2", "-3", ...

    Names differ even ignoring case (case-insensitive file systems) and avoid `reserved`
    and any name `refuse` rejects; the ids themselves are stored next to them in JSON.
    """
    taken, out = {r.lower() for r in reserved}, {}
    for user in ids:
        base = re.sub(pattern, "_", user)[:64].lstrip(".") or "user"  # no hidden names, no "." or ".."
        name, n = base, 1
        while name.lower() in taken or refuse(name):
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        out[user] = name
    return out


def _write_user(cola_model: ColaModel, user: str, directory: Path, extra: Mapping) -> None:
    """One user's adapters and ColaConfig: the single-user layout."""
    adapters = cola_model.user_adapters(user)
    tensors = {f"{site}.{k}": v.detach().cpu().contiguous() for site, s in _states(adapters).items()
               for k, v in s.items()}
    save_file(tensors, directory / ADAPTERS)
    _write_json(directory / CONFIG, {"user": user, "config": cola_model.user_configs[user].to_dict(),
                                     "sites": list(adapters), **extra, "colaft_version": colaft.__version__})


def _write_adapters(cola_model: ColaModel, directory: Path, user: str | None = None) -> None:
    """Every user's adapters (or only `user`'s) into `directory`; the mode goes with a whole model only."""
    users = cola_model.users if user is None else [user]
    if not users:
        raise ValueError("the model has no users: nothing to save")
    cola_model._check_users(users)
    mode = {"mode": cola_model.mode, "weights": cola_model.weights} if user is None else {}
    if len(users) == 1:
        _write_user(cola_model, users[0], directory, mode)
        return
    # user folders never shadow a file of the root (a trainer checkpoint keeps its files there)
    folders = safe_names(users, r"[^0-9A-Za-z_.-]", reserved=(USERS, TRAINER_TENSORS, TRAINER_STATE, PENDING))
    for u in users:
        (directory / folders[u]).mkdir()
        _write_user(cola_model, u, directory / folders[u], {})
    _write_json(directory / USERS, {"users": [{"user": u, "folder": folders[u]} for u in users], **mode,
                                    "colaft_version": colaft.__version__})


@dataclass
class _Saved:
    """One user's adapters as a checkpoint holds them."""
    user: str
    config: dict
    states: States
    source: Path  # the folder they came from, for error messages


def _read_user(path: Path) -> tuple[_Saved, dict]:
    _require(path, CONFIG, ADAPTERS)
    meta = _read_json(path / CONFIG)
    states = _nest(load_file(path / ADAPTERS), meta["sites"])
    return _Saved(meta.get("user", DEFAULT_USER), meta["config"], states, path), meta


def _read(directory: str | Path) -> tuple[list[_Saved], dict]:
    """Every user's adapters in a checkpoint, in order, and the model's mode ({} if not saved)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    if not (path / USERS).is_file():
        saved, meta = _read_user(path)
        return [saved], {k: meta[k] for k in ("mode", "weights") if k in meta}
    index = _read_json(path / USERS)
    saved = []
    for entry in index["users"]:
        folder = entry["folder"]
        if Path(folder).name != folder or folder in ("", ".", ".."):
            raise ValueError(f"{path / USERS}: user folder {folder!r} is not a plain name")
        one, _ = _read_user(path / folder)
        one.user = entry["user"]  # the index is the authority on ids
        saved.append(one)
    return saved, {k: index[k] for k in ("mode", "weights") if k in index}


def _pick(saved: list[_Saved], user: str, path) -> _Saved:
    """`user`'s adapters: by id from a checkpoint of several users; a single-user one's, whatever its id."""
    if len(saved) == 1:
        return _Saved(user, saved[0].config, saved[0].states, saved[0].source)
    found = [s for s in saved if s.user == user]
    if not found:
        raise ValueError(f"{path} holds no user {user!r}; its users: {', '.join(repr(s.user) for s in saved)}")
    return found[0]


def _check_config(have: ColaConfig, saved: dict, source) -> None:
    """A user's saved ColaConfig must compute what the model's does (targets: the site lists are compared)."""
    have = have.to_dict()
    diff = {k: (v, have.get(k)) for k, v in saved.items()
            if k not in ("target_modules", "heads") and have.get(k) != v}
    if diff:
        raise ValueError(f"{source}: saved with another ColaConfig (field: (saved, this model's)): {diff}")


# ---------------------------------------------------------------- save / load adapters

def save_adapters(cola_model: ColaModel, directory: str | Path, user: str | None = None) -> None:
    """Save every user's adapters and ColaConfig (and the mode) to `directory`, atomically.

    One user: `colaft_config.json` + `adapters.safetensors`; several: `colaft_users.json` and
    one such folder per user. `user`: that user's adapters alone, in the one-user layout.
    """
    with _atomic_dir(directory, MARKERS) as tmp:
        _write_adapters(cola_model, tmp, user)


def load_adapters(model: nn.Module, directory: str | Path, user: str | None = None) -> ColaModel:
    """A ColaModel on `model` (the base model they were trained on) with the users saved in `directory`.

    Restores every user (ids, configs, adapters) and the mode; `user`: that user alone (from a
    checkpoint of one user: its adapters, under the id `user`). Raises FileNotFoundError for
    a missing or incomplete checkpoint and ValueError when it does not fit `model` (which is
    then left without sites).
    """
    saved, mode = _read(directory)
    if user is not None:
        saved, mode = [_pick(saved, user, directory)], {}
    cola = None
    try:
        for s in saved:
            try:
                config = ColaConfig.from_dict(s.config)
                if cola is None:
                    cola = ColaModel(model, config, user=s.user)
                else:
                    cola.add_user(s.user, config)
            except ValueError as e:
                raise ValueError(f"{s.source} does not fit this model: {e}") from e
            _check_states(cola.user_adapters(s.user), s.states, s.source)
        if mode:
            cola.set_mode(mode["mode"], mode["weights"])
    except BaseException:
        if cola is not None:
            cola.unload()
        raise
    for s in saved:
        _load_states(cola.user_adapters(s.user), s.states)
    return cola


def load_adapters_into(cola_model: ColaModel, directory: str | Path, user: str | None = None) -> None:
    """Load saved users into an existing ColaModel: new users are added, existing ones get the weights.

    `user`: only that user (from a checkpoint of one user: its adapters, whatever id it was
    saved under). An existing user must have the same sites, shapes and adapter settings.
    On any error the model is left as it was. The mode is not changed. A Trainer's owners
    hold their own copies: load before building the Trainer (new users it picks up itself).
    """
    saved, _ = _read(directory)
    if user is not None:
        saved = [_pick(saved, user, directory)]
    added = []
    try:
        for s in saved:
            if s.user in cola_model.user_configs:
                _check_config(cola_model.user_configs[s.user], s.config, f"{s.source} (user {s.user!r})")
            else:
                try:
                    cola_model.add_user(s.user, ColaConfig.from_dict(s.config))
                except ValueError as e:
                    raise ValueError(f"{s.source} does not fit this model: {e}") from e
                added.append(s.user)
            _check_states(cola_model.user_adapters(s.user), s.states, f"{s.source} (user {s.user!r})")
    except BaseException:
        for u in added:
            cola_model.remove_user(u)
        raise
    for s in saved:
        _load_states(cola_model.user_adapters(s.user), s.states)


# ---------------------------------------------------------------- trainer: resume bit for bit

def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save_trainer(trainer, directory: str | Path) -> None:
    """Save all that `load_trainer` needs to resume bit for bit (atomic).

    Every owner's state is fetched from the backend once its messages are answered. The
    directory is also an adapter checkpoint of every user (`load_adapters` reads it).
    """
    owners = [{"user": u, "state": trainer.owner_state(u)} for u in trainer.model.users]  # ids may hold "/"
    pending = [p for owner in owners for p in owner["state"].pop("pending")]
    tensors: dict[str, torch.Tensor] = {}
    state = _encode({"owners": owners, "rng": _rng_state(), "stats": trainer.stats}, "", tensors)
    with _atomic_dir(directory, MARKERS) as tmp:
        _write_adapters(trainer.model, tmp)
        save_file(tensors, tmp / TRAINER_TENSORS)
        _write_json(tmp / TRAINER_STATE, state)
        (tmp / PENDING).write_bytes(packets_to_bytes(pending))


def load_trainer(trainer, directory: str | Path) -> None:
    """Restore a `save_trainer` checkpoint into `trainer`: every user's server adapters and owner, the mode.

    `trainer` must be built like the saved one (same base model, users and their ColaConfigs,
    optimizer and scheduler types, intervals); everything is checked before anything is changed.
    """
    path = _require(directory, TRAINER_TENSORS, TRAINER_STATE, PENDING)
    saved, mode = _read(path)
    model = trainer.model
    state = _decode(_read_json(path / TRAINER_STATE), load_file(path / TRAINER_TENSORS))
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
        _check_states(model.user_adapters(s.user), s.states, f"{s.source} (server adapters of {s.user!r})")
    for user, owner in owners.items():
        interval = trainer.user_fit.get(user, trainer.fit_config).interval
        if owner["pending_steps"] >= interval:
            raise ValueError(f"{path}: user {user!r} holds {owner['pending_steps']} pending server steps, "
                             f"but this trainer fits every {interval}")
        _check_states(model.user_adapters(user), owner["adapters"], f"{path} (owner adapters of {user!r})")
        owner["pending"] = [p for p in pending if p.user == user]
    for s in saved:
        _load_states(model.user_adapters(s.user), s.states)
    for user, owner in owners.items():
        trainer.pipeline.load_state(user, owner)
    if mode:
        model.set_mode(mode["mode"], mode["weights"])
    _set_rng_state(state["rng"])
    trainer.stats.update(state["stats"])


# ---------------------------------------------------------------- one user of a trainer (a service's job)

OWNER_TENSORS = "owner.safetensors"
OWNER_STATE = "owner_state.json"


def save_owner(trainer, user: str, directory: str | Path, state: dict | None = None) -> None:
    """One user's server adapters and owner (optimizer, scheduler, buffered packets, version), atomically.

    What a service needs to resume one user's training while other users train on: the
    directory is also a one-user adapter checkpoint (`load_adapters(..., user=)` reads it).
    The RNG is shared by all users and is not saved (it matters only with dropout).
    `state`: the owner's state when the owner runs outside the trainer (a remote user).
    """
    state = dict(trainer.owner_state(user) if state is None else state)
    pending = state.pop("pending")
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    with _atomic_dir(directory, MARKERS) as tmp:
        _write_adapters(trainer.model, tmp, user)
        save_file(tensors, tmp / OWNER_TENSORS)
        _write_json(tmp / OWNER_STATE, encoded)
        (tmp / PENDING).write_bytes(packets_to_bytes(pending))


def load_owner(trainer, user: str, directory: str | Path) -> None:
    """Restore a `save_owner` checkpoint into `trainer`'s user `user` (added already, with the
    same ColaConfig and interval); everything is checked before anything is changed."""
    trainer.pipeline.load_state(user, read_owner(trainer, user, directory))


def read_owner(trainer, user: str, directory: str | Path) -> dict:
    """Check a `save_owner` checkpoint against `trainer`'s user `user`, load its server adapters
    and return the owner's state (for a remote user, whose owner the trainer does not hold)."""
    path = _require(directory, CONFIG, ADAPTERS, OWNER_TENSORS, OWNER_STATE, PENDING)
    model = trainer.model
    model._check_users([user])
    saved = _pick(_read(path)[0], user, path)
    if saved.config != model.user_configs[user].to_dict():
        raise ValueError(f"{path}: user {user!r} was saved with another ColaConfig")
    _check_states(model.user_adapters(user), saved.states, f"{path} (server adapters of {user!r})")
    state = _decode(_read_json(path / OWNER_STATE), load_file(path / OWNER_TENSORS))
    interval = trainer.user_fit.get(user, trainer.fit_config).interval
    if state["pending_steps"] >= interval:
        raise ValueError(f"{path}: user {user!r} holds {state['pending_steps']} pending server steps, "
                         f"but this trainer fits every {interval}")
    _check_states(model.user_adapters(user), state["adapters"], f"{path} (owner adapters of {user!r})")
    state["pending"] = [Packet(p.site, p.x, p.grad, user) for p in packets_from_bytes((path / PENDING).read_bytes())]
    _load_states(model.user_adapters(user), saved.states)
    return state


def state_to_bytes(state: Mapping, meta: Mapping | None = None) -> bytes:
    """An owner's whole state (no buffered packets) as safetensors; `meta` rides in its JSON header.
    No pickle: what travels between a server and a fit client is tensors and JSON only."""
    if state.get("pending") or state.get("pending_steps"):
        raise ValueError("a state with buffered packets does not travel this way (use packets_to_bytes)")
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode({k: v for k, v in state.items() if k != "pending"}, "", tensors)
    return save_bytes(tensors, metadata={"state": json.dumps(encoded), "meta": json.dumps(dict(meta or {}))})


def state_from_bytes(data: bytes) -> tuple[dict, dict]:
    """(state, meta) of `state_to_bytes`; raises ValueError on anything else."""
    try:
        tensors = load_bytes(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        state = _decode(json.loads(header["state"]), tensors)
        meta = json.loads(header["meta"])
    except Exception as e:  # safetensors raises its own error types; so does a truncated header
        raise ValueError(f"not an owner state: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"adapters", "optimizer", "scheduler", "version"} <= state.keys() \
            or state.get("pending_steps", 0) != 0:
        raise ValueError("not an owner state without buffered packets")
    state["pending"], state["pending_steps"] = [], 0
    return state, meta
