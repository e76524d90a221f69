"""colaft: fine-tune frozen models with ColA's Gradient Learning (Diao et al., 2024).

The library's public names are here; how the packages are layered, and one training step
traced through their files, is in ARCHITECTURE.md at the repository root.
"""
from importlib.metadata import version

from colaft.adapters import ADAPTERS, SiteSpec, register_adapter
from colaft.config import DEFAULT_USER, ColaConfig
from colaft.fit import fit
from colaft.model import ColaModel
from colaft.packets import Packet
from colaft.server import server_step
from colaft.trainer import Trainer, TrainerLike, train_steps
from colaft.users import FitConfig, Owner

__all__ = ["ADAPTERS", "DEFAULT_USER", "ColaConfig", "ColaModel", "FitConfig", "Owner", "Packet", "SiteSpec", "Trainer",
           "TrainerLike", "fit", "register_adapter", "server_step", "train_steps"]
__version__ = version("colaft")
