"""Preprocessing per seed 000: QC metrics with the mitochondrial fraction, optional cell filtering,
`normalize_total` and `log1p`, on a copy of the user's AnnData.

`ScGeneTokenizer` normalises raw counts itself, chunk by chunk; use `preprocess` when cells must be
filtered first, or to inspect the QC metrics. Its output is marked (`uns["log1p"]`), so the tokenizer does
not normalise it a second time.
"""

from __future__ import annotations

import logging

import numpy as np
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

from .encoding_scgene import check_expression_values, is_log2_scaled, is_log_normalized
from .tokenization_scgene import ScGeneTokenizer
from .vocabulary_scgene import is_ensembl_id, is_text_column, strip_ensembl_version

logger = logging.getLogger(__name__)


def preprocess(
    adata: AnnData,
    *,
    target_sum: float = 1e4,
    max_mito_fraction: float | None = None,
    min_counts: float | None = None,
    mito_prefix: str = "MT-",
    gene_column: str | None = None,
    log_hint: str = "",
) -> AnnData:
    """Return a preprocessed copy of `adata` (CSR float32, log1p of counts normalised to `target_sum`).

    - QC: `obs` gets `total_counts`, `n_genes_by_counts` and `pct_counts_mt` (scanpy names); `var["mt"]`
      marks genes whose symbol starts with `mito_prefix` (any case, so mouse `mt-` too).
    - Filtering (optional): cells with a mitochondrial fraction above `max_mito_fraction` (0-1), and cells
      with fewer than `min_counts` total counts (`min_counts=1` drops empty cells).
    - Input that is already log-normalised is detected and only QC'd (warning, ending with `log_hint`: e.g. where
      the raw counts are), never normalised twice; log2(x + 1) input is converted to natural log1p.
    - NaN, infinite or negative values raise `ValueError`; the input AnnData is never modified.
    """
    if adata.n_obs == 0:
        raise ValueError("The AnnData has no cells (n_obs == 0): nothing to preprocess; pass a file with cells "
                         "(check the filters that made it).")
    if not target_sum > 0:
        raise ValueError(f"target_sum must be positive (counts per cell after normalize_total), got {target_sum}")
    if max_mito_fraction is not None and not 0 <= max_mito_fraction <= 1:
        raise ValueError(
            f"max_mito_fraction is a fraction between 0 and 1 (0.2 keeps cells with at most 20% mitochondrial "
            f"counts), got {max_mito_fraction}"
        )
    adata = adata.to_memory() if adata.isbacked else adata.copy()
    matrix = adata.X
    adata.X = sp.csr_matrix(matrix, dtype=np.float32) if not sp.issparse(matrix) else matrix.tocsr().astype(np.float32)
    check_expression_values(adata.X.data)
    already_log = is_log_normalized(adata.X.data, "log1p" in adata.uns)
    log2 = already_log and is_log2_scaled(adata.X)
    if log2:
        adata.X.data *= np.float32(np.log(2))  # a copy: log2(1 + x) -> ln(1 + x)
    if already_log:
        logger.warning(
            ("The input looks log2(x + 1)-normalised (its cells' 2^x - 1 sum to one constant): it is converted to "
             "natural log1p" if log2 else "The input looks log1p-normalised already (non-integer values below 30)")
            + ": it is not normalised again, and QC metrics are computed on the log values."
            + (f" {log_hint}" if log_hint else "")
        )

    adata.var["mt"] = mito_mask(adata, mito_prefix, gene_column)
    if not adata.var["mt"].any():
        logger.warning(f"No gene name starts with {mito_prefix!r}: the mitochondrial fraction is 0 for every cell.")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    adata.obs["pct_counts_mt"] = adata.obs["pct_counts_mt"].fillna(0.0)  # empty cells: 0, not NaN

    keep = np.ones(adata.n_obs, dtype=bool)
    if max_mito_fraction is not None:
        keep &= adata.obs["pct_counts_mt"].to_numpy() <= 100 * max_mito_fraction
    if min_counts is not None:
        keep &= adata.obs["total_counts"].to_numpy() >= min_counts
    if not keep.all():
        logger.info(f"Filtering removed {int((~keep).sum())} of {adata.n_obs} cells.")
        adata = adata[keep].copy()

    if not already_log:
        sc.pp.normalize_total(adata, target_sum=target_sum)
        sc.pp.log1p(adata)
    adata.uns["scgene_preprocessing"] = {
        "target_sum": target_sum,
        "max_mito_fraction": max_mito_fraction,
        "min_counts": min_counts,
        "input_was_log_normalized": bool(already_log),
        "input_was_log2": bool(log2),
    }
    return adata


def mito_mask(adata: AnnData, prefix: str = "MT-", gene_column: str | None = None) -> np.ndarray:
    """Mitochondrial genes by symbol prefix: from `gene_column`, else var_names, else the first string `var`
    column with any hit (Ensembl var_names usually come with a symbol column), else the symbols that the
    default human vocabulary gives Ensembl var_names."""
    prefix = prefix.lower()
    if gene_column is not None and gene_column not in adata.var.columns:
        raise KeyError(f"gene_column {gene_column!r} is not a column of adata.var (it has {list(adata.var.columns)}).")
    candidates = [adata.var[gene_column]] if gene_column is not None else [adata.var_names]
    if gene_column is None:
        candidates += [adata.var[c] for c in adata.var.columns if is_text_column(adata.var[c])]
    mask = np.zeros(adata.n_vars, dtype=bool)
    for names in candidates:
        mask = np.array([str(name).lower().startswith(prefix) for name in names], dtype=bool)
        if mask.any():
            return mask
    names = list(map(str, candidates[0]))
    if sum(map(is_ensembl_id, names)) > len(names) / 2:
        vocabulary = ScGeneTokenizer()
        symbol_of = dict(zip(vocabulary.ensembl_ids, vocabulary.symbols))
        symbols = [symbol_of.get(strip_ensembl_version(name), "") for name in names]
        mask = np.array([symbol.lower().startswith(prefix) for symbol in symbols], dtype=bool)
    return mask
