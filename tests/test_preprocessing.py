"""preprocess(): QC with the mitochondrial fraction, filtering, normalize_total + log1p, input checks."""

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scgene.preprocessing import mito_mask, preprocess

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def pbmc():
    return ad.read_h5ad(DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")[:200].copy()


def toy():
    """4 cells x 4 genes; cell 0 is 50% mitochondrial, cell 3 is empty."""
    counts = np.array([[5, 5, 0, 0], [1, 3, 4, 2], [0, 1, 6, 3], [0, 0, 0, 0]], dtype=np.float32)
    return ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=["MT-CO1", "GAPDH", "CD3E", "ACTB"]))


def test_matches_scanpy_normalize_total_and_log1p(pbmc):
    out = preprocess(pbmc, target_sum=1e4)
    expected = pbmc.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected)
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    np.testing.assert_allclose(out.X.toarray(), expected.X.toarray(), rtol=1e-5)
    assert {"total_counts", "n_genes_by_counts", "pct_counts_mt"} <= set(out.obs.columns)
    np.testing.assert_allclose(out.obs["total_counts"], np.asarray(pbmc.X.sum(axis=1)).ravel(), rtol=1e-6)


def test_input_is_never_modified(pbmc):
    adata = pbmc.copy()
    before_x, before_obs, before_var = adata.X.copy(), adata.obs.copy(), adata.var.copy()
    preprocess(adata, max_mito_fraction=0.05, min_counts=1)
    assert (adata.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    pd.testing.assert_frame_equal(adata.var, before_var)
    assert "log1p" not in adata.uns


def test_mitochondrial_fraction_and_filtering():
    out = preprocess(toy())
    np.testing.assert_allclose(out.obs["pct_counts_mt"].to_numpy(), [50.0, 10.0, 0.0, 0.0])
    assert out.var["mt"].tolist() == [True, False, False, False]
    filtered = preprocess(toy(), max_mito_fraction=0.2)
    assert filtered.obs_names.tolist() == ["1", "2", "3"]
    both = preprocess(toy(), max_mito_fraction=0.2, min_counts=1)
    assert both.obs_names.tolist() == ["1", "2"]


def test_mito_genes_found_through_a_symbol_column():
    adata = toy()
    adata.var["symbol"] = adata.var_names
    adata.var_names = ["ENSG00000198804", "ENSG00000111640", "ENSG00000198851", "ENSG00000075624"]
    assert mito_mask(adata).tolist() == [True, False, False, False]
    mouse = toy()
    mouse.var_names = ["mt-Co1", "Gapdh", "Cd3e", "Actb"]
    assert mito_mask(mouse).tolist() == [True, False, False, False]
    # Ensembl ids alone (versioned): their symbols from the default human vocabulary
    del adata.var["symbol"]
    adata.var_names = [f"{name}.3" for name in adata.var_names]
    assert mito_mask(adata).tolist() == [True, False, False, False]
    np.testing.assert_allclose(preprocess(adata).obs["pct_counts_mt"].to_numpy(), [50.0, 10.0, 0.0, 0.0])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_mito_fraction": 20}, "max_mito_fraction is a fraction between 0 and 1"),
    ({"target_sum": 0}, "target_sum must be positive"),
    ({"gene_column": "symbol"}, "'symbol' is not a column of adata.var"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        preprocess(toy(), **kwargs)


def test_log_normalized_input_detected_not_normalized_twice(pbmc, caplog):
    once = preprocess(pbmc)
    with caplog.at_level(logging.WARNING):
        twice = preprocess(once)
    assert "log1p-normalised already" in caplog.text
    np.testing.assert_array_equal(twice.X.toarray(), once.X.toarray())
    stripped = once.copy()
    del stripped.uns["log1p"]  # detected from the values alone
    np.testing.assert_array_equal(preprocess(stripped).X.toarray(), once.X.toarray())
    assert preprocess(stripped).uns["scgene_preprocessing"]["input_was_log_normalized"]


@pytest.mark.parametrize("bad, message", [(-2.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
def test_negative_nan_inf_rejected(bad, message):
    adata = toy()
    adata.X = adata.X.toarray()
    adata.X[1, 1] = bad
    with pytest.raises(ValueError, match=message):
        preprocess(adata)


def test_no_cells_is_named(pbmc):
    with pytest.raises(ValueError, match=r"no cells \(n_obs == 0\): nothing to preprocess"):
        preprocess(pbmc[:0].copy())
