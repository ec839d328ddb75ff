"""Test configuration: everything offline, helpers importable from the tests folder, shared fixtures."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import anndata as ad  # noqa: E402
import pytest  # noqa: E402

from scgene.tokenization_scgene import ScGeneTokenizer  # noqa: E402

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"


@pytest.fixture(scope="module")
def tokenizer():
    """The default human-vocabulary tokenizer."""
    return ScGeneTokenizer()


@pytest.fixture(scope="module")
def pbmc():
    """300 real PBMC 3k cells, raw counts, gene symbols, `obs.cell_type`."""
    return ad.read_h5ad(PBMC)[:300].copy()

# stand-ins imported by transformers' common tests (tests/test_transformers_common.py), not tests themselves
collect_ignore = ["transformers_common_shims"]
