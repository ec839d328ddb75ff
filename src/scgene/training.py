"""Training helpers on top of the Hugging Face `Trainer`.

`ScGeneTrainer` logs each pretraining objective apart (`value_loss`, `bin_loss`, `contrastive_loss`, averaged over
the steps since the last log and over processes) next to the combined `loss`, so a recipe's parts can be watched.
"""

from __future__ import annotations

import torch
from transformers import Trainer

LOSS_COMPONENTS = ("value_loss", "bin_loss", "contrastive_loss")


class ScGeneTrainer(Trainer):
    """A `Trainer` that also logs the loss components an ScGene model returns (see `LOSS_COMPONENTS`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_COMPONENTS:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    total = self._component_sums.get(name, torch.zeros((), device=value.device))
                    self._component_sums[name] = total + value.detach().float()
            self._component_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps:  # a training log: called on every process, so reduce is safe
            for name, total in sorted(self._component_sums.items()):
                logs[name] = round(self.accelerator.reduce(total, "mean").item() / self._component_steps, 4)
            self._component_sums, self._component_steps = {}, 0
        super().log(logs, start_time)


__all__ = ["LOSS_COMPONENTS", "ScGeneTrainer"]
