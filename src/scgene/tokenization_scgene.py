"""ScGeneTokenizer: AnnData cells -> gene ids, log1p expression values and expression bins.

A `FeatureExtractionMixin`, not a `PreTrainedTokenizer`: the input is numbers (an expression matrix), not
text, which is the audio feature-extractor pattern (config in `preprocessor_config.json`, `BatchFeature`
out), so it registers with `AutoFeatureExtractor`. The gene vocabulary is saved next to the config in
`vocab.json`. This file ships with checkpoints as Hub code: standard library, numpy, torch and
transformers only at module level; scipy/anndata are imported where needed, inside `try` blocks.

Speed: every step works on the CSR arrays of one chunk of cells at a time. The per-cell ranking that both
the quantile bins and the top-k selection need is one row-wise sort of packed integer keys
(quantised value, position in the row), which numpy sorts with SIMD.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from transformers import BatchFeature, FeatureExtractionMixin
from transformers.utils import cached_file, logging
from transformers.utils.logging import tqdm

try:
    import scipy.sparse as sp
except ImportError:  # only needed to tokenize; Hub users without scipy can still load the vocabulary
    sp = None

logger = logging.get_logger(__name__)

VOCAB_FILE = "vocab.json"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>")
DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "human_vocab.json.gz")
ENSEMBL_PATTERN = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$")
GENE_SELECTIONS = ("all", "nonzero", "top_k")
BINNINGS = ("quantile_per_cell", "global")
# log1p values are ranked on a fixed grid of 1/4096 (about 0.02% in count ratio), so ranks and ties do
# not depend on how cells are chunked; values above 16 (unreachable after normalize_total) share the top.
QUANT_SCALE, QUANT_MAX = 4096.0, 65535


def strip_ensembl_version(name: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510`; other names unchanged."""
    match = ENSEMBL_PATTERN.match(name)
    return match.group(1) if match else name


def is_ensembl_id(name: str) -> bool:
    return ENSEMBL_PATTERN.match(name) is not None


def check_expression_values(data: np.ndarray) -> None:
    """Raise a clear error for NaN, infinite or negative expression values (scaled or corrupt input)."""
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise ValueError(
            "The expression matrix contains NaN or infinite values. Pass raw counts (or log1p-normalised "
            "counts); remove or impute the broken entries first."
        )
    if data.min() < 0:
        raise ValueError(
            "The expression matrix contains negative values, so it looks scaled or batch-corrected. Pass raw "
            "counts (e.g. `adata.layers['counts']` or `adata.raw`) or log1p-normalised counts."
        )


def looks_log_normalized(data: np.ndarray) -> bool:
    """Heuristic: non-integer values that all stay below 30 are log1p-normalised, not counts."""
    if data.size == 0:
        return False
    fractional = not np.array_equal(data, np.round(data))
    return bool(fractional and data.max() < 30)


@dataclass
class GeneCoverage:
    """How well the input genes match the vocabulary; `count_fraction` is measured on the first chunk."""

    id_type: str
    source: str
    n_input_genes: int
    n_matched_genes: int
    n_duplicated: int
    count_fraction: float

    def __str__(self) -> str:
        return (
            f"{self.n_matched_genes}/{self.n_input_genes} genes matched the vocabulary by {self.id_type} "
            f"(from {self.source}), carrying {self.count_fraction:.1%} of the counts"
            + (f"; {self.n_duplicated} duplicated genes summed" if self.n_duplicated else "")
        )


@dataclass
class GeneMapping:
    """Input columns -> vocabulary ids: `columns[i]` is the input column of matched gene `i`."""

    columns: np.ndarray
    vocab_ids: np.ndarray  # (n_matched,) ascending vocabulary ids
    column_to_matched: np.ndarray  # (n_input,) index into vocab_ids, -1 for unmatched
    coverage: GeneCoverage


class ScGeneTokenizer(FeatureExtractionMixin):
    """Turns the cells of an AnnData into `input_ids`, `expression_values`, `expression_bins`, `attention_mask`.

    Gene selection: `"all"` (every vocabulary gene present in the input, vocabulary order, zeros included),
    `"nonzero"` (expressed genes, highest first) or `"top_k"` (the `top_k` highest). When a cell has more
    than `max_length` candidates, inference keeps the highest (ties: input column order) and training
    (`seed` given) samples them uniformly. Bins: 0 is zero expression, 1..n_bins-1 the expressed values by
    per-cell quantile or by global edges fitted with `fit_bin_edges`; `n_bins` itself is the mask bin.
    """

    model_input_names = ["input_ids", "expression_values", "expression_bins", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        n_bins: int = 51,
        binning: str = "quantile_per_cell",
        bin_edges: list[float] | None = None,
        gene_selection: str = "nonzero",
        max_length: int | None = 2048,
        top_k: int | None = None,
        add_cls_token: bool = True,
        target_sum: float = 1e4,
        min_coverage: float = 0.5,
        gene_column: str | None = None,
        **kwargs,
    ):
        vocab = kwargs.pop("vocab", None) or read_vocab_file(vocab_file or DEFAULT_VOCAB)
        super().__init__(**kwargs)
        if binning not in BINNINGS:
            raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}")
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2 (bin 0 holds zeros), got {n_bins}")
        self.n_bins = n_bins
        self.binning = binning
        self.bin_edges = None if bin_edges is None else [float(edge) for edge in bin_edges]
        self.gene_selection = gene_selection
        self.max_length = max_length
        self.top_k = top_k
        self.add_cls_token = add_cls_token
        self.target_sum = target_sum
        self.min_coverage = min_coverage
        self.gene_column = gene_column
        self._set_vocab(vocab)

    # ------------------------------------------------------------------ vocabulary
    def _set_vocab(self, vocab: dict) -> None:
        ensembl_ids, symbols = list(vocab["ensembl_ids"]), list(vocab["symbols"])
        if len(ensembl_ids) != len(symbols):
            raise ValueError("The vocabulary needs one Ensembl id and one symbol (or '') per gene.")
        self._species = vocab.get("species", "")
        self._source = vocab.get("source", "")
        self._gene_ensembl_ids, self._gene_symbols = ensembl_ids, symbols
        self._aliases = dict(vocab.get("aliases", {}))
        offset = len(SPECIAL_TOKENS)
        by_ensembl, by_symbol = {}, {}
        for index, (ensembl_id, symbol) in enumerate(zip(ensembl_ids, symbols)):
            if ensembl_id and ensembl_id in by_ensembl:
                raise ValueError(f"Ensembl id {ensembl_id} appears twice in the vocabulary.")
            if ensembl_id:
                by_ensembl[ensembl_id] = index + offset
            if symbol:
                by_symbol.setdefault(symbol, index + offset)  # a duplicated symbol keeps its first gene
        for token_id, token in enumerate(SPECIAL_TOKENS):
            by_symbol[token] = token_id
        self._by_ensembl, self._by_symbol = by_ensembl, by_symbol

    def _vocab_dict(self) -> dict:
        return {
            "species": self._species,
            "source": self._source,
            "ensembl_ids": self._gene_ensembl_ids,
            "symbols": self._gene_symbols,
            "aliases": self._aliases,
        }

    @classmethod
    def from_gene_list(cls, genes, **kwargs) -> ScGeneTokenizer:
        """A vocabulary of exactly the special tokens plus `genes` (Ensembl ids, symbols or (id, symbol) pairs).

        The missing id type of each gene is filled from the default human vocabulary when it knows the gene.
        """
        reference = cls() if os.path.exists(DEFAULT_VOCAB) else None
        ensembl_ids, symbols = [], []
        for gene in genes:
            ensembl_id, symbol = gene if isinstance(gene, (tuple, list)) else (None, None)
            if ensembl_id is None:
                name = str(gene)
                ensembl_id, symbol = (strip_ensembl_version(name), "") if is_ensembl_id(name) else ("", name)
            known = reference._lookup(ensembl_id or symbol) if reference is not None else None
            if known is not None:
                ensembl_id = ensembl_id or reference.ensembl_ids[known]
                symbol = symbol or reference.symbols[known]
            ensembl_ids.append(strip_ensembl_version(ensembl_id or ""))
            symbols.append(symbol or "")
        species = reference._species if reference is not None else ""
        vocab = {"species": species, "source": "from_gene_list", "ensembl_ids": ensembl_ids, "symbols": symbols}
        return cls(vocab=vocab, **kwargs)

    @classmethod
    def from_gene_table(cls, table, ensembl_column="ensembl_id", symbol_column="symbol", alias_column=None, **kwargs):
        """A vocabulary from a table (anything indexable by column, e.g. a DataFrame); aliases `|`-separated."""
        ensembl_ids = [strip_ensembl_version(str(e)) for e in table[ensembl_column]]
        symbols = [str(s) for s in table[symbol_column]]
        aliases = {}
        if alias_column is not None:
            for ensembl_id, names in zip(ensembl_ids, table[alias_column]):
                for alias in str(names).split("|") if isinstance(names, str) else []:
                    aliases.setdefault(alias, ensembl_id)
        vocab = {"source": "from_gene_table", "ensembl_ids": ensembl_ids, "symbols": symbols, "aliases": aliases}
        return cls(vocab=vocab, **kwargs)

    @classmethod
    def from_anndata(cls, adata, gene_column: str | None = None, **kwargs) -> ScGeneTokenizer:
        """A vocabulary of the genes of `adata` (`var_names` or a `var` column), in their order."""
        names = adata.var_names if gene_column is None else adata.var[gene_column]
        return cls.from_gene_list([str(name) for name in names], gene_column=gene_column, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self._gene_ensembl_ids)

    pad_token_id, cls_token_id, mask_token_id = 0, 1, 2
    pad_token, cls_token, mask_token = SPECIAL_TOKENS

    @property
    def ensembl_ids(self) -> list[str]:
        return list(SPECIAL_TOKENS) + self._gene_ensembl_ids

    @property
    def symbols(self) -> list[str]:
        return list(SPECIAL_TOKENS) + self._gene_symbols

    def _lookup(self, name: str) -> int | None:
        name = str(name)
        if is_ensembl_id(name):
            return self._by_ensembl.get(strip_ensembl_version(name))
        found = self._by_symbol.get(name)
        if found is None and name in self._aliases:
            found = self._by_ensembl.get(self._aliases[name])
        return found

    def convert_genes_to_ids(self, genes) -> list[int]:
        """Gene names (Ensembl ids, versioned or not, symbols or aliases) -> ids; `KeyError` names unknown genes."""
        ids = [self._lookup(gene) for gene in genes]
        unknown = [gene for gene, token_id in zip(genes, ids) if token_id is None]
        if unknown:
            raise KeyError(f"{len(unknown)} genes are not in the vocabulary: {unknown[:10]}")
        return ids

    def convert_ids_to_genes(self, ids, id_type: str = "symbol") -> list[str]:
        """Ids -> symbols (`id_type="symbol"`, falling back to the Ensembl id) or Ensembl ids."""
        if id_type not in ("symbol", "ensembl"):
            raise ValueError(f"id_type must be 'symbol' or 'ensembl', got {id_type!r}")
        ensembl_ids, symbols = self.ensembl_ids, self.symbols
        if id_type == "ensembl":
            return [ensembl_ids[int(i)] or symbols[int(i)] for i in ids]
        return [symbols[int(i)] or ensembl_ids[int(i)] for i in ids]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        output = {key: value for key, value in super().to_dict().items() if not key.startswith("_")}
        output.pop("vocab_file", None)
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write `preprocessor_config.json` and the gene vocabulary `vocab.json`."""
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = os.path.join(save_directory, VOCAB_FILE)
        with open(vocab_path, "w", encoding="utf-8") as handle:
            json.dump(self._vocab_dict(), handle, separators=(",", ":"))
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs) + [vocab_path]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the config and its `vocab.json` from a directory or a Hub repository."""
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }
        if os.path.isdir(pretrained_model_name_or_path):
            vocab_file = os.path.join(pretrained_model_name_or_path, hub_kwargs.get("subfolder", ""), VOCAB_FILE)
        else:
            vocab_file = cached_file(pretrained_model_name_or_path, VOCAB_FILE, **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, vocab_file=vocab_file, **kwargs)

    # ------------------------------------------------------------------ gene matching
    def map_genes(self, adata, gene_column: str | None = None) -> GeneMapping:
        """Match `adata`'s genes to the vocabulary, from `gene_column` or the best of var_names / var columns."""
        gene_column = gene_column or self.gene_column
        candidates = {"var_names": list(map(str, adata.var_names))}
        if gene_column is not None:
            candidates = {gene_column: list(map(str, adata.var[gene_column]))}
        else:
            for column in adata.var.columns:
                if adata.var[column].dtype == object or str(adata.var[column].dtype) == "category":
                    candidates[column] = list(map(str, adata.var[column]))
        best = None
        for source, names in candidates.items():
            ids = np.array([self._lookup(name) or -1 for name in names], dtype=np.int64)
            id_type = "Ensembl id" if sum(map(is_ensembl_id, names)) > len(names) / 2 else "symbol"
            # Ensembl ids are unambiguous: prefer them unless symbols match over 5% more genes.
            score = (ids >= 0).sum() * (1.05 if id_type == "Ensembl id" else 1.0)
            if best is None or score > best[0]:
                best = (score, source, names, ids, id_type)
        _, source, names, ids, id_type = best
        matched = ids >= 0
        vocab_ids, column_to_matched = np.unique(ids[matched], return_inverse=True)
        columns = np.flatnonzero(matched)
        mapping = np.full(len(names), -1, dtype=np.int64)
        mapping[columns] = column_to_matched
        coverage = GeneCoverage(id_type, source, len(names), len(vocab_ids), int(matched.sum() - len(vocab_ids)), 0.0)
        if coverage.n_duplicated:
            logger.warning(
                f"{coverage.n_duplicated} input genes map to a vocabulary gene that another column already has "
                f"(duplicated symbols or versions); their counts are summed."
            )
        return GeneMapping(columns, vocab_ids, mapping, coverage)

    def _check_coverage(self, mapping: GeneMapping, counts) -> None:
        """Fill in the fraction of counts carried by matched genes; raise below `min_coverage`."""
        total = float(counts.sum())
        matched = float(counts[:, mapping.columns].sum()) if len(mapping.columns) else 0.0
        coverage = mapping.coverage
        coverage.count_fraction = matched / total if total > 0 else 0.0
        logger.info(f"Gene coverage: {coverage}")
        if coverage.count_fraction < self.min_coverage:
            other = "symbols" if coverage.id_type == "Ensembl id" else "Ensembl ids"
            raise ValueError(
                f"Only {coverage}, below min_coverage={self.min_coverage}. The input genes look like "
                f"{coverage.id_type}s (read from {coverage.source}). If another `var` column holds "
                f"{other}, pass `gene_column=`; check the species matches the vocabulary "
                f"({self._species or 'custom'}); or build a vocabulary with `ScGeneTokenizer.from_anndata`."
            )

    # ------------------------------------------------------------------ binning
    def fit_bin_edges(self, adata, max_cells: int = 10000, seed: int = 0, chunk_size: int = 2048) -> list[float]:
        """Fit the `n_bins - 2` global edges on the expressed log1p values of up to `max_cells` cells; sets them."""
        rng = np.random.default_rng(seed)
        n_cells = adata.n_obs
        keep = np.sort(rng.choice(n_cells, min(max_cells, n_cells), replace=False))
        mapping = self.map_genes(adata)
        values = []
        for start in range(0, len(keep), chunk_size):
            rows = keep[start : start + chunk_size]
            chunk = self._normalized_chunk(adata.X[rows] if not adata.isbacked else adata.X[rows, :], mapping, None)
            values.append(chunk.data)
        values = np.concatenate(values) if values else np.zeros(0, np.float32)
        if values.size == 0:
            raise ValueError("No expressed values to fit bin edges on.")
        quantiles = np.linspace(0, 1, self.n_bins)[1:-1]
        self.bin_edges = [float(edge) for edge in np.quantile(values, quantiles)]
        self.binning = "global"
        return self.bin_edges

    def _bins_global(self, values: np.ndarray) -> np.ndarray:
        if self.bin_edges is None or len(self.bin_edges) != self.n_bins - 2:
            raise ValueError("binning='global' needs `n_bins - 2` bin_edges; call `fit_bin_edges(adata)` first.")
        return 1 + np.searchsorted(np.asarray(self.bin_edges, np.float32), values, side="right")

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        adata,
        *,
        gene_selection: str | None = None,
        max_length: int | None = None,
        top_k: int | None = None,
        truncation: bool = True,
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        label_column: str | None = None,
        label2id: dict | None = None,
        gene_column: str | None = None,
        seed: int | None = None,
        chunk_size: int = 2048,
        progress: bool = False,
    ) -> BatchFeature:
        """Tokenize every cell of `adata` (in memory, backed, or a path to an `.h5ad`) into a padded batch.

        `padding`: "longest" (or True) pads to the longest cell, "max_length" to `max_length`.
        `truncation=False` ignores `max_length` (e.g. `gene_selection="all"` over a large panel).
        `seed`: sample the genes kept under `max_length` (training); None keeps the highest (inference).
        `label_column`: adds `labels` from that `obs` column (categories -> codes, or `label2id`).
        """
        adata = read_h5ad_backed(adata) if isinstance(adata, (str, os.PathLike)) else adata
        chunks = list(
            self.iter_encoded(
                adata,
                gene_selection=gene_selection,
                max_length=max_length,
                top_k=top_k,
                truncation=truncation,
                gene_column=gene_column,
                seed=seed,
                chunk_size=chunk_size,
                progress=progress,
            )
        )
        lengths = np.concatenate([chunk.lengths for chunk in chunks]) if chunks else np.zeros(0, np.int64)
        max_length = self.max_length if max_length is None else max_length
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs a max_length.")
            width = max_length
        else:
            width = 0
        width = max(width, int(lengths.max()) if len(lengths) else 0)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        batch = {
            name: pad_ragged([getattr(c, name) for c in chunks], lengths, width, self.pad_token_id)
            for name in ("input_ids", "expression_values", "expression_bins")
        }
        if return_attention_mask:
            batch["attention_mask"] = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        if label_column is not None:
            batch["labels"] = obs_labels(adata.obs[label_column], label2id)
        return BatchFeature(batch, tensor_type=return_tensors)

    def iter_encoded(
        self,
        adata,
        *,
        gene_selection: str | None = None,
        max_length: int | None = None,
        top_k: int | None = None,
        truncation: bool = True,
        gene_column: str | None = None,
        seed: int | None = None,
        chunk_size: int = 2048,
        progress: bool = False,
    ):
        """Yield an `EncodedChunk` (ragged, unpadded) per `chunk_size` cells; reads backed files chunk by chunk."""
        if sp is None:
            raise ImportError("Tokenizing needs scipy: pip install scipy")
        gene_selection = gene_selection or self.gene_selection
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}")
        max_length = None if not truncation else self.max_length if max_length is None else max_length
        top_k = self.top_k if top_k is None else top_k
        if gene_selection == "top_k" and not top_k:
            raise ValueError("gene_selection='top_k' needs top_k (a positive number of genes).")
        mapping = self.map_genes(adata, gene_column)
        n_special = int(self.add_cls_token)
        if gene_selection == "all" and max_length is not None and len(mapping.vocab_ids) + n_special > max_length:
            raise ValueError(
                f"gene_selection='all' keeps all {len(mapping.vocab_ids)} matched genes, more than "
                f"max_length={max_length}; pass truncation=False, or use 'nonzero' / 'top_k'."
            )
        limit = np.iinfo(np.int64).max if max_length is None else max_length - n_special
        if gene_selection == "top_k":
            limit = min(limit, top_k)
        rng = None if seed is None or gene_selection != "nonzero" else np.random.default_rng(seed)
        log_normalized = None
        with tqdm(total=adata.n_obs, unit="cells", desc="Tokenizing", disable=not progress) as bar:
            for start in range(0, adata.n_obs, chunk_size):
                stop = min(start + chunk_size, adata.n_obs)
                counts = to_csr(adata.X[start:stop])
                if log_normalized is None:
                    log_normalized = "log1p" in adata.uns or looks_log_normalized(counts.data)
                    if log_normalized:
                        logger.warning("The input looks log1p-normalised already; it is not normalised again.")
                    self._check_coverage(mapping, counts)
                matrix = self._normalized_chunk(counts, mapping, log_normalized)
                yield self._encode_chunk(matrix, mapping, gene_selection, limit, rng, start, stop)
                bar.update(stop - start)

    def _normalized_chunk(self, counts, mapping: GeneMapping, log_normalized: bool | None):
        """Raw (or log1p) chunk -> CSR of log1p(normalize_total) values over the matched genes, no zeros."""
        counts = to_csr(counts)
        data = counts.data.astype(np.float32, copy=True)
        check_expression_values(data)
        if log_normalized is None:
            log_normalized = looks_log_normalized(data)
        indptr = counts.indptr.astype(np.int64)
        row_lengths = np.diff(indptr)
        if log_normalized:
            data = np.expm1(data) if mapping.coverage.n_duplicated else data
        else:  # normalize_total over all input genes, as scanpy does, then sum duplicates, then log1p
            cumulative = np.concatenate([[0.0], np.cumsum(data, dtype=np.float64)])
            totals = cumulative[indptr[1:]] - cumulative[indptr[:-1]]
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
            data *= np.repeat(scale.astype(np.float32), row_lengths)
        n_matched = len(mapping.vocab_ids)
        if mapping.coverage.n_duplicated:
            selector = sp.csr_matrix(
                (np.ones(len(mapping.columns), np.float32), (mapping.columns, mapping.column_to_matched[mapping.columns])),
                shape=(counts.shape[1], n_matched),
            )
            summed = sp.csr_matrix((data, counts.indices, indptr), shape=counts.shape) @ selector
            indptr, indices, data = summed.indptr.astype(np.int64), summed.indices, summed.data
        else:
            indices = mapping.column_to_matched[counts.indices]
            keep = indices >= 0
            cumulative_keep = np.concatenate([[0], np.cumsum(keep)])
            indptr, indices, data = cumulative_keep[indptr], indices[keep], data[keep]
        if not (log_normalized and not mapping.coverage.n_duplicated):
            data = np.log1p(data)
        nonzero = data > 0
        if not nonzero.all():
            cumulative_nonzero = np.concatenate([[0], np.cumsum(nonzero)])
            indptr, indices, data = cumulative_nonzero[indptr], indices[nonzero], data[nonzero]
        return sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=(counts.shape[0], n_matched))

    def _encode_chunk(self, matrix, mapping, gene_selection, limit, rng, start, stop) -> EncodedChunk:
        indptr, indices, values = matrix.indptr, matrix.indices, matrix.data
        row_lengths = np.diff(indptr)
        quantised = np.minimum(values * np.float32(QUANT_SCALE) + np.float32(0.5), QUANT_MAX).astype(np.uint32)
        sorted_quantised, positions, valid = sort_rows_descending(indptr, quantised)
        if self.binning == "global":
            bins = self._bins_global(values)
        else:
            bins = np.zeros(len(values), np.int64)
            bins[positions[valid]] = quantile_bins(sorted_quantised, valid, row_lengths, self.n_bins)[valid]
        if gene_selection == "all":
            n_rows, n_matched = matrix.shape
            rows = np.repeat(np.arange(n_rows), row_lengths)
            dense_values = np.zeros((n_rows, n_matched), np.float32)
            dense_bins = np.zeros((n_rows, n_matched), np.int64)
            dense_values[rows, indices] = values
            dense_bins[rows, indices] = bins
            token_ids = np.tile(mapping.vocab_ids, n_rows)
            values, bins = dense_values.ravel(), dense_bins.ravel()
            kept_lengths = np.full(n_rows, n_matched, np.int64)
        else:
            if rng is not None:  # training: a uniform random subset instead of the highest values
                priorities = rng.integers(0, QUANT_MAX + 1, len(values), dtype=np.uint32)
                _, positions, valid = sort_rows_descending(indptr, priorities)
            kept_lengths = np.minimum(row_lengths, limit)
            keep = valid & (np.arange(positions.shape[1])[None, :] < kept_lengths[:, None])
            kept = positions[keep]
            token_ids = mapping.vocab_ids[indices[kept]]
            values, bins = values[kept], bins[kept]
        return self._with_cls(token_ids, values, bins, kept_lengths, start, stop)

    def _with_cls(self, token_ids, values, bins, lengths, start, stop) -> EncodedChunk:
        if self.add_cls_token:
            lengths = lengths + 1
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            genes = np.ones(int(lengths.sum()), bool)
            genes[starts] = False
            token_ids = insert_at(genes, token_ids, self.cls_token_id, np.int64)
            values = insert_at(genes, values, 0.0, np.float32)
            bins = insert_at(genes, bins, 0, np.int64)
        return EncodedChunk(start, stop, token_ids.astype(np.int64), values.astype(np.float32), bins.astype(np.int64), lengths.astype(np.int64))


@dataclass
class EncodedChunk:
    """Cells `start:stop`, concatenated without padding: cell i holds the next `lengths[i]` tokens."""

    start: int
    stop: int
    input_ids: np.ndarray
    expression_values: np.ndarray
    expression_bins: np.ndarray
    lengths: np.ndarray


def sort_rows_descending(indptr: np.ndarray, keys: np.ndarray):
    """Sort each CSR row by descending `keys` (< 2**16), ties by position, with one packed-integer row-wise sort.

    Returns (sorted keys, flat positions into the CSR data, valid mask), each (n_rows, longest row).
    """
    row_lengths = np.diff(indptr)
    width = int(row_lengths.max()) if len(row_lengths) else 0
    wide = width > 1 << 16
    dtype, shift = (np.uint64, 32) if wide else (np.uint32, 16)
    position = np.arange(len(keys), dtype=np.int64) - np.repeat(indptr[:-1], row_lengths)
    packed = ((QUANT_MAX - keys).astype(dtype) << dtype(shift)) | position.astype(dtype)
    table = np.full((len(row_lengths), width), np.iinfo(dtype).max, dtype=dtype)
    table[np.repeat(np.arange(len(row_lengths)), row_lengths), position] = packed
    table.sort(axis=1)
    valid = np.arange(width)[None, :] < row_lengths[:, None]
    positions = (table & dtype((1 << shift) - 1)).astype(np.int64) + indptr[:-1, None]
    sorted_keys = QUANT_MAX - (table >> dtype(shift)).astype(np.int64)
    return sorted_keys, positions, valid


def quantile_bins(sorted_keys: np.ndarray, valid: np.ndarray, row_lengths: np.ndarray, n_bins: int) -> np.ndarray:
    """Per-cell quantile bins 1..n_bins-1 from rows sorted descending: 1 + floor((n_bins-1) * share strictly below).

    Tied values share the bin of their group, so bins never decrease with the value.
    """
    n_rows, width = sorted_keys.shape
    column = np.arange(width)
    next_differs = np.ones((n_rows, width), bool)
    next_differs[:, :-1] = sorted_keys[:, :-1] != sorted_keys[:, 1:]
    group_end = valid & (next_differs | (column[None, :] == row_lengths[:, None] - 1))
    last_of_group = np.where(group_end, column[None, :], width)
    last_of_group = np.minimum.accumulate(last_of_group[:, ::-1], axis=1)[:, ::-1]
    lengths = np.maximum(row_lengths, 1)[:, None]
    strictly_below = lengths - 1 - last_of_group
    return 1 + (strictly_below * (n_bins - 1)) // lengths


def insert_at(is_data: np.ndarray, data: np.ndarray, fill, dtype) -> np.ndarray:
    """A flat array with `data` where `is_data` is true and `fill` elsewhere."""
    out = np.full(len(is_data), fill, dtype=dtype)
    out[is_data] = data
    return out


def pad_ragged(parts: list[np.ndarray], lengths: np.ndarray, width: int, pad_value) -> np.ndarray:
    """Concatenated ragged rows -> (n_rows, width) array padded with `pad_value` (truncating longer rows)."""
    flat = np.concatenate(parts) if parts else np.zeros(0)
    dtype = flat.dtype if parts else np.int64
    out = np.full((len(lengths), width), pad_value, dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    position = np.arange(len(flat)) - np.repeat(starts, lengths)
    keep = position < width
    out[np.repeat(np.arange(len(lengths)), lengths)[keep], position[keep]] = flat[keep]
    return out


def obs_labels(column, label2id: dict | None = None) -> np.ndarray:
    """An `obs` column -> int64 labels: `label2id` if given, category codes, integers as they are, else sorted names."""
    if label2id is not None:
        missing = sorted({str(v) for v in column if v not in label2id})
        if missing:
            raise KeyError(f"Labels missing from label2id: {missing[:10]}")
        return np.array([label2id[v] for v in column], dtype=np.int64)
    if str(column.dtype) == "category":
        return np.asarray(column.cat.codes, dtype=np.int64)
    values = np.asarray(column)
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    return np.unique(values.astype(str), return_inverse=True)[1].astype(np.int64)


def to_csr(matrix):
    """Any chunk of an AnnData X (dense, CSR, CSC, sparse array) -> scipy CSR with sorted-or-not indices."""
    if sp.issparse(matrix):
        return matrix if matrix.format == "csr" else sp.csr_matrix(matrix)
    return sp.csr_matrix(np.asarray(matrix))


def read_h5ad_backed(path):
    """Open an `.h5ad` on disk (backed, read only) so cells are read chunk by chunk."""
    try:
        import anndata
    except ImportError as error:
        raise ImportError("Reading .h5ad files needs anndata: pip install anndata") from error
    return anndata.read_h5ad(path, backed="r")


def read_vocab_file(path) -> dict:
    """A vocabulary JSON (optionally gzipped): ensembl_ids, symbols, optional aliases, species, source."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No gene vocabulary at {path}. Pass `vocab_file=`, use `ScGeneTokenizer.from_gene_list`, or load "
            f"a saved tokenizer with `from_pretrained`."
        )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)
