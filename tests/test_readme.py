"""The README's quickstart runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path):
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([100, 64])" in result.stdout
    assert (tmp_path / "scgene-tiny" / "model.safetensors").exists()


def test_readme_first_screen_inference_runs(tmp_path):
    """The three lines from cells to obsm / obs / UMAP: the shipped checkpoint embeds (nothing trained), a tiny
    classifier stands in for the one `make demo` fine-tunes; real PBMC cells."""
    import anndata as ad
    import torch

    from scgene import ScGeneConfig, ScGeneForCellClassification, ScGeneTokenizer

    first_screen = README.read_text().split("## Quickstart", 1)[0]
    code = re.search(r"```python\n(.*?)```", first_screen, re.S).group(1)
    tokenizer = ScGeneTokenizer(max_length=128)
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, pooling="mean", num_labels=2, id2label={0: "a", 1: "b"},
                          label2id={"a": 0, "b": 1})
    model = ScGeneForCellClassification(config)
    model.set_gene_prior(torch.randn(config.vocab_size, 16))
    model.save_pretrained(tmp_path / "outputs" / "demo" / "classifier")
    tokenizer.save_pretrained(tmp_path / "outputs" / "demo" / "classifier")
    pbmc = ad.read_h5ad(Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")
    pbmc[:60].write_h5ad(tmp_path / "cells.h5ad")
    pbmc[60:400].write_h5ad(tmp_path / "reference.h5ad")  # a labelled reference: other cells, obs["cell_type"]
    check = '\nassert adata.obsm["X_scgene"].shape == (60, 128) and "X_umap" in adata.obsm and "scgene_label" in adata.obs'
    check += '\nassert adata.uns["X_scgene"]["model"] == str(scgene.DEFAULT_CHECKPOINT)'
    check += '\nassert "scgene_label_distance" in adata.obs  # written by transfer_labels'
    result = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
