"""ScGene with the rest of the ecosystem: Trainer steps, remote code without scgene, and an offline hub cache."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from hub_cache import populate_hub_cache
from modeling_helpers import random_cells, tiny_config, with_prior
from scgene import ScGeneForCellClassification, ScGeneForMaskedExpression

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixed_batch_dataset(cells: dict, **columns) -> Dataset:
    rows = {name: tensor.tolist() for name, tensor in {**cells, **columns}.items()}
    return Dataset.from_dict(rows).with_format("torch")


def train_and_log(model, dataset, tmp_path, steps=25, learning_rate=3e-3):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=len(dataset),
        max_steps=steps,
        learning_rate=learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_pretraining_loss_falls_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    model = with_prior(ScGeneForMaskedExpression(tiny_config(expression_encoding="binned")))
    cells = random_cells(8, 12, seed=11)
    labels = torch.full_like(cells["expression_values"], -100.0)
    bin_labels = torch.full_like(cells["expression_bins"], -100)
    masked = torch.zeros_like(labels, dtype=torch.bool)
    masked[:, 2:6] = True
    labels[masked] = cells["expression_values"][masked]
    bin_labels[masked] = cells["expression_bins"][masked]
    cells["expression_values"] = cells["expression_values"].masked_fill(masked, model.config.mask_value)
    cells["expression_bins"] = cells["expression_bins"].masked_fill(masked, model.config.n_bins)

    losses = train_and_log(model, fixed_batch_dataset(cells, labels=labels, bin_labels=bin_labels), tmp_path)
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_trainer_classification_loss_falls_on_a_fixed_batch(tmp_path, freeze_backbone):
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, freeze_backbone=freeze_backbone, pooling="mean")
    model = with_prior(ScGeneForCellClassification(config))
    frozen_before = {n: p.clone() for n, p in model.scgene.named_parameters()}
    cells = random_cells(9, 10, seed=12, add_cls=False)
    labels = torch.arange(9) % 3

    losses = train_and_log(model, fixed_batch_dataset(cells, labels=labels), tmp_path, steps=30, learning_rate=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    backbone_moved = any(not torch.equal(p, frozen_before[n]) for n, p in model.scgene.named_parameters())
    assert backbone_moved is not freeze_backbone


def run_python(code: str, env_overrides: dict | None = None, cwd: Path | None = None) -> str:
    env = {**os.environ, **(env_overrides or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def saved_reference(tmp_path: Path):
    """A saved dual-branch pretraining checkpoint, a fixed batch and its outputs."""
    model = with_prior(ScGeneForMaskedExpression(tiny_config(encoder_type="dual_branch", attention_type="mla"))).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    cells = random_cells(2, 6, seed=13)
    torch.save(cells, tmp_path / "cells.pt")
    with torch.no_grad():
        torch.save(model(**cells).predicted_values, tmp_path / "expected.pt")
    return checkpoint


def test_checkpoint_loads_with_remote_code_where_scgene_is_not_installed(tmp_path):
    checkpoint = saved_reference(tmp_path)
    assert {"modeling_scgene.py", "configuration_scgene.py", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_scgene.ScGeneModel"
    output = run_python(
        f"""
        import sys
        sys.modules["scgene"] = None  # scgene cannot be imported in this process
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained(r"{checkpoint}", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        cells = torch.load(r"{tmp_path / 'cells.pt'}", weights_only=True)
        with torch.no_grad():
            predicted = model(**cells).predicted_values
        torch.testing.assert_close(predicted, torch.load(r"{tmp_path / 'expected.pt'}", weights_only=True), atol=1e-6, rtol=0)
        base = AutoModel.from_pretrained(r"{checkpoint}", trust_remote_code=True)
        print(type(base).__name__, float(base.get_gene_prior().abs().sum()) > 0)
        """,
        cwd=tmp_path,
    )
    assert output.split() == ["ScGeneModel", "True"]


def test_auto_model_loads_org_repo_from_an_offline_hub_cache(tmp_path):
    checkpoint = saved_reference(tmp_path)
    populate_hub_cache(tmp_path / "hub", "org/scgene", {file.name: file.read_bytes() for file in checkpoint.iterdir()})
    output = run_python(
        f"""
        import torch, scgene
        from transformers import AutoModel, AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained("org/scgene").eval()
        cells = torch.load(r"{tmp_path / 'cells.pt'}", weights_only=True)
        with torch.no_grad():
            predicted = model(**cells).predicted_values
        torch.testing.assert_close(predicted, torch.load(r"{tmp_path / 'expected.pt'}", weights_only=True), atol=1e-6, rtol=0)
        print(type(AutoModel.from_pretrained("org/scgene")).__name__)
        """,
        env_overrides={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")},
        cwd=tmp_path,
    )
    assert output.split() == ["ScGeneModel"]
