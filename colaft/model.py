"""ColaModel: a frozen base model with adapters at its sites (the PEFT-like entry point)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from colaft.adapters import build_adapter, is_mergeable
from colaft.config import ColaConfig
from colaft.sites import Call, Site, select_sites, site_spec


def _key(site_name: str) -> str:
    return site_name.replace(".", "/")  # ModuleDict keys may not contain dots


class ColaModel(nn.Module):
    """Wraps `model`: freezes it and attaches one adapter per selected site.

    Args:
        model: any nn.Module (a transformers model, a CNN, ...).
        config: where and which adapters (ColaConfig).
    The server-side adapters are frozen copies; trainable copies live with their owners
    (see Trainer), so this module never holds a parameter with requires_grad.
    """

    def __init__(self, model: nn.Module, config: ColaConfig):
        super().__init__()
        self.config = config
        self.model = model.requires_grad_(False)
        targets, heads = select_sites(model, config.target_modules, config.heads)
        modules = dict(model.named_modules())
        # Build every adapter before attaching any, so an error leaves the model untouched.
        adapters = {name: self._build(modules[name], config, is_head=name in heads) for name in targets + heads}
        self.sites = nn.ModuleDict({
            _key(name): Site(name, modules[name], adapter, 0.0 if name in heads else config.dropout, config.merge,
                             is_head=name in heads)
            for name, adapter in adapters.items()})

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

    @property
    def head_names(self) -> list[str]:
        """Sites that are task heads (a linear adapter with bias)."""
        return [s.name for s in self.sites.values() if s.is_head]

    # ------------------------------------------------------------- use
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def adapters(self) -> dict[str, nn.Module]:
        """Site name -> the server's (frozen) adapter."""
        return {s.name: s.adapter for s in self.sites.values()}

    def site(self, name: str) -> Site:
        return self.sites[_key(name)]

    @contextmanager
    def recording(self):
        """Sites append a Call (x, h) to the yielded list while inside."""
        calls: list[Call] = []
        for s in self.sites.values():
            s.recorder = calls
        try:
            yield calls
        finally:
            for s in self.sites.values():
                s.recorder = None

    @torch.no_grad()
    def load_adapter_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Copy new adapter weights into the server's adapters (site name -> state_dict)."""
        for name, state in states.items():
            self.site(name).adapter.load_state_dict(state)

    def adapter_parameters(self) -> int:
        return sum(p.numel() for s in self.sites.values() for p in s.adapter.parameters())

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
        return self.unload()

    # ------------------------------------------------------------- disk (colaft.checkpoint)
    def save_pretrained(self, directory: str | Path) -> None:
        from colaft import checkpoint
        checkpoint.save_adapters(self, directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "ColaModel":
        from colaft import checkpoint
        return checkpoint.load_adapters(model, directory)

    def export_peft(self, directory: str | Path) -> None:
        from colaft import checkpoint
        checkpoint.export_peft(self, directory)

    def load_peft(self, directory: str | Path) -> None:
        from colaft import checkpoint
        checkpoint.load_peft(self, directory)

    @classmethod
    def from_peft(cls, model: nn.Module, directory: str | Path) -> "ColaModel":
        from colaft import checkpoint
        return checkpoint.from_peft(model, directory)


@dataclass(frozen=True)
class _HeadConfig:
    """The adapter settings of a task head: a full-rank delta."""
    bias: bool
