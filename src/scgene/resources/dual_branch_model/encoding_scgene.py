"""The array kernels behind `ScGeneTokenizer`: input checks, CSR helpers, per-row ranking and quantile bins.

Everything works on the flat CSR arrays of one chunk of cells. The per-cell ranking that both the quantile
bins and the top-k selection need is one row-wise sort of packed integer keys (quantised value, position in
the row), which numpy sorts with SIMD.

Shipped with checkpoints as Hub code next to `tokenization_scgene.py` (which imports it relatively):
standard library and numpy at module level only; scipy inside a `try` block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

try:
    import scipy.sparse as sp
except ImportError:  # only needed to tokenize
    sp = None

# log1p values are ranked on a fixed grid of 1/4096 (about 0.02% in count ratio), so ranks and ties do
# not depend on how cells are chunked; values above 16 (unreachable after normalize_total) share the top.
QUANT_SCALE, QUANT_MAX = 4096.0, 65534
# no gene has this many counts in one cell: larger values are corrupt or scaled input
MAX_PLAUSIBLE_VALUE = 1e9

logger = logging.getLogger(__name__)


def check_expression_values(data: np.ndarray) -> None:
    """Raise a clear error for NaN, infinite, negative or implausibly large expression values (scaled or corrupt input)."""
    if data.size == 0:
        return
    low, high = data.min(), data.max()  # NaN propagates through min, inf shows in max
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            "The expression matrix contains NaN or infinite values. Pass raw counts (or log1p-normalised "
            "counts); remove or impute the broken entries first."
        )
    if low < 0:
        raise ValueError(
            "The expression matrix contains negative values, so it looks scaled or batch-corrected. Pass raw "
            "counts (e.g. `adata.layers['counts']` or `adata.raw`) or log1p-normalised counts."
        )
    if high > MAX_PLAUSIBLE_VALUE:
        raise ValueError(
            f"The expression matrix holds values up to {high:.3g}, more than any gene's counts in one cell: the "
            "input looks corrupt or wrongly scaled. Pass raw counts or log1p-normalised counts."
        )


def is_log_normalized(data: np.ndarray, marked_log1p: bool = False) -> bool:
    """Whether expression values are log1p-normalised (True) or counts (False), decided from the values:
    integers are counts (a leftover `uns['log1p']`, `marked_log1p`, is then ignored with a warning); non-integer
    values below 30 are log1p; non-integer values that all lie in [0, 1] are neither (min-max scaled, fractions):
    an error. Non-integer values from 30 up (e.g. CPM) are normalised counts."""
    if data.size == 0:
        return marked_log1p
    if np.array_equal(data, np.round(data)):
        if marked_log1p:
            logger.warning("adata.uns['log1p'] is set, but X holds integer counts: they are used as raw counts "
                           "(normalised and log1p-transformed here). Delete uns['log1p'] to silence this.")
        return False
    high = float(data.max())
    if high <= 1.0:
        raise ValueError(
            f"The expression values are non-integers between 0 and {high:.3g}: they look min-max scaled or like "
            "fractions, neither raw counts nor log1p-normalised counts (log1p of counts normalised to 1e4 per cell "
            "reaches well above 1). Pass raw counts (e.g. adata.layers['counts'] or adata.raw) or log1p(normalize_total)."
        )
    return high < 30


LOG2_CONSTANT_SPREAD = 1e-3  # relative spread of per-cell sums below which they are one normalize_total target


def is_log2_scaled(matrix) -> bool:
    """Whether log-normalised values are log2(x + 1) rather than natural log1p: the cells' 2**v - 1 sum to one
    constant (normalize_total's target) and their e**v - 1 do not. False where neither does (a gene subset
    normalised over more genes), as it cannot be told then."""
    matrix = to_csr(matrix)
    if matrix.shape[0] < 2 or matrix.nnz == 0:
        return False
    values = matrix.data.astype(np.float64)

    def spread(linear: np.ndarray) -> float:
        sums = sp.csr_matrix((linear, matrix.indices, matrix.indptr), shape=matrix.shape) @ np.ones(matrix.shape[1])
        sums = sums[sums > 0]
        return float(sums.std() / sums.mean()) if len(sums) > 1 else np.inf

    return spread(np.exp2(values) - 1) < LOG2_CONSTANT_SPREAD < spread(np.expm1(values))


@dataclass
class EncodedChunk:
    """Cells `start:start + len(lengths)`, concatenated without padding: cell i has the next `lengths[i]` tokens.

    Compact dtypes (int32 ids, float32 values, int16 bins); `pad_chunks` widens ids and bins to int64.
    """

    start: int
    input_ids: np.ndarray
    expression_values: np.ndarray
    expression_bins: np.ndarray
    lengths: np.ndarray
    total_counts: np.ndarray | None = None  # (cells,) raw counts over all input genes; NaN for log1p input


class RowRanking:
    """The entries of each CSR row ordered by ascending key (< 65535), ties by descending column position.

    One row-wise sort of a padded table of packed integers `key << 16 | (65535 - position)` (padding key
    65535 sorts last): numpy sorts uint32 rows with SIMD, far faster than an argsort. The valid part of the
    sorted table, read row by row, lines up with the CSR data. Rows over 65,535 entries use uint64.
    """

    def __init__(self, indptr: np.ndarray, keys: np.ndarray):
        self.indptr, self.lengths = indptr, np.diff(indptr)
        n_rows, width = len(self.lengths), int(self.lengths.max()) if len(self.lengths) else 0
        self.dtype, self.shift = (np.uint64, 32) if width >= 1 << 16 else (np.uint32, 16)
        low = self.dtype((1 << self.shift) - 1)
        self.column = np.arange(width, dtype=np.int32)[None, :]
        self.valid = self.column < self.lengths[:, None]
        table = np.full((n_rows, width), QUANT_MAX + 1, dtype=self.dtype)
        table[self.valid] = keys
        table <<= self.dtype(self.shift)
        table |= low - self.column.astype(self.dtype)
        table.sort(axis=1)
        self.table = table
        position = table[self.valid]
        position &= low
        np.subtract(low, position, out=position)
        # order[k]: CSR index of the k-th entry in (row, ascending key) order (chunks stay below 2**31 entries)
        self.order = position.view(np.int32 if self.dtype == np.uint32 else np.int64)
        self.order += np.repeat(indptr[:-1].astype(self.order.dtype), self.lengths)

    def quantile_bins(self, n_bins: int) -> np.ndarray:
        """Per-row quantile bins 1..n_bins-1: 1 + floor((n_bins - 1) * share of the row strictly below).

        Tied keys share the bin of their group (the rank of its first entry), so bins never decrease with
        the value. Integer quotients below 2**24 are exact in float32, so the floor is exact.
        """
        keys = self.table >> self.dtype(self.shift)
        group_start = np.ones(keys.shape, bool)
        np.not_equal(keys[:, 1:], keys[:, :-1], out=group_start[:, 1:])
        starts = np.flatnonzero(group_start)
        width = max(keys.shape[1], 1)
        float_type = np.float32 if (n_bins - 1) * width < 1 << 24 else np.float64
        below = (starts % width).astype(float_type) * float_type(n_bins - 1)
        table_bins = np.repeat(below, np.diff(np.append(starts, group_start.size))).reshape(keys.shape)
        table_bins /= np.maximum(self.lengths, 1)[:, None].astype(float_type)
        bins = np.empty(len(self.order), np.int16)
        bins[self.order] = table_bins[self.valid]
        bins += 1
        return bins

    def top(self, limit: int) -> np.ndarray:
        """Flat mask of the `limit` highest-key entries of each row (all entries of shorter rows)."""
        keep = np.ones(len(self.order), bool)
        long_rows = np.flatnonzero(self.lengths > limit)
        n_dropped = self.lengths[long_rows] - limit  # the lowest entries, first in each sorted row
        first = np.repeat(self.indptr[long_rows] - np.cumsum(n_dropped) + n_dropped, n_dropped)
        keep[self.order[first + np.arange(n_dropped.sum())]] = False
        return keep


def log1p_scaled(data: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log(1 + data * scale) in place on the scale buffer; float32 log is SIMD, 3x faster than log1p."""
    scale *= data
    scale += np.float32(1)
    return np.log(scale, out=scale)


def drop_entries(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, keep: np.ndarray):
    """CSR arrays without the entries where `keep` is false."""
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    return kept_before[indptr], indices[keep], data[keep]


def insert_at(is_data: np.ndarray, data: np.ndarray, fill) -> np.ndarray:
    """A flat array with `data` where `is_data` is true and `fill` elsewhere."""
    out = np.full(len(is_data), fill, dtype=data.dtype)
    out[is_data] = data
    return out


def pad_chunks(chunks, n_rows: int, min_width: int, multiple: int, attention_mask: bool = True) -> dict:
    """`EncodedChunk`s covering `n_rows` cells -> (n_rows, width) int64 `input_ids`, float32 `expression_values`,
    int64 `expression_bins` and `attention_mask` (if asked), padded with zeros (the `<pad>` id, value 0, bin 0).

    `width` is the longest row, at least `min_width`, rounded up to a multiple of `multiple`. Each chunk is padded
    as it arrives, while the encoding threads work on the next ones: one boolean-mask assignment per array into its
    block of rows of zeroed memory, far faster than scattering every token by row and column. A longer chunk widens
    the arrays (a copy of the rows done so far).
    """
    dtypes = {"input_ids": np.int64, "expression_values": np.float32, "expression_bins": np.int64}
    if attention_mask:
        dtypes["attention_mask"] = np.int64
    width = -(-min_width // multiple) * multiple
    batch = {name: np.zeros((n_rows, width), dtype) for name, dtype in dtypes.items()}
    for chunk in chunks:
        rows = slice(chunk.start, chunk.start + len(chunk.lengths))
        longest = int(chunk.lengths.max(initial=0))
        if longest > width:
            width, narrow = -(-longest // multiple) * multiple, batch
            batch = {name: np.zeros((n_rows, width), dtype) for name, dtype in dtypes.items()}
            for name, array in narrow.items():
                batch[name][: rows.start, : array.shape[1]] = array[: rows.start]
        is_token = np.arange(width) < chunk.lengths[:, None]
        for name, array in batch.items():
            array[rows][is_token] = 1 if name == "attention_mask" else getattr(chunk, name)
    return batch


def to_csr(matrix):
    """Any chunk of an AnnData X (dense, CSR, CSC, sparse array) -> scipy CSR with sorted column indices,
    so ties are broken by input column order whatever the storage order."""
    if not sp.issparse(matrix) and np.asarray(matrix).dtype == np.float16:  # scipy.sparse has no float16
        matrix = np.asarray(matrix, dtype=np.float32)
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) or matrix.format != "csr" else matrix
    return matrix if matrix.has_sorted_indices else matrix.sorted_indices()
