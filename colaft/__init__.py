"""colaft: fine-tune frozen models with ColA's Gradient Learning (Diao et al., 2024).

The library's public names are here; how the packages are layered, and one training step
traced through their files, is in ARCHITECTURE.md at the repository root.

The names are imported on first use (PEP 562), so that `colaft --help` and other light
entry points do not pay for torch and transformers.
"""
from importlib import import_module
from importlib.metadata import version

_HOMES = {"ADAPTERS": "colaft.adapters", "SiteSpec": "colaft.adapters", "register_adapter": "colaft.adapters",
          "DEFAULT_USER": "colaft.config", "ColaConfig": "colaft.config", "fit": "colaft.fitting",
          "ColaModel": "colaft.model", "Packet": "colaft.packets", "server_step": "colaft.server",
          "Trainer": "colaft.trainer", "TrainerLike": "colaft.trainer", "train_steps": "colaft.trainer",
          "FitConfig": "colaft.users", "Owner": "colaft.users"}

__all__ = ["ADAPTERS", "DEFAULT_USER", "ColaConfig", "ColaModel", "FitConfig", "Owner", "Packet", "SiteSpec", "Trainer",
           "TrainerLike", "fit", "register_adapter", "server_step", "train_steps"]
__version__ = version("colaft")


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'colaft' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
