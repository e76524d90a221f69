"""PEFT LoRA interop: export users' low-rank adapters for PEFT, and start users from PEFT adapters.

    export_peft(dir, user=u)  -> dir/adapter_config.json + adapter_model.safetensors, as PEFT writes them
    export_peft(dir), several users -> PEFT's multi-adapter layout (PeftModel.save_pretrained):
        dir/                 the adapter named "default" (the user "default", else the first user)
        dir/<adapter name>/  every other user's adapter
        dir/colaft_peft_users.json  {"adapters": {adapter name: user id}} (PEFT names are safe, ids free-form)

Task heads become PEFT `modules_to_save`, holding the merged weight W + delta_W. A classifier's
labels go next to each adapter's config in `colaft_labels.json` ({"num_labels", "id2label",
"label2id"}, as a classifier's config.json holds them): PEFT's LoraConfig has no place for them
(unknown keys in adapter_config.json are dropped or refused, depending on PEFT's version), and a
PEFT user names the outputs when building the base model the adapter goes on:
`from_pretrained(base, num_labels=n, id2label={int(i): v for i, v in id2label.items()})` (JSON
keys are text; transformers wants the indices as ints). `ColaModel.from_peft` reads it back.

The model is handed in (`cola_model`: a ColaModel); `ColaModel.from_peft` builds one from `read_peft`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftType
from peft.utils import CONFIG_NAME as PEFT_CONFIG
from peft.utils import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS
from peft.utils import WEIGHTS_NAME as PEFT_WEIGHTS_BIN
from peft.utils import load_peft_weights
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from colaft.adapters.lowrank import LowRankEmbedding, LowRankLinear
from colaft.config import DEFAULT_USER, ColaConfig
from colaft.io.adapters import States, check_states, label_meta, load_states, safe_names
from colaft.io.adapters import read_labels as labels_in
from colaft.io.files import atomic_dir, read_json, write_json
from colaft.sites import Site

PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix (peft.utils.save_and_load)
LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
BASE_LAYER = "base_layer.weight"  # PEFT also saves a targeted embedding's own weight ("embed_tokens")
PEFT_DEFAULT = "default"  # the adapter PeftModel.from_pretrained(base, dir) loads from dir itself
PEFT_USERS = "colaft_peft_users.json"
LABELS = "colaft_labels.json"  # a classifier's labels (see the module docstring)


# ---------------------------------------------------------------- export

def _lora_tensors(site: Site, adapter: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(adapter, (LowRankLinear, LowRankEmbedding)):
        raise ValueError(f"site {site.name}: a {type(adapter).__name__} adapter has no PEFT LoRA form; "
                         f"only lowrank adapters (and task heads) export")
    if site.spec.kind == "conv2d" and any(d != 1 for d in site.spec.dilation):
        raise ValueError(f"site {site.name}: PEFT's LoRA Conv2d has no dilation")
    if site.spec.kind == "conv2d" and site.spec.padding_mode != "zeros":
        raise ValueError(f"site {site.name}: PEFT's LoRA Conv2d pads with zeros, "
                         f"this site with {site.spec.padding_mode}")
    return {f"{site.name}.{k}": v for k, v in adapter.state_dict().items()}


def _merged_head(site: Site, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """A task head as PEFT's modules_to_save holds it: the module's own parameters, delta merged."""
    m = site.target
    dw, db = adapter.delta_weight()
    out = {"weight": m.weight + (dw.T if site.transposed else dw)}
    if m.bias is not None:  # a head's adapter has a bias delta exactly when the head has a bias
        out["bias"] = m.bias + db
    return {f"{site.name}.{k}": v for k, v in out.items()}


def _peft_adapter(cola_model, user: str) -> tuple[LoraConfig, dict[str, torch.Tensor], list | None]:
    """`user`'s adapters as a PEFT LoRA config and its weights; ValueError if PEFT cannot hold them."""
    tensors, targets, heads = {}, [], []
    for site in cola_model.sites.values():
        adapter = site.get(user)
        if adapter is None:
            continue
        if site.is_head:
            tensors.update(_merged_head(site, adapter))
            heads.append(site.name)
        else:
            tensors.update(_lora_tensors(site, adapter))
            targets.append(site.name)
    config = cola_model.user_configs[user]
    linear = [cola_model.site(n).target for n in targets if cola_model.site(n).spec.kind == "linear"]
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                             target_modules=targets, modules_to_save=sorted(heads) or None,
                             fan_in_fan_out=bool(linear) and all(isinstance(m, Conv1D) for m in linear),  # W (in, out)
                             base_model_name_or_path=getattr(cola_model.model, "name_or_path", None) or None)
    return peft_config, {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in tensors.items()}, \
        cola_model.labels.get(user)


def _write_peft(directory: Path, adapter: tuple[LoraConfig, dict[str, torch.Tensor], list | None]) -> None:
    peft_config, tensors, labels = adapter
    peft_config.save_pretrained(str(directory))
    save_file(tensors, directory / PEFT_WEIGHTS, metadata={"format": "pt"})
    if labels is not None:
        write_json(directory / LABELS, {"num_labels": len(labels), **label_meta(labels)})


def read_labels(directory: str | Path) -> list | None:
    """The labels an exported classifier's adapter folder names (None without `colaft_labels.json`)."""
    path = Path(directory) / LABELS
    return labels_in(read_json(path)) if path.is_file() else None


def peft_names(users: list[str]) -> dict[str, str]:
    """User id -> PEFT adapter name: "default" for the user "default" (else the first user), safe names for the rest.

    PEFT keeps adapters in ModuleDicts (no dots) and folders, reserves "__base__" for
    mixed batches, and mistakes a name inside its "lora_" prefix for part of a key.
    """
    first = DEFAULT_USER if DEFAULT_USER in users else users[0]
    rest = [u for u in users if u != first]
    names = safe_names(rest, r"[^0-9A-Za-z_-]", reserved=(PEFT_DEFAULT, "__base__"), refuse=lambda n: n in "lora_")
    return {first: PEFT_DEFAULT, **names}


def export_peft(cola_model, directory: str | Path, user: str | None = None) -> None:
    """Write low-rank adapters as a PEFT LoRA adapter directory (atomic).

    `user`: that user's adapters; then `peft.PeftModel.from_pretrained(base, directory)`
    computes what `cola_model` does for that user's rows (its own adapters: in collaborative
    mode the mean is not what is exported). No `user`: the only user's, or with several users
    PEFT's multi-adapter layout (see the module docstring): load the rest with
    `peft_model.load_adapter(directory / name, adapter_name=name)`.
    Raises ValueError for adapters that PEFT's LoRA cannot express, naming every such user.
    """
    users = cola_model.users if user is None else [user]
    cola_model.check_users(users)
    adapters, problems = {}, {}
    for u in users:
        try:
            adapters[u] = _peft_adapter(cola_model, u)
        except ValueError as e:
            problems[u] = str(e)
    if problems:
        which = "; ".join(f"user {u!r}: {e}" for u, e in problems.items())
        hint = " (export the others one by one with user=...)" if len(problems) < len(users) else ""
        raise ValueError(f"cannot export as PEFT LoRA: {which}{hint}")
    with atomic_dir(directory, (PEFT_CONFIG,)) as tmp:
        if len(users) == 1:
            _write_peft(tmp, adapters[users[0]])
            return
        names = peft_names(users)
        for u, name in names.items():
            folder = tmp if name == PEFT_DEFAULT else tmp / name
            folder.mkdir(exist_ok=True)
            _write_peft(folder, adapters[u])
        write_json(tmp / PEFT_USERS, {"adapters": {name: u for u, name in names.items()}})


# ---------------------------------------------------------------- import

def read_peft(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
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


def _split_peft(weights: dict[str, torch.Tensor]) -> tuple[States, States]:
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


def _head_base(site: Site, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved copy of a head (modules_to_save) as the base weights the head's zero delta adds to."""
    base = {"weight": saved["weight"]}
    if site.target.bias is not None:
        base["bias"] = saved["bias"] if "bias" in saved else site.target.bias.detach()
    return base


def _check_base_layer(site: Site, saved: torch.Tensor, source) -> None:
    weight = site.target.weight
    if not torch.equal(saved.to(weight), weight):
        raise ValueError(f"{source}: {site.name} carries base weights of its own (a resized embedding?); "
                         f"colaft keeps the base model as it is")


def load_into(cola_model, user: str, peft_config: LoraConfig, weights: dict[str, torch.Tensor],
               source) -> None:
    """Check everything, then copy the PEFT weights into `user`'s adapters."""
    config = cola_model.user_configs[user]
    if (peft_config.r, peft_config.lora_alpha) != (config.rank, config.alpha) or config.adapter != "lowrank":
        raise ValueError(f"{source}: LoRA r={peft_config.r}, lora_alpha={peft_config.lora_alpha} does not fit "
                         f"adapter={config.adapter!r}, rank={config.rank}, alpha={config.alpha} (user {user!r})")
    sites = cola_model.user_adapters(user)
    heads = {n for n in sites if cola_model.site(n).is_head}
    lora, other = _split_peft(weights)
    for name, state in lora.items():
        saved_base = state.pop(BASE_LAYER, None)
        if saved_base is not None and name in sites:
            _check_base_layer(cola_model.site(name), saved_base, source)
    extra = sorted(set(other) - heads)
    if extra:
        raise ValueError(f"{source}: {extra} are not LoRA weights nor task heads of user {user!r}")
    # a head comes whole (the weights PEFT trained): it becomes the head's base, under a zero delta
    bases = {n: _head_base(cola_model.site(n), s) for n, s in other.items()}
    zeros = {n: {k: torch.zeros_like(v) for k, v in sites[n].state_dict().items()} for n in other}
    states = {**lora, **zeros}
    adapters = {n: a for n, a in sites.items() if n in states or n not in heads}
    check_states(adapters, states, source)
    cola_model.check_head_bases(user, bases, source)
    keep = set(cola_model.users) - {user}  # other users train on the heads as they are
    load_states(adapters, cola_model.adopt_head_bases(user, bases, states, keep=keep))


def config_of(peft_config: LoraConfig, weights: dict[str, torch.Tensor], **overrides) -> ColaConfig:
    # The saved weights name exactly the adapted modules, whatever selected them
    # (all-linear, layers_to_transform, exclude_modules...).
    sites = sorted(_split_peft(weights)[0])
    settings = dict(target_modules=sites, adapter="lowrank", rank=peft_config.r, alpha=peft_config.lora_alpha,
                    dropout=peft_config.lora_dropout, heads=sorted(peft_config.modules_to_save or []))
    return ColaConfig(**{**settings, **overrides})


def load_peft(cola_model, directory: str | Path, user: str | None = None) -> None:
    """Start `user`'s low-rank adapters from a PEFT LoRA adapter directory (default: the only user).

    An existing user's adapters must be lowrank, at exactly the adapter's target modules,
    with its rank and alpha; its modules_to_save must be task heads of the user (a head the
    adapter lacks keeps its delta). A new user is created with a lowrank config taken from
    the adapter (dropout and merge are the model's: the sites share them). On any error the
    model is left as it was. Call it before building a Trainer, which copies the adapters
    it starts from (a Trainer picks up a new user by itself).
    """
    peft_config, weights = read_peft(directory)
    if user is None:
        if len(cola_model.users) != 1:
            raise ValueError(f"the model has {len(cola_model.users)} users: name the one to load (user=...)")
        user = cola_model.users[0]
    if user in cola_model.user_configs:
        load_into(cola_model, user, peft_config, weights, directory)
        return
    try:
        config = config_of(peft_config, weights, dropout=cola_model.config.dropout, merge=cola_model.config.merge)
        cola_model.add_user(user, config)
    except ValueError as e:
        raise ValueError(f"{directory} does not fit this model: {e}") from e
    try:
        load_into(cola_model, user, peft_config, weights, directory)
    except BaseException:
        cola_model.remove_user(user)
        raise

