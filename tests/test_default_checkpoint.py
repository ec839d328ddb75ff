"""The checkpoint that ships with scgene (`scgene.DEFAULT_CHECKPOINT`): a Hub-layout folder, within its size budget,
trained on data it may ship, with current remote code; the default of `embed` / `evaluate` and the CLI; loadable
where scgene is not installed."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scgene
from scgene.cli import main

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
PACKAGE = Path(scgene.__file__).parent


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PBMC)[:80].copy()


SHIPPED = {"standard": scgene.DEFAULT_CHECKPOINT, "dual_branch": scgene.DEFAULT_REGULATION_CHECKPOINT}


@pytest.mark.parametrize("encoder_type", list(SHIPPED))
def test_the_default_checkpoint_is_a_hub_folder_within_budget_trained_on_shippable_data(encoder_type):
    folder = SHIPPED[encoder_type]
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "build_record.json",
            "training_genes.json", "modeling_scgene.py", "configuration_scgene.py", "tokenization_scgene.py"} <= files
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 25 * 2**20
    record = json.loads((folder / "build_record.json").read_text())
    assert record["corpus"] and not any("GPL" in row["licence"] for row in record["corpus"])
    assert record["steps"] > 0 and record["build_seconds"] > 0
    trained_on = {row["file"] for row in record["corpus"]}
    assert not any(name in trained_on for name in record["zero_shot"])  # scored only on sets it never saw
    config = json.loads((folder / "config.json").read_text())
    assert config["encoder_type"] == encoder_type and config["prior_readout_weight"] > 0
    assert config["architectures"] == ["ScGeneForMaskedExpression"]  # the masked-expression head ships too
    assert config["auto_map"]["AutoModel"] == "modeling_scgene.ScGeneModel"


@pytest.mark.parametrize("encoder_type", list(SHIPPED))
def test_the_shipped_remote_code_is_the_package_code(encoder_type):
    """The code a Hub user runs (trust_remote_code) is this package's: refresh it with
    `python scripts/build_default_checkpoint.py --refresh-only` when a module changes."""
    for code in SHIPPED[encoder_type].glob("*.py"):
        assert code.read_bytes() == (PACKAGE / code.name).read_bytes(), f"{code.name} differs from the package's"


def test_embed_and_evaluate_use_the_default_checkpoint_when_no_model_is_given(cells, tmp_path):
    explicit = scgene.embed(cells.copy(), scgene.DEFAULT_CHECKPOINT, progress=False)
    default = scgene.embed(cells, progress=False)
    np.testing.assert_array_equal(default, explicit)
    assert default.shape == (80, 128) and np.isfinite(default).all() and default.std(axis=0).mean() > 0
    assert cells.uns["X_scgene"]["model"] == str(scgene.DEFAULT_CHECKPOINT)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["embed", str(tmp_path / "cells.h5ad"), "--out", str(tmp_path / "out.h5ad")]) == 0
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_scgene"], explicit, atol=1e-6)
    with pytest.raises(ValueError, match="No cell-type annotator ships"):
        scgene.annotate(cells, progress=False)


def test_the_default_checkpoint_loads_and_embeds_where_scgene_is_not_importable(cells, tmp_path):
    tokenizer = scgene.ScGeneTokenizer.from_pretrained(scgene.DEFAULT_CHECKPOINT)
    inputs = tokenizer(cells[:8], return_tensors="pt")
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    expected = scgene.embed(cells[:8].copy(), progress=False)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["scgene"] = None  # scgene cannot be imported in this process
        import torch
        from transformers import AutoFeatureExtractor, AutoModel
        model = AutoModel.from_pretrained(r"{scgene.DEFAULT_CHECKPOINT}", trust_remote_code=True).eval()
        tokenizer = AutoFeatureExtractor.from_pretrained(r"{scgene.DEFAULT_CHECKPOINT}", trust_remote_code=True)
        assert tokenizer.vocab_size == model.config.vocab_size
        with torch.no_grad():
            pooled = model(**torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)).pooler_output
        torch.save(pooled, r"{tmp_path / 'pooled.pt'}")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(torch.load(tmp_path / "pooled.pt", weights_only=True).numpy(), expected, atol=1e-5)


def test_regulation_uses_the_shipped_dual_branch_checkpoint_when_no_model_is_given(cells):
    network = scgene.regulation(cells.copy(), regulators=scgene.transcription_factors(), top_k=5, progress=False)
    explicit = scgene.regulation(cells.copy(), scgene.DEFAULT_REGULATION_CHECKPOINT,
                                 regulators=scgene.transcription_factors(), top_k=5, progress=False)
    pd.testing.assert_frame_equal(network, explicit)
    assert len(network) > 0 and set(network["source"]) <= set(scgene.transcription_factors())
