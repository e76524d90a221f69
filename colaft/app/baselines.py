"""Backprop baselines for the comparison with ColA: full fine-tuning and the real `peft` package's methods.

    base model -> full: every weight trains | PEFT method: peft.get_peft_model
               -> Backprop (forward/generate like a ColaModel) -> BackpropTrainer.step(batch)

They train by plain autograd with the optimizer and schedule a ColA owner builds (the same
FitConfig), as a colaft.trainer.TrainerLike, so that the training loop and the tasks'
evaluations drive them exactly as they drive ColA: one training loop, one set of metrics.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from colaft.server import element_losses
from colaft.trainer import TrainerLike
from colaft.users import FitConfig, optimizer_and_schedule

METHODS = ("full", "lora", "adalora", "ia3", "prompt", "prefix", "ptuning")
"""Backprop methods: full fine-tuning and PEFT's LoRA, AdaLoRA, IA3, prompt, prefix and P-tuning."""

TASK_TYPES = {"sc": "SEQ_CLS", "clm": "CAUSAL_LM", "s2s": "SEQ_2_SEQ_LM"}
VIRTUAL_TOKENS = 20  # prompt, prefix and P-tuning (PEFT's examples use 20 or 30)


def peft_config(method: str, task: str, targets: list[str] | str, rank: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, steps: int = 100, hidden: int = 128):
    """The PEFT config of `method` for task `task`, on ColA's `targets` where the method takes targets.

    AdaLoRA starts at rank 1.5 x `rank` and prunes to `rank` between 10% and 80% of the
    `steps`; IA3 uses PEFT's per-architecture default modules (it scales keys, values and the
    feed-forward input, not arbitrary layers); P-tuning's prompt encoder is an MLP of `hidden`.
    """
    import peft

    if task not in TASK_TYPES:
        raise ValueError(f"PEFT methods run on the tasks {', '.join(TASK_TYPES)}, not {task!r}")
    common = {"task_type": TASK_TYPES[task]}
    if method == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, **common)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=rank + rank // 2, target_r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                  target_modules=targets, total_step=steps, tinit=steps // 10,
                                  tfinal=steps // 5, deltaT=max(1, steps // 20), **common)
    if method == "ia3":
        return peft.IA3Config(**common)
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, **common)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, **common)
    if method == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=hidden, **common)
    raise ValueError(f"unknown method {method!r}; methods: cola, {', '.join(METHODS)}")


class Backprop(nn.Module):
    """A model trained by backprop, called like a ColaModel: `forward(**batch, users=None)`,
    `generate(..., users=None)`, and `.model`, the transformers model (for its config).

    Prompt and P-tuning prepend virtual tokens: their causal-LM logits are cut back to the
    input's positions, so losses and metrics line up with the batch's labels.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model

    @staticmethod
    def _single_user(users: Sequence[str] | None) -> None:
        if users is not None and len(set(users)) > 1:
            raise ValueError("backprop baselines train one model: rows of several users need ColA")

    def forward(self, users: Sequence[str] | None = None, **batch):
        self._single_user(users)
        out = self.net(**batch)
        length = batch["input_ids"].shape[1] if "input_ids" in batch else None
        if length is not None and out.logits.dim() == 3 and out.logits.shape[1] > length:
            out.logits = out.logits[:, -length:]  # the virtual tokens come first
        return out

    def generate(self, users: Sequence[str] | None = None, **kwargs):
        self._single_user(users)
        return self.net.generate(**kwargs)

    def save_pretrained(self, folder) -> None:
        """PEFT's adapter folder; full fine-tuning: the whole model (safetensors)."""
        self.net.save_pretrained(folder)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)


def build(method: str, model: nn.Module, task: str, targets: list[str] | str, rank: int = 8, alpha: float = 16.0,
          dropout: float = 0.0, steps: int = 100, hidden: int = 128) -> Backprop:
    """`model` made trainable by `method`: every weight ("full") or a PEFT method's."""
    if method == "full":
        return Backprop(model.requires_grad_(True))
    import peft

    config = peft_config(method, task, targets, rank, alpha, dropout, steps, hidden)
    return Backprop(peft.get_peft_model(model, config))


class BackpropTrainer(TrainerLike):
    """Trains a Backprop model by autograd, as a TrainerLike (the loop drives it as it drives ColA's Trainer).

    The optimizer and learning-rate schedule come from the same FitConfig a ColA owner
    builds them from, so that both sides of a comparison step alike.
    """

    def __init__(self, model: Backprop, **fit):
        self.model = model
        self.fit_config = FitConfig(**fit)
        self.optimizer, self.scheduler = optimizer_and_schedule(
            [p for p in model.net.parameters() if p.requires_grad], self.fit_config)
        self._adalora = type(getattr(model.net, "base_model", None)).__name__ == "AdaLoraModel"
        self.stats = {"steps": 0, "version": 0, "skipped_fits": 0, "packet_bytes": 0, "packet_bytes_total": 0}
        self.last_user_losses: dict[str, float] = {}

    def step(self, batch: Mapping, users: Sequence[str] | None = None) -> float:
        self.model.train()
        batch = dict(batch)
        users = users or batch.pop("users", None)
        out = self.model(**batch, users=users)
        out.loss.backward()
        loss = out.loss.item()
        if self._adalora:  # its loss holds an orthogonality penalty: report the task's loss, as the others do
            with torch.no_grad():
                losses, weights = element_losses(self.model.model, out, batch)
                loss = ((losses * weights).sum() / weights.sum()).item()
        self.optimizer.step()
        self.scheduler.step()
        self.stats["steps"] = self.stats["version"] = self.stats["steps"] + 1
        if self._adalora:  # AdaLoRA reallocates its ranks from this step's gradients
            self.model.net.base_model.update_and_allocate(self.stats["steps"])
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def flush(self, users: list[str] | None = None) -> None:
        """Nothing is pending: every step updates the weights."""

    def trainable_parameters(self) -> int:
        return self.model.trainable_parameters()

    def close(self, wait: bool = True) -> None:
        """No workers to stop."""
