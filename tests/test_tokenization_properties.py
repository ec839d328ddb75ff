"""Property-based tests of the tokenizer (hypothesis): over random sparse or dense matrices, dtypes, gene lists and
settings, it returns the documented batch or raises a ValueError that says what is wrong; never anything else."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scgene.tokenization_scgene import ScGeneTokenizer

VOCABULARY_GENES = [f"GENE{index}" for index in range(30)]
TOKENIZER = ScGeneTokenizer.from_gene_list(VOCABULARY_GENES, n_bins=7)


@st.composite
def cells(draw):
    """An AnnData of 0-12 cells over distinct genes, most from the vocabulary, some unknown; counts or log1p values
    in one of several storage types and dtypes."""
    known = draw(st.lists(st.sampled_from(VOCABULARY_GENES), min_size=1, max_size=20, unique=True))
    unknown = [f"UNKNOWN{index}" for index in range(draw(st.integers(0, 4)))]
    genes = draw(st.permutations(known + unknown))
    n_cells = draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = rng.poisson(draw(st.sampled_from([0.05, 0.5, 3.0, 40.0])), size=(n_cells, len(genes))).astype(np.float64)
    if draw(st.booleans()):  # log1p-normalised input instead of counts
        totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
        counts = np.log1p(counts / totals * 1e4)
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.int64]))
    if np.issubdtype(dtype, np.integer):
        counts = np.round(counts)
    matrix = counts.astype(dtype)
    storage = draw(st.sampled_from(["dense", "csr", "csc"]))
    matrix = {"dense": matrix, "csr": sp.csr_matrix(matrix), "csc": sp.csc_matrix(matrix)}[storage]
    return ad.AnnData(matrix, var=pd.DataFrame(index=genes))


encode_settings = st.fixed_dictionaries({}, optional={
    "gene_selection": st.sampled_from(["nonzero", "top_k", "all"]),
    "max_length": st.integers(1, 40),
    "top_k": st.integers(1, 30),
    "truncation": st.booleans(),
    "padding": st.sampled_from(["longest", "max_length", True]),
    "pad_to_multiple_of": st.integers(1, 8),
    "chunk_size": st.integers(1, 7),
    "seed": st.integers(0, 10),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adata=cells(), options=encode_settings)
def test_the_tokenizer_returns_the_documented_batch_or_a_value_error(adata, options):
    try:
        batch = TOKENIZER(adata, return_tensors="np", **options)
    except ValueError as error:
        assert str(error)  # a message that says what is wrong
        return
    ids, values, bins, mask = (batch[name] for name in ("input_ids", "expression_values", "expression_bins",
                                                        "attention_mask"))
    assert ids.shape == values.shape == bins.shape == mask.shape and ids.shape[0] == adata.n_obs
    assert ids.dtype == np.int64 and values.dtype == np.float32 and bins.dtype == np.int64
    width = ids.shape[1]
    assert width % options.get("pad_to_multiple_of", 1) == 0
    lengths = mask.sum(axis=1)
    max_length = options.get("max_length", TOKENIZER.max_length)
    if options.get("truncation", True) and max_length is not None and adata.n_obs:
        assert lengths.max() <= max_length
    if adata.n_obs:
        assert (ids[:, 0] == TOKENIZER.cls_token_id).all() and (lengths >= 1).all()
    real = mask.astype(bool)
    assert ((ids[real] >= 3) | (ids[real] == TOKENIZER.cls_token_id)).all() and (ids[real] < TOKENIZER.vocab_size).all()
    assert (ids[~real] == TOKENIZER.pad_token_id).all() and (values[~real] == 0).all() and (bins[~real] == 0).all()
    assert np.isfinite(values).all() and (values >= 0).all()
    assert ((bins >= 0) & (bins < TOKENIZER.n_bins)).all()
    for row in range(adata.n_obs):  # no gene twice in a cell
        genes = ids[row, 1 : lengths[row]]
        assert len(np.unique(genes)) == len(genes)


@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.int16])
def test_small_dtypes_are_read_like_float32(dtype):
    counts = np.array([[0, 3, 1, 7], [2, 0, 0, 1]], dtype=dtype)
    genes = VOCABULARY_GENES[:4]
    expected = TOKENIZER(ad.AnnData(counts.astype(np.float32), var=pd.DataFrame(index=genes)), return_tensors="np")
    batch = TOKENIZER(ad.AnnData(counts, var=pd.DataFrame(index=genes)), return_tensors="np")
    for name in expected:
        np.testing.assert_array_equal(batch[name], expected[name])
