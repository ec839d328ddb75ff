"""Gene co-expression network: blockwise Pearson correlation on a sparse cells x genes matrix.

Seed 000 links two genes when their Pearson correlation across cells is at least 0.7. With ~20,000 genes the
full correlation matrix (3.2 GB in float64) and the dense expression matrix (8 GB for 50,000 cells) are both too
big, so the correlation is computed one gene block x gene block tile at a time,

    r_ab = cov(x_a, x_b) / (std_a * std_b),

with means and standard deviations from sparse column sums, and only edges that pass the threshold are kept.

Genes are ordered by detection rate before blocking, so a tile holds genes of similar sparsity, and each tile
uses the cheaper of two kernels: a sparse x sparse product `x_a . x_b / n - mean_a * mean_b` (work grows with
the product of the two blocks' densities) for tiles of rarely detected genes, or a float32 BLAS product of the
two blocks densified and centred (n x block values each, never all genes) for the others.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..fileio import atomic_path

SIGNS = ("both", "positive", "negative")
EDGE_COLUMNS = ["gene_a", "gene_b", "r"]
SPARSE_PRODUCT_MAX_DENSITY = 0.17 / 60


@dataclass
class CoexpressionInfo:
    """What the correlation step saw and kept, for the prior record."""

    n_cells: int
    n_cells_used: int
    n_genes: int
    n_genes_used: int
    zero_variance_genes: list[str] = field(default_factory=list)
    threshold: float = 0.7
    sign: str = "both"
    n_edges: int = 0
    n_positive_edges: int = 0
    n_negative_edges: int = 0
    block_size: int = 1024
    tile_genes: int = 1024
    max_cells: int | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-ready summary (the zero-variance gene list is truncated to its count plus 20 examples)."""
        data = dict(self.__dict__)
        data["n_zero_variance_genes"] = len(self.zero_variance_genes)
        data["zero_variance_genes"] = self.zero_variance_genes[:20]
        return data


class BlockwisePearson:
    """Pearson correlation between the columns (genes) of a sparse matrix, one tile of gene blocks at a time.

    A block holds `block_size` genes, or half of the genes with variance if that is fewer (`tile_genes`), so
    memory is O(cells x block + block^2) and never a dense cells x genes or a full genes x genes matrix.
    Genes with zero variance have no defined correlation and are skipped (`kept` lists the others). With
    `max_cells`, a seeded random subset of cells (rows) is used. The matrix is held once, as float32 CSC, so a
    gene block is a cheap column selection; sums and sparse products are taken in float64, dense tiles in
    float32 after centring (so no cancellation between large means).
    """

    def __init__(self, X, block_size: int = 1024, max_cells: int | None = None, seed: int = 0):
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}.")
        if not sp.issparse(X):
            X = sp.csr_matrix(np.asarray(X))
        if X.ndim != 2:
            raise ValueError(f"Expected a 2-D cells x genes matrix, got shape {X.shape}.")
        self.n_cells_total = X.shape[0]
        if max_cells is not None and max_cells < X.shape[0]:
            if max_cells < 2:
                raise ValueError(f"max_cells must be at least 2, got {max_cells}.")
            rows = np.sort(np.random.default_rng(seed).choice(X.shape[0], size=max_cells, replace=False))
            X = sp.csr_matrix(X)[rows]
        if X.shape[0] < 2:
            raise ValueError(f"Pearson correlation needs at least 2 cells, got {X.shape[0]}.")
        self.matrix = sp.csc_matrix(X, dtype=np.float32)
        if not np.all(np.isfinite(self.matrix.data)):
            raise ValueError("The expression matrix holds NaN or infinite values; clean or re-preprocess the data.")
        self.n_cells, self.n_genes = self.matrix.shape
        mean, var = self._column_moments(block_size)
        # A constant column can leave a rounding residue in var; compare it to the column's scale.
        self.kept = np.flatnonzero(var > 1e-10 * np.maximum(mean**2, np.finfo(np.float64).tiny))
        self.mean, self.std = mean, np.sqrt(var)
        self.detection = np.diff(self.matrix.indptr) / self.n_cells
        by_detection = self.kept[np.argsort(self.detection[self.kept], kind="stable")]
        # At most half the genes per block, so that no tile or dense block ever spans the whole gene panel.
        step = self.tile_genes = min(block_size, max(1, -(-len(by_detection) // 2)))
        self.blocks = [by_detection[s : s + step] for s in range(0, len(by_detection), step)]
        self.block_density = [float(self.detection[b].mean()) for b in self.blocks]

    def _column_moments(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Float64 column means and (population) variances, a chunk of columns at a time."""
        mean = np.zeros(self.n_genes)
        var = np.zeros(self.n_genes)
        for start in range(0, self.n_genes, chunk):
            part = self.matrix[:, start : start + chunk]
            total = np.asarray(part.sum(axis=0, dtype=np.float64)).ravel()
            squares = part.copy()
            squares.data = squares.data.astype(np.float64) ** 2
            mean[start : start + chunk] = total / self.n_cells
            var[start : start + chunk] = np.asarray(squares.sum(axis=0)).ravel() / self.n_cells
        var = np.maximum(var - mean**2, 0.0)
        return mean, var

    @property
    def block_pairs(self) -> list[tuple[int, int]]:
        """Upper-triangular tiles (block numbers, including the diagonal tiles), in a fixed order."""
        return [(a, b) for a in range(len(self.blocks)) for b in range(a, len(self.blocks))]

    def uses_sparse_product(self, a: int, b: int) -> bool:
        """Sparse x sparse work is ~n * b^2 * density_a * density_b at ~0.17 G multiply-adds/s (scipy, one
        core); dense work is n * b^2 at ~60 G/s (float32 BLAS, one core): sparse wins below a product of 0.0028."""
        return self.block_density[a] * self.block_density[b] < SPARSE_PRODUCT_MAX_DENSITY

    def _centred_block(self, cols: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """The cells x block dense float32 matrix of genes `cols`, centred in place (one n x block array)."""
        block = self.matrix[:, cols].toarray()
        block -= mean.astype(np.float32)
        return block

    def tile(self, a: int, b: int) -> np.ndarray:
        """Correlation of the genes of block `a` (rows) with those of block `b` (columns), as float64."""
        cols_a, cols_b = self.blocks[a], self.blocks[b]
        mean_a, mean_b = self.mean[cols_a], self.mean[cols_b]
        if self.uses_sparse_product(a, b):
            left = self.matrix[:, cols_a].astype(np.float64)
            right = self.matrix[:, cols_b].astype(np.float64).tocsr()
            cov = (left.T @ right).toarray() / self.n_cells - np.outer(mean_a, mean_b)
        else:
            left = self._centred_block(cols_a, mean_a)
            right = left if a == b else self._centred_block(cols_b, mean_b)
            cov = (left.T @ right).astype(np.float64) / self.n_cells
        r = cov / np.outer(self.std[cols_a], self.std[cols_b])
        return np.clip(r, -1.0, 1.0, out=r)

    def edges(
        self, threshold: float, sign: str = "both", progress: bool = True, n_jobs: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gene index pairs `(i, j)`, i < j (columns of the input, sorted), and `r`, for pairs passing the threshold.

        Tiles are computed by `n_jobs` threads (default: all cores; BLAS limited to one thread each); each thread
        thresholds its own tile, so only the surviving edges are ever collected.
        """
        check_threshold(threshold, sign)

        def tile_edges(pair: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a, b = pair
            r = self.tile(a, b)
            if sign == "both":
                hit = np.abs(r) >= threshold
            elif sign == "positive":
                hit = r >= threshold
            else:
                hit = r <= -threshold
            if a == b:
                hit = np.triu(hit, k=1)
            rows, cols = np.nonzero(hit)
            return self.blocks[a][rows], self.blocks[b][cols], r[rows, cols]

        n_jobs = n_jobs or os.cpu_count() or 1
        pairs = self.block_pairs
        parts = []
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n_jobs) as pool:
            for part in tqdm(pool.map(tile_edges, pairs), total=len(pairs), desc="co-expression", disable=not progress):
                parts.append(part)
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty.copy(), np.zeros(0, dtype=np.float64)
        first, second, r = (np.concatenate(column) for column in zip(*parts))
        i, j = np.minimum(first, second), np.maximum(first, second)
        order = np.lexsort((j, i))
        return i[order], j[order], r[order]


def check_threshold(threshold: float, sign: str) -> None:
    """Reject thresholds outside (0, 1] and unknown sign choices, naming the valid values."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (it is compared with |r|), got {threshold}.")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}.")


def coexpression_edges(
    X,
    genes,
    threshold: float = 0.7,
    sign: str = "both",
    block_size: int = 1024,
    max_cells: int | None = None,
    seed: int = 0,
    progress: bool = True,
    n_jobs: int | None = None,
) -> tuple[pd.DataFrame, CoexpressionInfo]:
    """Edge list `gene_a, gene_b, r` of gene pairs whose correlation passes the threshold, and a summary.

    `sign="both"` keeps `|r| >= threshold` with the sign of r; `"positive"` (seed 000) keeps `r >= threshold`;
    `"negative"` keeps `r <= -threshold`.
    """
    genes = np.asarray([str(g) for g in genes], dtype=object)
    if X.shape[1] != len(genes):
        raise ValueError(f"The matrix has {X.shape[1]} gene columns but {len(genes)} gene names were given.")
    names = pd.Index(genes)
    duplicated = names[names.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"Gene names must be unique to name the edges; {len(duplicated)} are duplicated, e.g. {duplicated[:5]}. "
            "Use unique ids (e.g. Ensembl ids in var_names instead of a symbol column), or aggregate or drop "
            "the duplicated genes first."
        )
    check_threshold(threshold, sign)
    pearson = BlockwisePearson(X, block_size=block_size, max_cells=max_cells, seed=seed)
    if len(pearson.kept) < 2:
        raise ValueError(
            f"Only {len(pearson.kept)} of {len(genes)} genes vary across the {pearson.n_cells} cells used, so there "
            "is no correlation to compute: check that the matrix holds expression values (not all zeros), or use "
            "more cells (--max-cells)."
        )
    i, j, r = pearson.edges(threshold, sign=sign, progress=progress, n_jobs=n_jobs)
    edges = pd.DataFrame({"gene_a": genes[i], "gene_b": genes[j], "r": r})
    zero_variance = np.setdiff1d(np.arange(len(genes)), pearson.kept)
    info = CoexpressionInfo(
        n_cells=pearson.n_cells_total,
        n_cells_used=pearson.n_cells,
        n_genes=len(genes),
        n_genes_used=len(pearson.kept),
        zero_variance_genes=[str(g) for g in genes[zero_variance]],
        threshold=threshold,
        sign=sign,
        n_edges=len(edges),
        n_positive_edges=int((r > 0).sum()),
        n_negative_edges=int((r < 0).sum()),
        block_size=block_size,
        tile_genes=pearson.tile_genes,
        max_cells=max_cells,
        seed=seed,
    )
    return edges, info


def write_edges(path, edges: pd.DataFrame) -> None:
    """Write the edge list as a TSV with a `gene_a, gene_b, r` header (r to 6 decimals), atomically."""
    with atomic_path(path) as tmp:
        edges[EDGE_COLUMNS].to_csv(tmp, sep="\t", index=False, float_format="%.6f")


def read_edges(path) -> pd.DataFrame:
    """Read an edge list written by `write_edges` (or any TSV with `gene_a, gene_b, r` columns)."""
    edges = pd.read_csv(path, sep="\t", dtype={"gene_a": str, "gene_b": str, "r": float}, keep_default_na=False)
    missing = [c for c in EDGE_COLUMNS if c not in edges.columns]
    if missing:
        raise ValueError(f"Edge list {path} lacks the column(s) {missing}; expected a TSV header {EDGE_COLUMNS}.")
    return edges
