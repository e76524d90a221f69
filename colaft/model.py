"""ColaModel: a frozen base model with adapters at its sites (the PEFT-like entry point)."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from colaft.adapters import build_adapter, is_mergeable
from colaft.config import DEFAULT_USER, ColaConfig
from colaft.io import adapters as adapter_io
from colaft.io import peft as peft_io
from colaft.routing import Route, per_row
from colaft.sites import Call, Site, select_sites, site_spec


def _key(site_name: str) -> str:
    return site_name.replace(".", "/")  # ModuleDict keys may not contain dots


MODES = ("personal", "collaborative")


def batch_rows(args: Sequence, kwargs: Mapping) -> int | None:
    """The rows of a batch given as a model's arguments: the first dimension of its first tensor."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class ColaModel(nn.Module):
    """Wraps `model`: freezes it and attaches adapters at the selected sites, for one or many users.

    Args:
        model: any nn.Module (a transformers model, a CNN, ...).
        config: where and which adapters (ColaConfig) for the first user.
        user: the first user's id; more users come with `add_user`.
    The server-side adapters are frozen copies; trainable copies live with their owners
    (see Trainer), so this module never holds a parameter with requires_grad.

    Many users share the base model: in "personal" mode (the default) every row of a batch
    uses its own user's adapters; in "collaborative" mode every row sees the weighted mean
    of all users' mergeable deltas (see `set_mode`), while each user still fits its own rows.
    """

    def __init__(self, model: nn.Module, config: ColaConfig, user: str = DEFAULT_USER):
        super().__init__()
        self.config = config
        self.model = model.requires_grad_(False)
        self.sites = nn.ModuleDict()
        self.user_configs: dict[str, ColaConfig] = {}
        self.mode, self.weights = "personal", None
        self.labels: dict[str, list] = {}
        """User -> what its classification head's outputs mean, in output order (the data's label
        values: str or int); saved with the user's adapters as id2label/label2id."""
        self.add_user(user, config)

    @staticmethod
    def _build(module: nn.Module, config: ColaConfig, is_head: bool) -> nn.Module:
        spec = site_spec(module)
        if is_head:  # a full delta, with a bias exactly when the head has one (as PEFT's modules_to_save)
            adapter = build_adapter("linear", spec, _HeadConfig(bias=getattr(module, "bias", None) is not None))
        else:
            adapter = build_adapter(config.adapter, spec, config)
        if config.merge and not is_mergeable(adapter):
            raise ValueError(f"adapter {config.adapter!r} is not mergeable; use merge=False")
        return adapter.to(device=module.weight.device, dtype=module.weight.dtype)

    # ------------------------------------------------------------- users
    @property
    def users(self) -> list[str]:
        """User ids, in the order they were added."""
        return list(self.user_configs)

    def add_user(self, user: str, config: ColaConfig | None = None) -> None:
        """Attach a new user's adapters (one per selected site; `config` defaults to the model's).

        Users may differ in adapter type and size; sites are shared, so every user's
        dropout and merge settings must agree with the model's.
        """
        config = config or self.config
        if not isinstance(user, str) or not user:
            raise ValueError(f"a user id is a non-empty string, not {user!r}")
        if user in self.user_configs:
            raise ValueError(f"user {user!r} already exists")
        if (config.dropout, config.merge) != (self.config.dropout, self.config.merge):
            raise ValueError(f"user {user!r}: dropout and merge are settings of the shared sites "
                             f"(dropout={self.config.dropout}, merge={self.config.merge}); use the same")
        targets, heads = select_sites(self.model, config.target_modules, config.heads)
        modules = dict(self.model.named_modules())
        # Build every adapter before attaching any, so an error leaves the model untouched.
        adapters = {name: self._build(modules[name], config, is_head=name in heads) for name in targets + heads}
        for name, adapter in adapters.items():
            if _key(name) not in self.sites:
                self.sites[_key(name)] = Site(name, modules[name], 0.0 if name in heads else config.dropout,
                                              config.merge, is_head=name in heads)
            self.sites[_key(name)].add(user, adapter)
        self.user_configs[user] = config

    def remove_user(self, user: str) -> None:
        """Detach a user's adapters and free them; sites left with no adapter are removed."""
        self.check_users([user])
        for key, site in list(self.sites.items()):
            if user in site.keys:
                site.remove(user)
            if not site.keys:
                site.detach_from_model()
                del self.sites[key]
        del self.user_configs[user]
        self.labels.pop(user, None)

    def check_users(self, users) -> None:
        unknown = sorted({u for u in users if u not in self.user_configs}, key=str)
        if unknown:
            raise ValueError(f"unknown user(s) {', '.join(map(repr, unknown[:5]))}; users: "
                             f"{', '.join(self.users[:10])}{' ...' if len(self.users) > 10 else ''}")

    def set_mode(self, mode: str, weights: Mapping[str, float] | None = None) -> None:
        """"personal": rows use their own user's adapters. "collaborative": every row sees
        sum_u w_u delta_W_u / sum_u w_u over the users' mergeable adapters (w_u = 1: the mean;
        `weights` sets some), non-mergeable adapters stay personal; each user fits only its rows."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if weights:
            self.check_users(weights)
            if any(w < 0 for w in weights.values()) or not sum(weights.get(u, 1.0) for u in self.users) > 0:
                raise ValueError("collaborative weights must be >= 0 with a positive sum")
        if mode == "collaborative" and self.config.dropout > 0:
            raise ValueError("collaborative mode runs on merged weights: it needs dropout=0")
        self.mode, self.weights = mode, dict(weights or {})
        for s in self.sites.values():
            s.combine = self.weights if mode == "collaborative" else None

    @contextmanager
    def routing(self, users: str | Sequence[str | None] | None, rows: int | None = None):
        """Inside, row i of a batch of `rows` rows uses the adapters of `users[i]` (None: no routing).

        `users` is one id per row, or one id (a str) for every row. A row whose user is None
        runs through the base model alone (no user's adapter), so base-model rows can share a
        batch with users' rows (inference).
        """
        users = per_row(users, rows)
        if users is not None:
            self.check_users([u for u in users if u is not None])
        route = Route(users) if users else None
        for s in self.sites.values():
            s.route = route
        try:
            yield route
        finally:
            for s in self.sites.values():
                s.route = None

    def user_adapters(self, user: str) -> dict[str, nn.Module]:
        """Site name -> the server's (frozen) adapter of `user`."""
        self.check_users([user])
        return {s.name: s.get(user) for s in self.sites.values() if user in s.keys}

    # ------------------------------------------------------------- use
    def forward(self, *args, users: str | Sequence[str | None] | None = None, **kwargs):
        """The base model's forward; `users` (one id per row, or one id for all) routes rows to
        their users' adapters (a None row: the base model alone)."""
        with self.routing(users, batch_rows(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(self, *args, users: str | Sequence[str] | None = None, **kwargs):
        """`model.generate` with rows routed to their users' adapters (causal LMs, encoder-decoders).

        `users` has one id per input row (or one id for all); rows that generation repeats
        (beams, several sequences per prompt: the decoder's rows, and cross-attention's) keep
        their row's user.
        """
        with self.routing(users, batch_rows(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    def adapters(self, user: str | None = None) -> dict[str, nn.Module]:
        """Site name -> the server's (frozen) adapter of `user` (default: the only user)."""
        if user is None:
            if len(self.user_configs) != 1:
                raise ValueError(f"the model has {len(self.user_configs)} users: name one")
            user = self.users[0]
        return self.user_adapters(user)

    def site(self, name: str) -> Site:
        return self.sites[_key(name)]

    @contextmanager
    def recording(self):
        """Sites append a Call (x, edge of h) to the yielded list while inside."""
        calls: list[Call] = []
        for s in self.sites.values():
            s.recorder = calls
        try:
            yield calls
        finally:
            for s in self.sites.values():
                s.recorder = None

    @torch.no_grad()
    def load_adapter_state(self, states: dict[str, dict[str, torch.Tensor]], user: str | None = None) -> None:
        """Copy new adapter weights into the server's adapters of `user` (site name -> state_dict)."""
        adapters = self.adapters(user)
        for name, state in states.items():
            adapters[name].load_state_dict(state)

    # ------------------------------------------------------------- task heads
    def head_bases(self, user: str) -> dict[str, dict[str, torch.Tensor]]:
        """The base module's own parameters under each of `user`'s task heads (site -> weight, bias).

        A task head (a classifier) is newly initialised whenever the base model is loaded, so a
        head's saved delta means something only on top of these: checkpoints keep them.
        """
        return {name: {k: p.detach() for k, p in self.site(name).target.named_parameters(recurse=False)}
                for name in self.user_adapters(user) if self.site(name).is_head}

    def check_head_bases(self, user: str, bases: Mapping[str, Mapping[str, torch.Tensor]], source) -> None:
        """Raise a ValueError unless `bases` fit `user`'s task heads (names, parameters, shapes)."""
        own = self.head_bases(user)
        if set(bases) - set(own):
            raise ValueError(f"{source}: base weights for {sorted(set(bases) - set(own))}, not task heads of "
                             f"user {user!r} here (heads: {sorted(own) or 'none'})")
        for name, base in bases.items():
            shapes = {k: tuple(t.shape) for k, t in base.items()}
            if shapes != {k: tuple(t.shape) for k, t in own[name].items()}:
                raise ValueError(f"{source}: head {name} was {shapes} when saved, "
                                 f"{ {k: tuple(t.shape) for k, t in own[name].items()} } here")

    @torch.no_grad()
    def adopt_head_bases(self, user: str, bases: Mapping[str, Mapping[str, torch.Tensor]],
                         states: Mapping[str, dict[str, torch.Tensor]], keep: Collection[str] = ()
                         ) -> dict[str, dict[str, torch.Tensor]]:
        """`user`'s saved adapter `states`, made to compute here what they computed on the head
        weights `bases` they were saved with (checked by `check_head_bases`).

        `keep`: users whose deltas were trained on this model's heads as they are now. A head
        none of them adapts takes the saved weights, so the saved model's outputs come back
        exactly; a head one of them adapts keeps its weights, and the difference joins `user`'s
        delta instead (exact to round-off).
        """
        out, heads = dict(states), self.head_bases(user)
        for name, base in bases.items():
            site, own = self.site(name), heads[name]
            if all(torch.equal(base[k].to(own[k]), own[k]) for k in own):
                continue
            if any(u in keep for u in site.users if u != user):
                delta = dict(states[name])
                dw = base["weight"].to(own["weight"]) - own["weight"]
                delta["weight"] = delta["weight"] + (dw.T if site.transposed else dw).to(delta["weight"])
                if "bias" in own:
                    delta["bias"] = delta["bias"] + (base["bias"].to(own["bias"]) - own["bias"]).to(delta["bias"])
                out[name] = delta
            else:
                params = dict(site.target.named_parameters(recurse=False))
                for k, t in base.items():
                    params[k].copy_(t)
        return out

    def adapter_parameters(self) -> int:
        return sum(p.numel() for s in self.sites.values() for p in s.adapters.parameters())

    def trainable_parameters(self) -> int:
        """Parameters with requires_grad on the server: always 0 for ColA."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------- unwrap
    def unload(self) -> nn.Module:
        """Remove the sites and return the base model, unchanged."""
        for s in self.sites.values():
            s.detach_from_model()
        self.sites = nn.ModuleDict()
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Fold every delta_W into the base weights and return the plain model."""
        # a weight shared with another module (GPT-2's wte and lm_head) would change that module too
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, m in self.model.named_modules(remove_duplicate=False):
            if isinstance(getattr(m, "weight", None), torch.Tensor):
                owners.setdefault(id(m.weight), []).append((name, m))
        for s in self.sites.values():
            if not is_mergeable(s.adapter):
                raise ValueError(f"site {s.name}: adapter {type(s.adapter).__name__} is not mergeable")
            others = [n for n, m in owners.get(id(s.target.weight), []) if m is not s.target]
            if others:
                raise ValueError(f"site {s.name}: its weight is shared with {', '.join(others)} (tied); merging "
                                 "would change those too. Untie the weights first, or unload() and keep the adapter")
        for s in self.sites.values():
            s.merge_into_base()
        named = {tuple(self.labels[u]) for u in self.users if u in self.labels}
        if len(named) == 1 and hasattr(self.model, "config"):  # the merged model's config.json names its outputs
            self.model.config.id2label, self.model.config.label2id = adapter_io.label_maps(list(named.pop()))
        return self.unload()

    # ------------------------------------------------------------- disk (colaft.io)
    def save_pretrained(self, directory: str | Path, user: str | None = None) -> None:
        """Save every user's adapters and ColaConfig, and the mode (atomic); `user`: that user's alone."""
        adapter_io.save_adapters(self, directory, user)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, user: str | None = None) -> ColaModel:
        """`model` (the base model they were trained on) with the users saved in `directory` and the mode.

        `user`: that user alone (from a one-user checkpoint: its adapters, under the id `user`).
        Task heads take the weights they had when saved (a new head is random), so the saved
        model's outputs come back exactly, whatever the seed `model` was loaded with.
        Raises FileNotFoundError for a missing or incomplete checkpoint and ValueError when it
        does not fit `model` (which is then left without sites).
        """
        saved, mode = adapter_io.read_users(directory, user)
        cola = None
        try:
            for s in saved:
                try:
                    config = ColaConfig.from_dict(s.config)
                    if cola is None:
                        cola = cls(model, config, user=s.user)
                    else:
                        cola.add_user(s.user, config)
                except ValueError as e:
                    raise ValueError(f"{s.source} does not fit this model: {e}") from e
                adapter_io.check_states(cola.user_adapters(s.user), s.states, s.source)
                cola.check_head_bases(s.user, s.heads, s.source)
                if s.labels is not None:
                    cola.labels[s.user] = s.labels
            if mode:
                cola.set_mode(mode["mode"], mode["weights"])
        except BaseException:
            if cola is not None:
                cola.unload()
            raise
        for s in saved:
            adapter_io.load_states(cola.user_adapters(s.user), cola.adopt_head_bases(s.user, s.heads, s.states))
        return cola

    def load_adapters(self, directory: str | Path, user: str | None = None) -> None:
        """Add the saved users (or `user` alone) to this model, or replace their weights if they exist."""
        adapter_io.load_adapters_into(self, directory, user)

    def export_peft(self, directory: str | Path, user: str | None = None) -> None:
        """Write `user`'s low-rank adapters (default: every user's) as a PEFT LoRA adapter directory."""
        peft_io.export_peft(self, directory, user)

    def load_peft(self, directory: str | Path, user: str | None = None) -> None:
        """Start `user`'s adapters (default: the only user's; created if new) from a PEFT LoRA adapter."""
        peft_io.load_peft(self, directory, user)

    @classmethod
    def from_peft(cls, model: nn.Module, directory: str | Path, user: str = DEFAULT_USER) -> ColaModel:
        """A ColaModel on `model`, its one user built from a PEFT LoRA adapter's config and weights."""
        peft_config, weights = peft_io.read_peft(directory)
        cola = cls(model, peft_io.config_of(peft_config, weights), user=user)
        try:
            peft_io.load_into(cola, user, peft_config, weights, directory)
            if (labels := peft_io.read_labels(directory)) is not None:
                cola.labels[user] = labels
        except ValueError:
            cola.unload()
            raise
        return cola


@dataclass(frozen=True)
class _HeadConfig:
    """The adapter settings of a task head: a full-rank delta."""
    bias: bool
