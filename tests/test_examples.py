"""The Trainer example scripts run end to end on real data: single process, and two-process DDP via torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scgene import ScGeneTokenizer
from scgene.data import export_dataset

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "tests" / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
TINY_MODEL = ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "32"]
COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """300 PBMC 3k cells tokenized with a vocabulary of their genes, and a random prior for it."""
    folder = tmp_path_factory.mktemp("examples")
    cells = anndata.read_h5ad(PBMC)[:300].copy()
    tokenizer = ScGeneTokenizer.from_anndata(cells, max_length=128)
    export_dataset(cells, folder / "tokenized", tokenizer, obs_columns=["cell_type"])
    prior = torch.from_numpy(np.random.default_rng(0).normal(size=(tokenizer.vocab_size, 16)).astype(np.float32))
    prior[:3] = 0
    save_file({"gene_prior": prior}, folder / "gene_prior.safetensors")
    return folder


def run(command: list, env: dict | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_pretrain_then_finetune_scripts(tokenized):
    pretrained = tokenized / "pretrained"
    output = run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py",
                  "--dataset", tokenized / "tokenized", "--prior", tokenized / "gene_prior.safetensors",
                  "--output_dir", pretrained, "--max_steps", "4", "--per_device_train_batch_size", "8",
                  "--pooling", "mean", *TINY_MODEL, *COMMON])
    assert "masked-expression eval loss" in output
    assert {"model.safetensors", "config.json", "modeling_scgene.py", "vocab.json"} <= {p.name for p in pretrained.iterdir()}
    assert not (pretrained / "training_args.bin").exists()

    classifier = tokenized / "classifier"
    output = run([sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", pretrained,
                  "--dataset", tokenized / "tokenized", "--label_column", "cell_type", "--output_dir", classifier,
                  "--num_train_epochs", "2", "--per_device_train_batch_size", "32", *COMMON])
    results = json.loads((classifier / "cell_type_results.json").read_text())
    assert results["test_cells"] == 60 and len(results["labels"]) >= 5
    for model in ("scgene", "logistic_regression_baseline"):
        assert 0.0 <= results[model]["accuracy"] <= 1.0
    assert "logistic regression baseline" in output
    config = json.loads((classifier / "config.json").read_text())
    assert config["architectures"] == ["ScGeneForCellClassification"] and len(config["id2label"]) == len(results["labels"])


def test_pretraining_runs_as_two_process_ddp(tokenized):
    """torchrun with 2 CPU processes (gloo): the Trainer wraps the model in DDP with no code change."""
    output_dir = tokenized / "ddp"
    output = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tokenized / "tokenized",
         "--prior", tokenized / "gene_prior.safetensors", "--output_dir", output_dir, "--max_steps", "3",
         "--per_device_train_batch_size", "4", "--ddp_backend", "gloo", *TINY_MODEL, *COMMON],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert output.count("masked-expression eval loss") == 1  # printed by the main process only
    assert (output_dir / "model.safetensors").exists()
