"""colaft: fine-tune frozen models with ColA's Gradient Learning (Diao et al., 2024)."""
from importlib.metadata import version

from colaft.adapters import ADAPTERS, SiteSpec, register_adapter
from colaft.config import DEFAULT_USER, ColaConfig
from colaft.fit import fit
from colaft.model import ColaModel
from colaft.packets import Packet
from colaft.server import server_step
from colaft.trainer import Trainer
from colaft.users import FitConfig, Owner

__all__ = ["ADAPTERS", "DEFAULT_USER", "ColaConfig", "ColaModel", "FitConfig", "Owner", "Packet", "SiteSpec", "Trainer",
           "fit", "register_adapter", "server_step"]
__version__ = version("colaft")
