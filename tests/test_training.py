"""scgene.training: the collator's epoch across passes and evaluations, and the guard against processes that would
train apart."""

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from distributed_helpers import launcher
from modeling_helpers import tiny_config, with_prior
from scgene import ScGeneForMaskedExpression, ScGeneTokenizer
from scgene.data import DataCollatorForMaskedExpression
from scgene.training import ScGeneTrainer, check_processes_train_together


class EpochRecordingCollator(DataCollatorForMaskedExpression):
    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def __call__(self, features):
        self.seen.append((self.epoch, len(features)))
        return super().__call__(features)


def cells(n_cells: int, tokenizer: ScGeneTokenizer) -> datasets.Dataset:
    """Cells of 8 genes each (vocabulary ids 3..), values 1..8."""
    ids = [[tokenizer.cls_token_id] + list(range(3 + cell % 4, 11 + cell % 4)) for cell in range(n_cells)]
    values = [[0.0] + [float(v) for v in range(1, 9)] for _ in range(n_cells)]
    return datasets.Dataset.from_dict({"input_ids": ids, "expression_values": values,
                                       "expression_bins": [[0] + [min(v, 5) for v in range(1, 9)]] * n_cells})


@pytest.mark.parametrize("stream", [False, True])
def test_the_collator_draws_each_pass_with_its_own_epoch_and_evaluates_with_one(tmp_path, stream):
    """3 passes over 8 cells in batches of 4: the collator sees epochs 0, 0, 1, 1, 2, 2, for a dataset and for a stream
    (whose epochs the Trainer counts in fractions of max_steps); every evaluation (batches of 3 cells) draws with
    epoch 0, during training and after it."""
    tokenizer = ScGeneTokenizer.from_gene_list([f"GENE{i}" for i in range(37)], n_bins=6)
    model = with_prior(ScGeneForMaskedExpression(tiny_config(expression_encoding="binned")))
    collator = EpochRecordingCollator(tokenizer, mask_value=model.config.mask_value, seed=0)
    train = cells(8, tokenizer)
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, eval_strategy="steps", eval_steps=3,
                             **({"max_steps": 6} if stream else {"num_train_epochs": 3}))
    trainer = ScGeneTrainer(model=model, args=args, train_dataset=train.to_iterable_dataset() if stream else train,
                            eval_dataset=cells(3, tokenizer), data_collator=collator)
    trainer.train()
    assert [epoch for epoch, size in collator.seen if size == 4] == [0, 0, 1, 1, 2, 2]
    assert [epoch for epoch, size in collator.seen if size == 3] == [0, 0]  # evaluations at steps 3 and 6
    trainer.evaluate()
    assert collator.seen[-1] == (0, 3) and collator.epoch == 3  # the training epoch is kept


def test_processes_that_would_train_apart_are_stopped(monkeypatch, tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    check_processes_train_together(args)  # one process: nothing to say
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="2 unsynchronised copies.*--use_cpu"):
        check_processes_train_together(args)


@pytest.mark.xdist_group("subprocess_heavy")  # rank 1 aborted (SIGABRT) when the transfer protocol ran beside it
def test_scgene_trains_sharded_with_fsdp2_on_cpu(tmp_path):
    """torch's FSDP2 (`fully_shard`, one unit per ScGene layer) over 2 CPU processes (gloo), 4 cells each: the full
    weights gathered from the shards equal those of 1 process trained whole on the same 8-cell batches. (Through
    accelerate / the Trainer, FSDP runs only on GPUs: accelerate 1.16 turns it on for GPU backends only.)"""
    script = Path(__file__).parent / "fsdp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded_run = subprocess.run([sys.executable, *launcher("torchrun"), str(script)], capture_output=True, text=True,
                                 timeout=300, env={**env, "FSDP_WEIGHTS": str(tmp_path / "fsdp.safetensors")})
    assert sharded_run.returncode == 0, sharded_run.stderr[-3000:]  # the ranks' own error, not only the exit status
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=300,
                   env={**env, "FSDP_WEIGHTS": str(tmp_path / "whole.safetensors")})
    sharded, whole = load_file(tmp_path / "fsdp.safetensors"), load_file(tmp_path / "whole.safetensors")
    assert sharded.keys() == whole.keys()
    initial = with_prior(ScGeneForMaskedExpression(tiny_config(expression_encoding="binned"))).state_dict()
    assert any(not torch.equal(whole[name], initial[name]) for name in whole)  # trained
    difference = max((sharded[name] - whole[name]).abs().max().item() for name in whole)
    print(f"FSDP2 (2 CPU processes) vs 1 process: max abs weight difference {difference:.2e}")
    assert difference < 1e-5


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    """Labels drawn from softmax(z) and logits 3z: the fitted temperature is about 3, and the calibration error of
    logits / T is below that of the raw logits."""
    from scgene.training import expected_calibration_error, fit_temperature

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20_000, 5, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=generator).squeeze(1)
    temperature = fit_temperature(true_logits * 3, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    assert expected_calibration_error(true_logits * 3 / temperature, labels) < 0.02
    assert expected_calibration_error(true_logits * 3, labels) > 0.1
    with pytest.raises(ValueError, match="one label per cell"):
        fit_temperature(true_logits[:10], labels[:5])
