"""Checkpoints: adapters, resumable trainer state, and PEFT LoRA export/import.

    save_adapters -> adapters.safetensors (<site>.<param>) + colaft_config.json
    save_trainer  -> the above + trainer.safetensors / trainer_state.json (owner adapters,
                     optimizer, scheduler, torch RNG, stats) + pending.safetensors (packets)
    export_peft   -> adapter_config.json + adapter_model.safetensors, as PEFT writes them

No pickle: tensors go to safetensors, structure to JSON. Every writer fills a temporary
sibling directory and swaps it in only when complete, so a crash never leaves a
half-written checkpoint and an existing one survives a failed save.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftType
from peft.utils import CONFIG_NAME as PEFT_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS
from peft.utils import WEIGHTS_NAME as PEFT_WEIGHTS_BIN
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import colaft
from colaft.adapters.lowrank import LowRankEmbedding, LowRankLinear
from colaft.config import ColaConfig
from colaft.model import ColaModel
from colaft.packets import packets_from_bytes, packets_to_bytes
from colaft.sites import Site

CONFIG = "colaft_config.json"
ADAPTERS = "adapters.safetensors"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer_state.json"
PENDING = "pending.safetensors"

States = dict[str, dict[str, torch.Tensor]]  # site name -> adapter state_dict


# ---------------------------------------------------------------- atomic directories

@contextmanager
def _atomic_dir(directory: str | Path, marker: str) -> Iterator[Path]:
    """Yield an empty temporary sibling of `directory`; when the block succeeds it replaces `directory`.

    An existing `directory` is replaced only if it is empty or holds `marker` (one of our
    checkpoints), so a mistyped path never wipes unrelated files.
    """
    target = Path(directory).resolve()  # a name to put the sibling next to, also for "."
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / marker).is_file())):
        raise FileExistsError(f"{target} exists and is not a checkpoint (no {marker}): refusing to replace it")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")  # not mkdtemp: keep the umask's mode
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():
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


def _write_adapters(cola_model: ColaModel, directory: Path) -> None:
    adapters = cola_model.adapters()
    tensors = {f"{site}.{k}": v.detach().cpu().contiguous() for site, s in _states(adapters).items()
               for k, v in s.items()}
    save_file(tensors, directory / ADAPTERS)
    _write_json(directory / CONFIG, {"config": cola_model.config.to_dict(), "sites": list(adapters),
                                     "colaft_version": colaft.__version__})


def save_adapters(cola_model: ColaModel, directory: str | Path) -> None:
    """Save the server's adapters and the ColaConfig to `directory` (atomic)."""
    with _atomic_dir(directory, CONFIG) as tmp:
        _write_adapters(cola_model, tmp)


def load_adapters(model: nn.Module, directory: str | Path) -> ColaModel:
    """Attach the adapters saved in `directory` to `model` (the base model they were trained on).

    Raises FileNotFoundError for a missing or incomplete checkpoint and ValueError when its
    sites or shapes do not fit `model` (which is then left without sites).
    """
    path = _require(directory, CONFIG, ADAPTERS)
    meta = _read_json(path / CONFIG)
    states = _nest(load_file(path / ADAPTERS), meta["sites"])
    try:
        cola = ColaModel(model, ColaConfig.from_dict(meta["config"]))
    except ValueError as e:
        raise ValueError(f"{path} does not fit this model: {e}") from e
    try:
        _check_states(cola.adapters(), states, path)
    except ValueError:
        cola.unload()
        raise
    _load_states(cola.adapters(), states)
    return cola


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
    directory is also an adapter checkpoint (`load_adapters` reads it).
    """
    owners = {u: trainer.owner_state(u) for u in trainer.model.users}
    pending = [p for state in owners.values() for p in state.pop("pending")]
    tensors: dict[str, torch.Tensor] = {}
    state = _encode({"owners": owners, "rng": _rng_state(), "stats": trainer.stats}, "", tensors)
    with _atomic_dir(directory, CONFIG) as tmp:
        _write_adapters(trainer.model, tmp)
        save_file(tensors, tmp / TRAINER_TENSORS)
        _write_json(tmp / TRAINER_STATE, state)
        (tmp / PENDING).write_bytes(packets_to_bytes(pending))


def load_trainer(trainer, directory: str | Path) -> None:
    """Restore a `save_trainer` checkpoint into `trainer`.

    `trainer` must be built like the saved one (same base model, ColaConfig, users, optimizer
    and scheduler types, intervals); everything is checked before anything is changed.
    """
    path = _require(directory, CONFIG, ADAPTERS, TRAINER_TENSORS, TRAINER_STATE, PENDING)
    meta = _read_json(path / CONFIG)
    config = trainer.model.config.to_dict()
    if meta["config"] != config:
        diff = {k: (v, config.get(k)) for k, v in meta["config"].items() if config.get(k) != v}
        raise ValueError(f"{path}: saved with another ColaConfig (field: (saved, this trainer's)): {diff}")
    server = _nest(load_file(path / ADAPTERS), meta["sites"])
    state = _decode(_read_json(path / TRAINER_STATE), load_file(path / TRAINER_TENSORS))
    owners, pending = state["owners"], packets_from_bytes((path / PENDING).read_bytes())
    if sorted(owners) != sorted(trainer.model.users):
        raise ValueError(f"{path}: saved for users {sorted(owners)}, this trainer has {sorted(trainer.model.users)}")
    for user, owner in owners.items():
        interval = trainer.user_fit.get(user, trainer.fit_config).interval
        if owner["pending_steps"] >= interval:
            raise ValueError(f"{path}: user {user!r} holds {owner['pending_steps']} pending server steps, "
                             f"but this trainer fits every {interval}")
        _check_states(trainer.model.user_adapters(user), owner["adapters"], f"{path} (owner adapters of {user!r})")
        owner["pending"] = [p for p in pending if p.user == user]
    _check_states(trainer.model.adapters(), server, path)
    _load_states(trainer.model.adapters(), server)
    for user, owner in owners.items():
        trainer.pipeline.load_state(user, owner)
    _set_rng_state(state["rng"])
    trainer.stats.update(state["stats"])


# ---------------------------------------------------------------- PEFT LoRA

PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix (peft.utils.save_and_load)
LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
BASE_LAYER = "base_layer.weight"  # PEFT also saves a targeted embedding's own weight ("embed_tokens")


def _lora_tensors(site: Site) -> dict[str, torch.Tensor]:
    adapter = site.adapter
    if not isinstance(adapter, (LowRankLinear, LowRankEmbedding)):
        raise ValueError(f"site {site.name}: a {type(adapter).__name__} adapter has no PEFT LoRA form; "
                         f"only lowrank adapters (and task heads) export")
    if site.spec.kind == "conv2d" and any(d != 1 for d in site.spec.dilation):
        raise ValueError(f"site {site.name}: PEFT's LoRA Conv2d has no dilation")
    if site.spec.kind == "conv2d" and site.spec.padding_mode != "zeros":
        raise ValueError(f"site {site.name}: PEFT's LoRA Conv2d pads with zeros, this site with {site.spec.padding_mode}")
    return {f"{site.name}.{k}": v for k, v in adapter.state_dict().items()}


def _merged_head(site: Site) -> dict[str, torch.Tensor]:
    """A task head as PEFT's modules_to_save holds it: the module's own parameters, delta merged."""
    m = site.target
    dw, db = site.adapter.delta_weight()
    out = {"weight": m.weight + (dw.T if isinstance(m, Conv1D) else dw)}
    if m.bias is not None:  # a head's adapter has a bias delta exactly when the head has a bias
        out["bias"] = m.bias + db
    return {f"{site.name}.{k}": v for k, v in out.items()}


def export_peft(cola_model: ColaModel, directory: str | Path) -> None:
    """Write the low-rank adapters as a PEFT LoRA adapter directory (atomic).

    `peft.PeftModel.from_pretrained(base, directory)` then computes what `cola_model` does.
    Task heads become PEFT `modules_to_save`, holding the merged weight W + delta_W.
    Raises ValueError for adapters that PEFT's LoRA cannot express.
    """
    heads = set(cola_model.head_names)
    tensors, targets = {}, []
    for site in cola_model.sites.values():
        if site.name in heads:
            tensors.update(_merged_head(site))
        else:
            tensors.update(_lora_tensors(site))
            targets.append(site.name)
    config = cola_model.config
    linear = [cola_model.site(n).target for n in targets if cola_model.site(n).spec.kind == "linear"]
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=targets, modules_to_save=sorted(heads) or None,
                             fan_in_fan_out=bool(linear) and all(isinstance(m, Conv1D) for m in linear),  # W (in, out)
                             base_model_name_or_path=getattr(cola_model.model, "name_or_path", None) or None)
    with _atomic_dir(directory, PEFT_CONFIG) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  tmp / PEFT_WEIGHTS, metadata={"format": "pt"})


def _read_peft(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and weights of a PEFT adapter directory, or a clear error."""
    path = Path(directory)
    if not (path / PEFT_CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: no {PEFT_CONFIG}")
    if not any((path / n).is_file() for n in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN)):
        raise FileNotFoundError(f"{path}: no {PEFT_WEIGHTS} or {PEFT_WEIGHTS_BIN}")
    config = PeftConfig.from_pretrained(str(path))
    if config.peft_type != PeftType.LORA:
        raise ValueError(f"{path}: a {config.peft_type} adapter; only LoRA imports")
    unsupported = {"use_dora": config.use_dora, "use_rslora": config.use_rslora, "lora_bias": config.lora_bias,
                   "bias": config.bias != "none", "rank_pattern": bool(config.rank_pattern),
                   "alpha_pattern": bool(config.alpha_pattern), "target_parameters": bool(config.target_parameters),
                   "layer_replication": bool(config.layer_replication)}
    if any(unsupported.values()):
        raise ValueError(f"{path}: LoRA options that colaft's lowrank adapter lacks: "
                         f"{', '.join(k for k, v in unsupported.items() if v)}")
    weights = load_peft_weights(str(path), device="cpu")
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}


def _split_peft(weights: Mapping[str, torch.Tensor]) -> tuple[States, States]:
    """(LoRA states by site, other tensors by module) from PEFT's saved keys."""
    lora: States = {}
    other: States = {}
    for key, t in weights.items():
        param = next((p for p in LORA_PARAMS + (BASE_LAYER,) if key.endswith("." + p)), None)
        if param is None:
            module, _, param = key.rpartition(".")
            other.setdefault(module, {})[param] = t
        else:
            lora.setdefault(key[:-len(param) - 1], {})[param] = t
    return lora, other


def _head_delta(site: Site, saved: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The delta that turns a head into PEFT's saved copy of it (modules_to_save)."""
    m = site.target
    weight = saved["weight"].to(m.weight.device)
    if weight.shape != m.weight.shape:
        raise ValueError(f"head {site.name}: {tuple(weight.shape)} in the PEFT adapter, {tuple(m.weight.shape)} here")
    dw = weight - m.weight
    state = {"weight": dw.T if isinstance(m, Conv1D) else dw}
    if site.adapter.bias is not None:
        db = torch.zeros_like(site.adapter.bias)
        if "bias" in saved:
            db = saved["bias"].to(db.device) - (m.bias if m.bias is not None else 0)
        state["bias"] = db
    return state


def _check_base_layer(site: Site, saved: torch.Tensor, source) -> None:
    weight = site.target.weight
    if not torch.equal(saved.to(weight), weight):
        raise ValueError(f"{source}: {site.name} carries base weights of its own (a resized embedding?); "
                         f"colaft keeps the base model as it is")


def _load_peft(cola_model: ColaModel, peft_config: LoraConfig, weights: Mapping[str, torch.Tensor], source) -> None:
    config = cola_model.config
    if (peft_config.r, peft_config.lora_alpha) != (config.rank, config.alpha) or config.adapter != "lowrank":
        raise ValueError(f"{source}: LoRA r={peft_config.r}, lora_alpha={peft_config.lora_alpha} does not fit "
                         f"adapter={config.adapter!r}, rank={config.rank}, alpha={config.alpha}")
    heads, sites = set(cola_model.head_names), cola_model.adapters()
    lora, other = _split_peft(weights)
    for name, state in lora.items():
        saved_base = state.pop(BASE_LAYER, None)
        if saved_base is not None and name in sites:
            _check_base_layer(cola_model.site(name), saved_base, source)
    extra = sorted(set(other) - heads)
    if extra:
        raise ValueError(f"{source}: {extra} are not LoRA weights nor task heads of this model")
    states = {**lora, **{n: _head_delta(cola_model.site(n), s) for n, s in other.items()}}
    adapters = {n: a for n, a in sites.items() if n in states or n not in heads}
    _check_states(adapters, states, source)
    _load_states(adapters, states)


def load_peft(cola_model: ColaModel, directory: str | Path) -> None:
    """Start the low-rank sites of `cola_model` from a PEFT LoRA adapter directory.

    The adapter must target exactly the low-rank sites, with the same rank and alpha. Its
    modules_to_save must be task heads of `cola_model`; a head it lacks keeps its delta.
    Call it before building a Trainer, which copies the adapters it starts from.
    """
    peft_config, weights = _read_peft(directory)
    _load_peft(cola_model, peft_config, weights, directory)


def from_peft(model: nn.Module, directory: str | Path) -> ColaModel:
    """A ColaModel on `model` built from a PEFT LoRA adapter's config and started from its weights."""
    peft_config, weights = _read_peft(directory)
    # The saved weights name exactly the adapted modules, whatever selected them
    # (all-linear, layers_to_transform, exclude_modules...).
    sites = sorted(_split_peft(weights)[0])
    config = ColaConfig(target_modules=sites, adapter="lowrank", rank=peft_config.r, alpha=peft_config.lora_alpha,
                        dropout=peft_config.lora_dropout, heads=sorted(peft_config.modules_to_save or []))
    cola = ColaModel(model, config)
    try:
        _load_peft(cola, peft_config, weights, directory)
    except ValueError:
        cola.unload()
        raise
    return cola
