"""Training helpers on top of the Hugging Face `Trainer`.

`ScGeneTrainer` logs each pretraining objective apart (`value_loss`, `bin_loss`, `contrastive_loss`,
`regulation_loss`, averaged over the steps since the last log and over processes) next to the combined `loss`, so a recipe's parts can be watched,
and tells a seeded collator the epoch (`CollatorEpochCallback`), so that masks are a function of (seed, epoch, cell)
and a resumed run draws what the uninterrupted one did; a resumed stream continues from the pass it was in.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.training_args import ParallelMode

LOSS_COMPONENTS = ("value_loss", "bin_loss", "contrastive_loss", "regulation_loss")


def fit_temperature(logits, labels) -> float:
    """The temperature T that minimises the negative log-likelihood of `softmax(logits / T)` on held-out cells
    (temperature scaling): the predicted labels stay the same, the confidences become calibrated. `logits`:
    (cells, classes); `labels`: class indices."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"fit_temperature needs (cells, classes) logits and one label per cell; got logits of shape "
                         f"{tuple(logits.shape)} and {len(labels)} labels.")
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def negative_log_likelihood():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(negative_log_likelihood)
    return float(log_temperature.detach().exp())


def expected_calibration_error(logits, labels, n_bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the share of cells in each bin."""
    probabilities = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
    confidence, correct = probabilities.max(-1), probabilities.argmax(-1) == np.asarray(labels)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    return float(sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                     for b in np.unique(bins)))


def check_processes_train_together(args) -> None:
    """Stop when several processes were launched but would each train a copy of its own: what happens on a machine
    without GPUs under `accelerate launch --multi_gpu` without `--use_cpu`, or with an FSDP / DeepSpeed config
    (accelerate shards only on GPU backends; on CPU such a run is either plain DDP or unsynchronised)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise SystemExit(
            f"{launched} processes were launched, but they would train {launched} unsynchronised copies of the model "
            f"(accelerate set up {args.distributed_state.distributed_type}). Without GPUs, pass --use_cpu "
            "(`accelerate launch --multi_gpu --num_processes N ... --use_cpu`, or torchrun): the processes then run "
            "DDP over gloo; FSDP and DeepSpeed configs need GPUs."
        )


class CollatorEpochCallback(TrainerCallback):
    """Keeps `collator.epoch` at the index of the pass over the data being drawn: at the start of training the
    checkpoint's (0 for a new run), then one more at each epoch's end. (Not `floor(state.epoch)` at each epoch's
    start: for a stream the Trainer counts epochs in fractions of max_steps, so that floor is not the pass.)"""

    def __init__(self, collator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.epoch = math.floor((state.epoch or 0) + 1e-9)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.collator.epoch += 1


class ScGeneTrainer(Trainer):
    """A `Trainer` that also logs the loss components an ScGene model returns (see `LOSS_COMPONENTS`) and keeps an
    epoch-aware collator (one with an `epoch` field, like `DataCollatorForMaskedExpression`) told the epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if hasattr(self.data_collator, "epoch"):
            self.add_callback(CollatorEpochCallback(self.data_collator))
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_steps = 0

    def _init_training_state(self, max_steps, *args, **kwargs) -> tuple[int, int]:
        """Where a resumed run starts: (epochs done, batches of the current epoch done). A stream has no length, so
        the Trainer counts a whole run as one epoch and, resumed past the first pass, would skip `global_step`
        batches of the first pass instead of continuing the current one; the checkpoint's epoch (passes done plus
        the current pass's batches / max_steps, as the Trainer counts it for a stream) says where the stream was."""
        epochs_trained, batches_trained = super()._init_training_state(max_steps, *args, **kwargs)
        stream = isinstance(self.train_dataset, torch.utils.data.IterableDataset)
        if stream and self.state.global_step and not self.args.ignore_data_skip:
            epochs_trained = math.floor(self.state.epoch + 1e-9)
            batches_per_epoch = max_steps * self.args.gradient_accumulation_steps
            batches_trained = round((self.state.epoch - epochs_trained) * batches_per_epoch)
        return epochs_trained, batches_trained

    def evaluate(self, *args, **kwargs):
        """Every evaluation masks the same positions (the collator's epoch-0 draws), so evaluation losses compare
        across the run."""
        epoch = getattr(self.data_collator, "epoch", None)
        if epoch is None:
            return super().evaluate(*args, **kwargs)
        self.data_collator.epoch = 0
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator.epoch = epoch

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


__all__ = ["LOSS_COMPONENTS", "CollatorEpochCallback", "ScGeneTrainer", "check_processes_train_together"]
