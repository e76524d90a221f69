"""The PEFT reference of the exactness tests: the same adapted model trained by PEFT LoRA with
ordinary backprop, and the tolerances ColA must meet against it.

The plain-autograd reference (`Backprop`) is in conftest. Imported by name (tests/ is on
sys.path): `from references import LR, TOL, PeftTwin, flat_sites`.
"""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

LR = {"sgd": 0.5, "adamw": 1e-2}
TOL = 1e-5  # float32


class PeftTwin:
    """The same adapted model trained by PEFT LoRA with ordinary backprop.

    Heads are PEFT `modules_to_save` (a trainable copy of the head): with weight decay 0,
    W_peft - W_0 is what colaft's head delta must equal.
    """

    def __init__(self, base, targets: list[str], heads: list[str], rank: int, alpha: float, make_optimizer,
                 dropout: float = 0.0):
        modules = dict(base.named_modules())
        self.heads = {h: {k: v.detach().clone() for k, v in modules[h].state_dict().items()} for h in heads}
        fan_in_fan_out = any(isinstance(m, Conv1D) for m in base.modules())
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                         modules_to_save=heads or None, fan_in_fan_out=fan_in_fan_out)
        self.model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():  # PEFT's init leaves one factor zero; make it non-zero so both train
            for layer in self._layers().values():
                if "default" in layer.lora_B:
                    w = layer.lora_B["default"].weight
                else:
                    w = layer.lora_embedding_A["default"]
                w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def _layers(self) -> dict[str, LoraLayer]:
        return {n.removeprefix("base_model.model."): m for n, m in self.model.named_modules()
                if isinstance(m, LoraLayer)}

    def site_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """PEFT's adapters in colaft's layout: site name -> adapter state_dict."""
        out = {}
        for site, layer in self._layers().items():
            if "default" in layer.lora_A:
                out[site] = {"lora_A.weight": layer.lora_A["default"].weight,
                             "lora_B.weight": layer.lora_B["default"].weight}
            else:
                out[site] = {"lora_embedding_A": layer.lora_embedding_A["default"],
                             "lora_embedding_B": layer.lora_embedding_B["default"]}
        modules = dict(self.model.base_model.model.named_modules())
        for h, w0 in self.heads.items():
            trained = modules[h].modules_to_save["default"].state_dict()
            out[h] = {k: trained[k] - w0[k] for k in w0}
        return {s: {k: v.detach().float().clone() for k, v in st.items()} for s, st in out.items()}

    def step(self, batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()


def flat_sites(site_states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """site name -> state_dict, flattened to `site.param` -> tensor (as conftest's flat_state)."""
    return {f"{s}.{k}": v for s, st in site_states.items() for k, v in st.items()}
