"""Every user's adapters and ColaConfig on disk: what `ColaModel.save_pretrained` writes.

One user (old checkpoints too):
    dir/colaft_config.json      {"user", "config": ColaConfig, "sites", "mode", "weights", "colaft_version",
                                 and for a classifier "id2label", "label2id" (see `label_maps`)}
    dir/adapters.safetensors    <site>.<param>
    dir/heads.safetensors       <head site>.weight|bias: the base head the deltas were trained on
Several users:
    dir/colaft_users.json       {"users": [{"user": id, "folder": name}, ...] in order, "mode", "weights", ...}
    dir/<folder>/               one user's files as above (user ids are free-form; folders are safe names)

The model is handed in (`cola_model`: a ColaModel, used through its users, configs and
adapters); this module never imports it. Loaders check everything before they change anything.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from colaft.config import DEFAULT_USER, ColaConfig
from colaft.io.files import atomic_dir, read_json, require, write_json

CONFIG = "colaft_config.json"
ADAPTERS = "adapters.safetensors"
HEADS = "heads.safetensors"  # the base weights under the user's task heads (newly initialised per run)
USERS = "colaft_users.json"
MARKERS = (CONFIG, USERS)  # an adapter checkpoint holds one of these
RESERVED = ("trainer.safetensors", "trainer_state.json", "pending.safetensors")  # a trainer checkpoint's files

States = dict[str, dict[str, torch.Tensor]]  # site name -> adapter state_dict


# ---------------------------------------------------------------- adapter states

def nest(flat: Mapping[str, torch.Tensor], sites: list[str]) -> States:
    """Split `<site>.<param>` keys by the site list (a site name has dots too: the longest match wins)."""
    states: States = {s: {} for s in sites}
    for key, t in flat.items():
        site = max((s for s in sites if key.startswith(s + ".")), key=len, default=None)
        if site is None:
            raise ValueError(f"tensor {key!r} belongs to no site of the checkpoint's config")
        states[site][key[len(site) + 1:]] = t
    return states


def check_states(adapters: Mapping[str, nn.Module], states: States, source) -> None:
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


def load_states(adapters: Mapping[str, nn.Module], states: States) -> None:
    for name, adapter in adapters.items():
        adapter.load_state_dict(states[name])


# ---------------------------------------------------------------- label names

def label_maps(labels: list) -> tuple[dict[int, object], dict[str, int]]:
    """(id2label, label2id) of a classifier whose output i means `labels[i]`, as transformers' configs hold them.

    The labels keep the data's own values: text stays text and integers stay integers
    (id2label {0: 0, 1: 1}, not "LABEL_0"). JSON keys are strings, so on disk id2label's keys
    are the output indices as text and label2id's keys are the labels as text; id2label's
    values keep the labels' types and are the ones read back (`read_labels`).
    """
    return dict(enumerate(labels)), {str(label): i for i, label in enumerate(labels)}


def read_labels(meta: Mapping) -> list | None:
    """The labels in output order from a JSON object holding "id2label" (None without one)."""
    id2label = meta.get("id2label")
    if not id2label:
        return None
    by_index = {int(i): label for i, label in id2label.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"id2label must number the outputs 0..{len(by_index) - 1}, not {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def label_meta(labels: list | None) -> dict:
    """The "id2label" and "label2id" entries of a JSON file ({} for no labels)."""
    if labels is None:
        return {}
    id2label, label2id = label_maps(labels)
    return {"id2label": {str(i): label for i, label in id2label.items()}, "label2id": label2id}


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


def _write_user(cola_model, user: str, directory: Path, extra: Mapping) -> None:
    """One user's adapters and ColaConfig: the single-user layout."""
    adapters = cola_model.user_adapters(user)
    tensors = {f"{site}.{k}": v.detach().cpu().contiguous() for site, a in adapters.items()
               for k, v in a.state_dict().items()}
    save_file(tensors, directory / ADAPTERS)
    heads = {f"{site}.{k}": v.cpu().contiguous() for site, p in cola_model.head_bases(user).items()
             for k, v in p.items()}
    if heads:
        save_file(heads, directory / HEADS)
    write_json(directory / CONFIG, {"user": user, "config": cola_model.user_configs[user].to_dict(),
                                    "sites": list(adapters), **label_meta(cola_model.labels.get(user)), **extra,
                                    "colaft_version": version("colaft")})


def write_adapters(cola_model, directory: Path, user: str | None = None) -> None:
    """Every user's adapters (or only `user`'s) into `directory`; the mode goes with a whole model only."""
    users = cola_model.users if user is None else [user]
    if not users:
        raise ValueError("the model has no users: nothing to save")
    cola_model.check_users(users)
    mode = {"mode": cola_model.mode, "weights": cola_model.weights} if user is None else {}
    if len(users) == 1:
        _write_user(cola_model, users[0], directory, mode)
        return
    # user folders never shadow a file of the root (a trainer checkpoint keeps its files there)
    folders = safe_names(users, r"[^0-9A-Za-z_.-]", reserved=(USERS, *RESERVED))
    for u in users:
        (directory / folders[u]).mkdir()
        _write_user(cola_model, u, directory / folders[u], {})
    write_json(directory / USERS, {"users": [{"user": u, "folder": folders[u]} for u in users], **mode,
                                   "colaft_version": version("colaft")})


@dataclass
class Saved:
    """One user's adapters as a checkpoint holds them."""
    user: str
    config: dict
    states: States
    source: Path  # the folder they came from, for error messages
    heads: States = field(default_factory=dict)  # head site -> the base head's weight and bias (older: none)
    labels: list | None = None  # a classifier's label per output (older, or not a classifier: none)


def _read_user(path: Path) -> tuple[Saved, dict]:
    require(path, CONFIG, ADAPTERS)
    meta = read_json(path / CONFIG)
    states = nest(load_file(path / ADAPTERS), meta["sites"])
    heads = nest(load_file(path / HEADS), meta["sites"]) if (path / HEADS).is_file() else {}
    heads = {site: params for site, params in heads.items() if params}
    return Saved(meta.get("user", DEFAULT_USER), meta["config"], states, path, heads, read_labels(meta)), meta


def read(directory: str | Path) -> tuple[list[Saved], dict]:
    """Every user's adapters in a checkpoint, in order, and the model's mode ({} if not saved)."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {path}")
    if not (path / USERS).is_file():
        saved, meta = _read_user(path)
        return [saved], {k: meta[k] for k in ("mode", "weights") if k in meta}
    index = read_json(path / USERS)
    saved = []
    for entry in index["users"]:
        folder = entry["folder"]
        if Path(folder).name != folder or folder in ("", ".", ".."):
            raise ValueError(f"{path / USERS}: user folder {folder!r} is not a plain name")
        one, _ = _read_user(path / folder)
        one.user = entry["user"]  # the index is the authority on ids
        saved.append(one)
    return saved, {k: index[k] for k in ("mode", "weights") if k in index}


def pick(saved: list[Saved], user: str, path) -> Saved:
    """`user`'s adapters: by id from a checkpoint of several users; a single-user one's, whatever its id."""
    if len(saved) == 1:
        return Saved(user, saved[0].config, saved[0].states, saved[0].source, saved[0].heads, saved[0].labels)
    found = [s for s in saved if s.user == user]
    if not found:
        raise ValueError(f"{path} holds no user {user!r}; its users: {', '.join(repr(s.user) for s in saved)}")
    return found[0]


def read_users(directory: str | Path, user: str | None = None) -> tuple[list[Saved], dict]:
    """`read`, or with `user` that user's adapters alone (and no mode)."""
    saved, mode = read(directory)
    if user is not None:
        return [pick(saved, user, directory)], {}
    return saved, mode


def _check_config(have: ColaConfig, saved: dict, source) -> None:
    """A user's saved ColaConfig must compute what the model's does (targets: the site lists are compared)."""
    have = have.to_dict()
    diff = {k: (v, have.get(k)) for k, v in saved.items()
            if k not in ("target_modules", "heads") and have.get(k) != v}
    if diff:
        raise ValueError(f"{source}: saved with another ColaConfig (field: (saved, this model's)): {diff}")


# ---------------------------------------------------------------- save / load into a model

def save_adapters(cola_model, directory: str | Path, user: str | None = None) -> None:
    """Save every user's adapters and ColaConfig (and the mode) to `directory`, atomically.

    One user: `colaft_config.json` + `adapters.safetensors`; several: `colaft_users.json` and
    one such folder per user. `user`: that user's adapters alone, in the one-user layout.
    """
    with atomic_dir(directory, MARKERS) as tmp:
        write_adapters(cola_model, tmp, user)


def load_adapters_into(cola_model, directory: str | Path, user: str | None = None) -> None:
    """Load saved users into an existing ColaModel: new users are added, existing ones get the weights.

    `user`: only that user (from a checkpoint of one user: its adapters, whatever id it was
    saved under). An existing user must have the same sites, shapes and adapter settings.
    On any error the model is left as it was. The mode is not changed. A Trainer's owners
    hold their own copies: load before building the Trainer (new users it picks up itself).
    """
    saved, _ = read_users(directory, user)
    before = set(cola_model.users)  # their deltas keep meaning on the heads as they are
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
            check_states(cola_model.user_adapters(s.user), s.states, f"{s.source} (user {s.user!r})")
            cola_model.check_head_bases(s.user, s.heads, s.source)
    except BaseException:
        for u in added:
            cola_model.remove_user(u)
        raise
    for s in saved:
        load_states(cola_model.user_adapters(s.user),
                    cola_model.adopt_head_bases(s.user, s.heads, s.states, keep=before - {s.user}))
        if s.labels is not None:
            cola_model.labels[s.user] = s.labels
