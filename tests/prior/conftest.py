"""Shared fixtures for the prior tests: the small real PBMC subset, preprocessed once per session."""

from pathlib import Path

import anndata
import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "prior"


@pytest.fixture(scope="session")
def pbmc_h5ad() -> Path:
    return DATA / "pbmc3k_200genes_counts.h5ad"


@pytest.fixture(scope="session")
def pbmc():
    """2,638 PBMCs x 200 genes, normalize_total + log1p (the tokenizer's preprocessing)."""
    from scgene.preprocessing import preprocess

    return preprocess(anndata.read_h5ad(DATA / "pbmc3k_200genes_counts.h5ad"))


@pytest.fixture(scope="session")
def knowledge_csv() -> Path:
    return DATA / "knowledge_30genes.csv"
