"""ScGeneTokenizer: AnnData cells -> gene ids, log1p expression values and expression bins.

A `FeatureExtractionMixin`, not a `PreTrainedTokenizer`: the input is numbers (an expression matrix), not
text, which is the audio feature-extractor pattern (config in `preprocessor_config.json`, `BatchFeature`
out), so it registers with `AutoFeatureExtractor`. The gene vocabulary is saved next to the config in
`vocab.json`. This file and its array kernels (`encoding_scgene.py`, imported relatively so that
`save_pretrained` copies both) ship with checkpoints as Hub code: standard library, numpy, torch and
transformers only at module level; scipy/anndata are imported where needed, inside `try` blocks.

Speed: every step works on the CSR arrays of one chunk of cells at a time (see `encoding_scgene.py`).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from transformers import BatchFeature, FeatureExtractionMixin
from transformers.utils import cached_file, logging
from transformers.utils.logging import tqdm

from .encoding_scgene import (
    QUANT_MAX,
    QUANT_SCALE,
    EncodedChunk,
    RowRanking,
    check_expression_values,
    drop_entries,
    insert_at,
    log1p_scaled,
    looks_log_normalized,
    pad_ragged,
    to_csr,
)

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


def strip_ensembl_version(name: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510`; other names unchanged."""
    match = ENSEMBL_PATTERN.match(name)
    return match.group(1) if match else name


def is_ensembl_id(name: str) -> bool:
    return ENSEMBL_PATTERN.match(name) is not None


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
    `"nonzero"` (expressed genes) or `"top_k"` (the `top_k` highest), in input column order. When a cell has more
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
        first, fallback = (self.symbols, self.ensembl_ids) if id_type == "symbol" else (self.ensembl_ids, self.symbols)
        return [first[int(i)] or fallback[int(i)] for i in ids]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        output = {key: value for key, value in super().to_dict().items() if not key.startswith("_")}
        output.pop("vocab_file", None)
        auto_map = output.get("auto_map", {})
        if isinstance(auto_map.get("AutoFeatureExtractor"), (list, tuple)):
            # transformers saves a (slow, fast) text-tokenizer pair for any class named "*Tokenizer";
            # AutoFeatureExtractor needs the plain "module.Class" reference to load the Hub code.
            output["auto_map"] = {**auto_map, "AutoFeatureExtractor": auto_map["AutoFeatureExtractor"][0]}
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write `preprocessor_config.json` and the gene vocabulary `vocab.json`."""
        os.makedirs(save_directory, exist_ok=True)
        vocab_path = os.path.join(save_directory, VOCAB_FILE)
        with open(vocab_path, "w", encoding="utf-8") as handle:
            vocab = {"species": self._species, "source": self._source, "aliases": self._aliases}
            json.dump(vocab | {"ensembl_ids": self._gene_ensembl_ids, "symbols": self._gene_symbols}, handle)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs) + [vocab_path]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the config and its `vocab.json` from a directory or a Hub repository."""
        hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
        hub_kwargs = {key: kwargs[key] for key in hub_keys if key in kwargs}
        if os.path.isdir(pretrained_model_name_or_path):
            vocab_file = os.path.join(pretrained_model_name_or_path, hub_kwargs.get("subfolder", ""), VOCAB_FILE)
        else:
            vocab_file = cached_file(pretrained_model_name_or_path, VOCAB_FILE, **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, vocab_file=vocab_file, **kwargs)

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict, **kwargs):
        # the base class only passes on keys already in the config, and the vocabulary file is not one
        if "vocab_file" in kwargs:
            feature_extractor_dict = {**feature_extractor_dict, "vocab_file": kwargs.pop("vocab_file")}
        return super().from_dict(feature_extractor_dict, **kwargs)

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
        mapping = np.full(len(names), -1, dtype=np.int32)
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
        # every call reports coverage: as a warning when a tenth or more of the counts is lost, else as info
        (logger.warning if coverage.count_fraction < 0.9 else logger.info)(f"Gene coverage: {coverage}")
        if total > 0 and coverage.count_fraction < self.min_coverage:  # (empty chunk: nothing to judge)
            other = "symbols" if coverage.id_type == "Ensembl id" else "Ensembl ids"
            raise ValueError(
                f"Only {coverage}, below min_coverage={self.min_coverage}. The input genes look like "
                f"{coverage.id_type}s (read from {coverage.source}). If another `var` column holds "
                f"{other}, pass `gene_column=`; check the species matches the vocabulary "
                f"({self._species or 'custom'}); or build a vocabulary with `ScGeneTokenizer.from_anndata`."
            )

    # ------------------------------------------------------------------ binning
    def fit_bin_edges(self, adata, max_cells: int = 10000, seed: int = 0) -> list[float]:
        """Fit the `n_bins - 2` global edges (quantiles of the expressed log1p values of up to `max_cells`
        random cells) and switch to `binning="global"`; saved with the tokenizer."""
        rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, min(max_cells, adata.n_obs), replace=False))
        counts = to_csr(adata.X[rows])
        log_normalized = "log1p" in adata.uns or looks_log_normalized(counts.data)
        values = self._normalized_chunk(counts, self.map_genes(adata), log_normalized).data
        if values.size == 0:
            raise ValueError("No expressed values to fit bin edges on.")
        self.bin_edges = [float(edge) for edge in np.quantile(values, np.linspace(0, 1, self.n_bins)[1:-1])]
        self.binning = "global"
        return self.bin_edges

    def _bins_global(self, values: np.ndarray) -> np.ndarray:
        if self.bin_edges is None or len(self.bin_edges) != self.n_bins - 2:
            raise ValueError("binning='global' needs `n_bins - 2` bin_edges; call `fit_bin_edges(adata)` first.")
        return (1 + np.searchsorted(np.asarray(self.bin_edges, np.float32), values, side="right")).astype(np.int16)

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        adata,
        *,
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        label_column: str | None = None,
        label2id: dict | None = None,
        **encode_kwargs,
    ) -> BatchFeature:
        """Tokenize every cell of `adata` (in memory, backed, or a path to an `.h5ad`) into a padded batch.

        `encode_kwargs` go to `iter_encoded`: gene_selection, max_length, top_k, truncation, gene_column,
        seed, chunk_size, num_threads, progress.
        `padding`: "longest" (or True) pads to the longest cell, "max_length" to `max_length`.
        `label_column`: adds `labels` from that `obs` column: its category codes, or `label2id` (pass it to
        keep codes stable across datasets and subsets, which drop unused categories).
        """
        adata = read_h5ad_backed(adata) if isinstance(adata, (str, os.PathLike)) else adata
        chunks = list(self.iter_encoded(adata, **encode_kwargs))
        max_length = encode_kwargs.get("max_length") or self.max_length
        lengths = np.concatenate([chunk.lengths for chunk in chunks]) if chunks else np.zeros(0, np.int64)
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
        chunk_size: int = 512,
        num_threads: int = 2,
        progress: bool = False,
    ):
        """Yield an `EncodedChunk` (ragged, unpadded) per `chunk_size` cells, in order.

        `truncation=False` ignores `max_length` (e.g. `gene_selection="all"` over a large panel); `seed`
        samples the genes kept under `max_length` (training), None keeps the highest (inference).

        Chunks are read in this thread (backed files: one chunk in memory at a time per worker) and encoded
        by `num_threads` workers; numpy releases the GIL, so two cores are used. Results do not depend on
        `num_threads`; sampling with `seed` depends on `chunk_size` (one generator per chunk).
        """
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
        first = to_csr(adata.X[: min(chunk_size, adata.n_obs)])
        check_expression_values(first.data)
        log_normalized = "log1p" in adata.uns or looks_log_normalized(first.data)
        if log_normalized:
            logger.warning("The input looks log1p-normalised already; it is not normalised again.")
        self._check_coverage(mapping, first)

        def encode(start, counts):
            matrix = self._normalized_chunk(counts, mapping, log_normalized)
            sampling = seed is not None and gene_selection == "nonzero"
            rng = np.random.default_rng([seed, start]) if sampling else None
            return self._encode_chunk(matrix, mapping, gene_selection, limit, rng, start)

        with ThreadPoolExecutor(max(1, num_threads)) as pool, tqdm(
            total=adata.n_obs, unit="cells", desc="Tokenizing", disable=not progress
        ) as bar:
            pending = deque()
            for start in range(0, adata.n_obs, chunk_size):
                counts = first if start == 0 else adata.X[start : start + chunk_size]
                pending.append(pool.submit(encode, start, counts))
                if len(pending) > num_threads:
                    chunk = pending.popleft().result()
                    bar.update(len(chunk.lengths))
                    yield chunk
            while pending:
                chunk = pending.popleft().result()
                bar.update(len(chunk.lengths))
                yield chunk

    def _normalized_chunk(self, counts, mapping: GeneMapping, log_normalized: bool):
        """Raw (or log1p) chunk -> CSR of log1p(normalize_total) values over the matched genes, no zeros.

        normalize_total divides by the total over all input genes, as scanpy does; duplicated genes are
        summed before the log. log(1 + x) rather than log1p: 3x faster in float32, same to 5e-7 here.
        """
        counts = to_csr(counts)
        data = counts.data.astype(np.float32, copy=False)
        check_expression_values(data)
        indptr = counts.indptr.astype(np.int64)
        scale = None
        if not log_normalized:
            totals = sp.csr_matrix((data, counts.indices, indptr), shape=counts.shape) @ np.ones(counts.shape[1], np.float32)
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
        if mapping.coverage.n_duplicated:
            values = np.expm1(data) if log_normalized else data * np.repeat(scale, np.diff(indptr))
            selector = sp.csr_matrix(
                (np.ones(len(mapping.columns), np.float32), (mapping.columns, mapping.column_to_matched[mapping.columns])),
                shape=(counts.shape[1], len(mapping.vocab_ids)),
            )
            summed = sp.csr_matrix((values, counts.indices, indptr), shape=counts.shape) @ selector
            summed.sort_indices()  # vocabulary order, so ties stay deterministic
            indptr, indices, values = summed.indptr.astype(np.int64), summed.indices, np.log(summed.data + np.float32(1))
        else:
            indices = mapping.column_to_matched[counts.indices]
            if len(mapping.columns) < counts.shape[1]:
                indptr, indices, data = drop_entries(indptr, indices, data, indices >= 0)
            values = data if log_normalized else log1p_scaled(data, np.repeat(scale, np.diff(indptr)))
        if not values.all():  # explicit zeros (or underflow) would otherwise count as expressed
            indptr, indices, values = drop_entries(indptr, indices, values, values != 0)
        return sp.csr_matrix((values, indices.astype(np.int32), indptr), shape=(counts.shape[0], len(mapping.vocab_ids)))

    def _encode_chunk(self, matrix, mapping, gene_selection, limit, rng, start) -> EncodedChunk:
        indptr, indices, values = matrix.indptr.astype(np.int64), matrix.indices, matrix.data
        lengths = np.diff(indptr)
        truncate = gene_selection != "all" and len(lengths) > 0 and lengths.max() > limit
        ranking = None
        if self.binning == "quantile_per_cell" or (truncate and rng is None):
            quantised = np.minimum(values, np.float32(QUANT_MAX / QUANT_SCALE))
            quantised *= np.float32(QUANT_SCALE)
            ranking = RowRanking(indptr, quantised.astype(np.uint32))
        bins = self._bins_global(values) if self.binning == "global" else ranking.quantile_bins(self.n_bins)
        if gene_selection == "all":
            n_rows, n_matched = matrix.shape
            dense_values = np.zeros((n_rows, n_matched), np.float32)
            dense_bins = np.zeros((n_rows, n_matched), np.int16)
            flat_index = np.repeat(np.arange(n_rows, dtype=np.int64) * n_matched, lengths) + indices
            dense_values.ravel()[flat_index] = values
            dense_bins.ravel()[flat_index] = bins
            token_ids = np.tile(mapping.vocab_ids.astype(np.int32), n_rows)
            values, bins, lengths = dense_values.ravel(), dense_bins.ravel(), np.full(n_rows, n_matched, np.int64)
        else:
            if truncate:
                if rng is not None:  # training: a uniform random subset instead of the highest values
                    ranking = RowRanking(indptr, rng.integers(0, QUANT_MAX + 1, len(values), dtype=np.uint32))
                keep = ranking.top(limit)
                indices, values, bins, lengths = indices[keep], values[keep], bins[keep], np.minimum(lengths, limit)
            token_ids = mapping.vocab_ids.astype(np.int32)[indices]
        return self._with_cls(token_ids, values, bins, lengths, start)

    def _with_cls(self, token_ids, values, bins, lengths, start) -> EncodedChunk:
        if self.add_cls_token:
            lengths = lengths + 1
            is_gene = np.ones(int(lengths.sum()), bool)
            is_gene[np.cumsum(lengths) - lengths] = False
            token_ids, values, bins = (
                insert_at(is_gene, token_ids, self.cls_token_id),
                insert_at(is_gene, values, 0),
                insert_at(is_gene, bins, 0),
            )
        return EncodedChunk(start, token_ids, values, bins.astype(np.int16, copy=False), lengths.astype(np.int64))


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
