"""ScGeneTokenizer: AnnData cells -> gene ids, log1p expression values and expression bins.

A `FeatureExtractionMixin`, not a `PreTrainedTokenizer`: the input is numbers (an expression matrix), not
text, which is the audio feature-extractor pattern (config in `preprocessor_config.json`, `BatchFeature`
out), so it registers with `AutoFeatureExtractor`. The gene vocabulary is saved inside that config (key "vocab"),
so every loading path gets it. This file, the gene vocabulary (`vocabulary_scgene.py`) and the array kernels
(`encoding_scgene.py`), imported relatively so that `save_pretrained` copies all three, ship with
checkpoints as Hub code: standard library, numpy, torch and transformers only at module level;
scipy/anndata are imported where needed, inside `try` blocks.

Speed: every step works on the CSR arrays of one chunk of cells at a time (see `encoding_scgene.py`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

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
    is_log2_scaled,
    is_log_normalized,
    log1p_scaled,
    pad_chunks,
    to_csr,
)
from .vocabulary_scgene import (
    SPECIAL_TOKENS,
    GeneCoverage,
    GeneMapping,
    GeneVocabulary,
    genes_of_anndata,
    is_ensembl_id,  # noqa: F401  (re-exported: part of this module's interface)
    read_vocab_file,
    strip_ensembl_version,  # noqa: F401
    vocab_from_gene_list,
    vocab_from_gene_table,
)

try:
    import scipy.sparse as sp
except ImportError:  # only needed to tokenize; Hub users without scipy can still load the vocabulary
    sp = None

logger = logging.get_logger(__name__)

LEGACY_VOCAB_FILE = "vocab.json"  # where scgene 0.1 saved the vocabulary, beside the config
DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "human_vocab.json.gz")
GENE_SELECTIONS = ("all", "nonzero", "top_k")
BINNINGS = ("quantile_per_cell", "global")
PANEL_WARNING_GENES = 5000  # fewer matched genes than this is a gene panel, not a transcriptome: a warning says so
BACKED_READ_CHUNKS = 8  # a backed file is read 8 chunks at a time: a few large reads take half the time of many small


def check_lengths(max_length, top_k, add_cls_token: bool) -> None:
    n_special = int(bool(add_cls_token))
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length <= n_special):
        raise ValueError(
            f"max_length counts the tokens of a cell, <cls> included: it must be an integer above {n_special}, "
            f"got {max_length!r} (None keeps every gene)."
        )
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k is a number of genes per cell: a positive integer, got {top_k!r}.")


class ScGeneTokenizer(FeatureExtractionMixin):
    """Turns the cells of an AnnData into `input_ids`, `expression_values`, `expression_bins`, `attention_mask`.

    Gene selection: `"all"` (every vocabulary gene present in the input, vocabulary order, zeros included),
    `"nonzero"` (expressed genes) or `"top_k"` (the `top_k` highest), in input column order. When a cell has more
    than `max_length` candidates, inference keeps the highest (ties: input column order) and training
    (`seed` given) samples them uniformly. Bins: 0 is zero expression, 1..n_bins-1 the expressed values by
    per-cell quantile or by global edges fitted with `fit_bin_edges`; `n_bins` itself is the mask bin.
    `sampling_seed` records the seed a training dataset sampled its genes with (`scgene tokenize --seed`); it is
    saved as provenance and never applied: only an explicit `seed=` samples.
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
        sampling_seed: int | None = None,
        **kwargs,
    ):
        vocab = kwargs.pop("vocab", None)
        if vocab is None and vocab_file is None and "feature_extractor_type" in kwargs:
            raise ValueError(
                "This tokenizer config has no gene vocabulary: it was saved by scgene 0.1, which kept it in vocab.json "
                "beside the config. Load it with scgene.ScGeneTokenizer.from_pretrained(folder) and save it again."
            )
        vocab = vocab or read_vocab_file(vocab_file or DEFAULT_VOCAB)
        super().__init__(**kwargs)
        if binning not in BINNINGS:
            raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}")
        if not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
            raise ValueError(f"n_bins must be an integer of at least 2 (bin 0 holds zeros), got {n_bins!r}")
        if bin_edges is not None and (len(bin_edges) != n_bins - 2 or np.any(np.diff(bin_edges) < 0)):
            raise ValueError(
                f"bin_edges must be {n_bins - 2} non-decreasing numbers (n_bins - 2), got {len(bin_edges)}; "
                f"fit them with `fit_bin_edges(adata)`."
            )
        check_lengths(max_length, top_k, add_cls_token)
        if not target_sum > 0:
            raise ValueError(f"target_sum must be positive (counts per cell after normalize_total), got {target_sum}")
        if not 0 <= min_coverage <= 1:
            raise ValueError(f"min_coverage is a fraction of the counts, between 0 and 1; got {min_coverage}")
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
        self.sampling_seed = sampling_seed  # a record of how training data was made; inference never samples
        self._vocab = GeneVocabulary(vocab)

    # ------------------------------------------------------------------ vocabulary
    @classmethod
    def from_gene_list(cls, genes, **kwargs) -> ScGeneTokenizer:
        """A vocabulary of exactly the special tokens plus `genes` (Ensembl ids, symbols or (id, symbol) pairs).

        The missing id type of each gene is filled from the default human vocabulary when it knows the gene
        (and the vocabulary is marked human when it knows most of them).
        """
        reference = GeneVocabulary(read_vocab_file(DEFAULT_VOCAB)) if os.path.exists(DEFAULT_VOCAB) else None
        return cls(vocab=vocab_from_gene_list(genes, reference), **kwargs)

    @classmethod
    def from_gene_table(
        cls, table, ensembl_column="ensembl_id", symbol_column="symbol", alias_column=None, species="", **kwargs
    ) -> ScGeneTokenizer:
        """A vocabulary from a gene table (a DataFrame, or a dict of equal-length lists), one row per gene.

        `ensembl_column` / `symbol_column` (either may be None; missing values become ""), and optionally
        `alias_column`: other names of the gene, `|`-separated or a list. An alias that names two genes, or
        that is already a gene's symbol, is dropped (with a warning), as the default vocabulary does.
        """
        vocab = vocab_from_gene_table(table, ensembl_column, symbol_column, alias_column, species)
        return cls(vocab=vocab, **kwargs)

    @classmethod
    def from_anndata(cls, adata, gene_column: str | None = None, symbol_column: str | None = None, **kwargs) -> ScGeneTokenizer:
        """A vocabulary of the genes of `adata` (`var_names` or the `var` column `gene_column`), in their order.

        When the names are Ensembl ids, the symbols come from `symbol_column`, or by default from a `var`
        column named like a symbol column (`gene_symbols`, `feature_name`, ...); otherwise from the default
        human vocabulary where it knows the gene.
        """
        genes = genes_of_anndata(adata, gene_column, symbol_column)
        return cls.from_gene_list(genes, gene_column=gene_column, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    pad_token_id, cls_token_id, mask_token_id = 0, 1, 2
    pad_token, cls_token, mask_token = SPECIAL_TOKENS

    @property
    def ensembl_ids(self) -> list[str]:
        return list(SPECIAL_TOKENS) + self._vocab.gene_ensembl_ids

    @property
    def symbols(self) -> list[str]:
        return list(SPECIAL_TOKENS) + self._vocab.gene_symbols

    @property
    def species(self) -> str:
        return self._vocab.species

    def _lookup(self, name) -> int | None:
        return self._vocab.lookup(name)

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

    def with_settings(self, **settings) -> ScGeneTokenizer:
        """A copy with some settings changed (same vocabulary), e.g. the ones a dataset was tokenized with."""
        unknown = sorted(set(settings) - set(self.to_dict()))
        if unknown:
            raise ValueError(f"Unknown tokenizer settings {unknown}; known: {sorted(self.to_dict())}")
        current = {key: value for key, value in self.to_dict().items() if key != "feature_extractor_type"}
        return type(self)(**(current | settings))

    # ------------------------------------------------------------------ serialisation
    # The vocabulary is part of the config (`preprocessor_config.json`, key "vocab"): every way transformers builds
    # a feature extractor (`from_pretrained`, `AutoFeatureExtractor`, a Trainer checkpoint, a pipeline, Hub code
    # without this package) passes the config to `__init__`, so none of them can come back with another vocabulary.
    def to_dict(self) -> dict:
        public = {key: value for key, value in self.__dict__.items() if not key.startswith("_")}
        output = copy.deepcopy(public) | {"feature_extractor_type": type(self).__name__}
        output.pop("vocab_file", None)
        output["vocab"] = self._vocab.to_json_dict()
        auto_map = output.get("auto_map", {})
        if isinstance(auto_map.get("AutoFeatureExtractor"), (list, tuple)):
            # transformers saves a (slow, fast) text-tokenizer pair for any class named "*Tokenizer";
            # AutoFeatureExtractor needs the plain "module.Class" reference to load the Hub code.
            output["auto_map"] = {**auto_map, "AutoFeatureExtractor": auto_map["AutoFeatureExtractor"][0]}
        return output

    def __repr__(self) -> str:
        settings = {key: value for key, value in self.to_dict().items() if key not in ("vocab", "auto_map")}
        return f"{type(self).__name__}({self.vocab_size} tokens, {self.species or 'custom'} vocabulary, {settings})"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved tokenizer (its config holds the vocabulary) from a directory or a Hub repository.

        A folder saved by scgene 0.1, with the vocabulary in a separate `vocab.json`, loads too; re-save it to get
        the self-contained config that `AutoFeatureExtractor` and Hub code need."""
        config, _ = cls.get_feature_extractor_dict(pretrained_model_name_or_path, **kwargs)
        if "vocab" not in config and "vocab_file" not in kwargs:
            hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            hub_kwargs = {key: kwargs[key] for key in hub_keys if key in kwargs}
            if os.path.isdir(pretrained_model_name_or_path):
                kwargs["vocab_file"] = os.path.join(pretrained_model_name_or_path, hub_kwargs.get("subfolder") or "",
                                                    LEGACY_VOCAB_FILE)
            else:
                kwargs["vocab_file"] = cached_file(pretrained_model_name_or_path, LEGACY_VOCAB_FILE, **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, feature_extractor_dict: dict, **kwargs):
        # the base class only passes on keys already in the config; the legacy vocabulary file is not one
        if "vocab_file" in kwargs:
            feature_extractor_dict = {**feature_extractor_dict, "vocab_file": kwargs.pop("vocab_file")}
        return super().from_dict(feature_extractor_dict, **kwargs)

    # ------------------------------------------------------------------ gene matching
    def map_genes(self, adata, gene_column: str | None = None) -> GeneMapping:
        """Match `adata`'s genes to the vocabulary, from `gene_column` or the best of var_names / var columns."""
        return self._vocab.map_genes(adata, gene_column or self.gene_column)

    @property
    def last_coverage(self) -> GeneCoverage | None:
        """The gene coverage of the last finished call (genes matched, the share of the counts they carry), as
        logged at its end; None before any call. Not saved with the tokenizer."""
        return getattr(self, "_last_coverage", None)

    def _check_coverage(self, coverage: GeneCoverage, matched: float, total: float, n_cells: int, final: bool,
                        panel_chosen: bool = False) -> None:
        """Record the fraction of the counts carried by matched genes; raise below `min_coverage`.

        Called on the first chunk (to fail fast, silently) and on all cells at the end of a call, which
        reports it: as a warning when a tenth or more of the counts is lost, else as info, and in `last_coverage`.
        """
        coverage.count_fraction, coverage.n_cells = (matched / total if total > 0 else None), n_cells
        if final:
            self._last_coverage = coverage
            fraction = coverage.count_fraction
            (logger.warning if fraction is not None and fraction < 0.9 else logger.info)(f"Gene coverage: {coverage}")
            small_panel = coverage.n_matched_genes < PANEL_WARNING_GENES and self.vocab_size > 2 * PANEL_WARNING_GENES
            if small_panel and not panel_chosen:  # a panel passed as genes= is the caller's choice
                # the count share above is measured on the file's own genes: a small panel carries all of its counts
                logger.warning(
                    f"The input measures {coverage.n_matched_genes} of the vocabulary's {self.vocab_size - 3} genes (a "
                    f"whole transcriptome matches 15,000 or more): a gene panel. The model sees only those genes, so "
                    f"cells are told apart less well than from whole transcriptomes; use all the genes you have.")
        if coverage.count_fraction is not None and coverage.count_fraction < self.min_coverage:
            other = "symbols" if coverage.id_type == "Ensembl id" else "Ensembl ids"
            raise ValueError(
                f"Only {coverage}, below min_coverage={self.min_coverage}. The input genes look like "
                f"{coverage.id_type}s (read from {coverage.source}). If another `var` column holds "
                f"{other}, pass `gene_column=`; check the species matches the vocabulary "
                f"({self.species or 'custom'}); or build a vocabulary with `ScGeneTokenizer.from_anndata` "
                f"(or lower `min_coverage`)." + (f" {coverage.case_hint}" if coverage.case_hint else "")
            )

    # ------------------------------------------------------------------ binning
    def fit_bin_edges(self, adata, max_cells: int = 10000, seed: int = 0) -> list[float]:
        """Fit the `n_bins - 2` global edges on a corpus and switch to `binning="global"` (saved with the
        tokenizer): quantiles of the expressed log1p values of up to `max_cells` random cells of `adata`
        (one AnnData, or a list of them sampled in proportion to their sizes; in memory or backed)."""
        corpus = list(adata) if isinstance(adata, (list, tuple)) else [adata]
        sizes = np.array([part.n_obs for part in corpus])
        if sizes.sum() == 0:
            raise ValueError("No cells to fit bin edges on (n_obs == 0).")
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(sizes.sum(), min(max_cells, int(sizes.sum())), replace=False))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        values = []
        for part, low, high in zip(corpus, offsets[:-1], offsets[1:]):
            rows = picked[(picked >= low) & (picked < high)] - low
            if len(rows) == 0:
                continue
            counts = to_csr(part.X[rows])
            log_normalized = is_log_normalized(counts.data, "log1p" in part.uns)
            log2 = log_normalized and is_log2_scaled(counts)
            values.append(self._normalized_chunk(counts, self.map_genes(part), log_normalized, log2)[0].data)
        values = np.concatenate(values) if values else np.zeros(0, np.float32)
        if values.size == 0:
            raise ValueError("No expressed values to fit bin edges on: the cells given have no counts on vocabulary genes.")
        self.bin_edges = [float(edge) for edge in np.quantile(values, np.linspace(0, 1, self.n_bins)[1:-1])]
        self.binning = "global"
        return self.bin_edges

    def bin_rows(self, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Bins of expressed log1p values given cell by cell (`lengths[i]` values of cell i, no zeros, no <cls>), as
        tokenization computes them: e.g. for a count-downsampled view of tokenized cells."""
        if self.binning == "global":
            return self._bins_global(values)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return value_ranking(indptr, values).quantile_bins(self.n_bins)

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
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be 'longest' (or True) or 'max_length', got {padding!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        max_length = encode_kwargs.get("max_length") or self.max_length
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs a max_length.")
        min_width = max_length if padding == "max_length" else 0
        with opened(adata) as cells:
            chunks = self.iter_encoded(cells, **encode_kwargs)
            batch = pad_chunks(chunks, cells.n_obs, min_width, pad_to_multiple_of or 1, return_attention_mask)
            labels = None if label_column is None else obs_labels(cells.obs, label_column, label2id)
        if labels is not None:
            batch["labels"] = labels
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
        layer: str | None = None,
        use_raw: bool = False,
        genes=None,
    ):
        """Yield an `EncodedChunk` (ragged, unpadded) per `chunk_size` cells, in order.

        The expression comes from `adata.X`, or `adata.layers[layer]`, or with `use_raw` from `adata.raw` (its X and
        its genes), as in scanpy. `genes` (gene names, or vocabulary ids) reads only those genes, normalised over
        them as if the file measured nothing else: two files read on the genes both measure are on one footing
        (`scgene.transfer_labels` does this).

        `truncation=False` ignores `max_length` (e.g. `gene_selection="all"` over a large panel); `seed`
        samples the genes kept under `max_length` (training), None keeps the highest (inference).

        Chunks are read in this thread (backed files: one chunk in memory at a time per worker) and encoded
        by `num_threads` workers; numpy releases the GIL, so two cores are used. Results do not depend on
        `num_threads`; sampling with `seed` depends on `chunk_size` (one generator per chunk).

        Gene coverage is checked on the first chunk (an error below `min_coverage` comes before any work)
        and reported, over all cells, once the last chunk is done (and checked again then).
        """
        if sp is None:
            raise ImportError("Tokenizing needs scipy: pip install scipy")
        check_cells(adata)
        adata = expression_source(adata, layer, use_raw)
        whole = adata
        if genes is not None:
            adata = GenePanel(adata, self.gene_panel_columns(adata, genes, gene_column))
        gene_selection = gene_selection or self.gene_selection
        if gene_selection not in GENE_SELECTIONS:
            raise ValueError(f"gene_selection must be one of {GENE_SELECTIONS}, got {gene_selection!r}")
        max_length = None if not truncation else self.max_length if max_length is None else max_length
        top_k = self.top_k if top_k is None else top_k
        check_lengths(max_length, top_k, self.add_cls_token)
        if gene_selection == "top_k" and not top_k:
            raise ValueError("gene_selection='top_k' needs top_k (a positive number of genes).")
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size is a number of cells: a positive integer, got {chunk_size!r}")
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
        log_normalized = is_log_normalized(first.data, "log1p" in adata.uns)
        log2 = log_normalized and is_log2_scaled(first)
        if log_normalized:
            logger.warning(("The input looks log2(x + 1)-normalised (its cells' 2^x - 1 sum to one constant): it is "
                            "read as such, converted to natural log1p, and not normalised again." if log2 else
                            "The input looks log1p-normalised already; it is not normalised again.")
                           + (f" {counts_hint(whole)}" if layer is None and not use_raw else ""))
        first_matched, first_total = self._normalized_chunk(first, mapping, log_normalized, log2)[1:3]
        self._check_coverage(mapping.coverage, first_matched, first_total, first.shape[0], final=False)

        def encode(start, counts):
            empty = int((np.asarray(counts.sum(axis=1)).ravel() == 0).sum())  # values are >= 0: sum 0 = all zero
            matrix, matched, total, cell_totals = self._normalized_chunk(counts, mapping, log_normalized, log2)
            sampling = seed is not None and gene_selection == "nonzero"
            rng = np.random.default_rng([seed, start]) if sampling else None
            chunk = self._encode_chunk(matrix, mapping, gene_selection, limit, rng, start)
            chunk.total_counts = cell_totals
            return chunk, matched, total, empty

        sums = np.zeros(2)  # counts carried by matched genes, all counts
        empty_cells = 0
        with ThreadPoolExecutor(max(1, num_threads)) as pool, tqdm(
            total=adata.n_obs, unit="cells", desc="Tokenizing", disable=not progress
        ) as bar:
            pending = deque()
            for start, counts in read_chunks(adata, chunk_size, first):
                pending.append(pool.submit(encode, start, counts))
                while pending and (len(pending) > num_threads or start + chunk_size >= adata.n_obs):
                    chunk, matched, total, empty = pending.popleft().result()
                    sums += (matched, total)
                    empty_cells += empty
                    bar.update(len(chunk.lengths))
                    yield chunk
        self._check_coverage(mapping.coverage, sums[0], sums[1], adata.n_obs, final=True, panel_chosen=genes is not None)
        if empty_cells:
            logger.warning(
                f"{empty_cells} of {adata.n_obs} cells have no counts at all: each is encoded as <cls> alone, and its "
                "embedding carries nothing about the cell. Remove them first: sc.pp.filter_cells(adata, min_genes=1)."
            )

    def gene_panel_columns(self, adata, genes, gene_column: str | None = None) -> np.ndarray:
        """The columns of `adata` that hold `genes` (names, or vocabulary ids), ascending. Names outside the vocabulary
        are skipped with a warning; a panel the file does not measure at all is an error."""
        genes = list(genes)
        if genes and all(isinstance(gene, (int, np.integer)) for gene in genes):
            ids = np.asarray(genes, np.int64)
            if ids.min() < len(SPECIAL_TOKENS) or ids.max() >= self.vocab_size:
                raise ValueError(f"genes= holds vocabulary ids outside {len(SPECIAL_TOKENS)}..{self.vocab_size - 1}.")
        else:
            found = [self._lookup(str(gene)) for gene in genes]
            unknown = [str(gene) for gene, token_id in zip(genes, found) if token_id is None]
            if unknown:
                logger.warning(f"{len(unknown)} of the {len(genes)} genes passed as genes= are not vocabulary genes "
                               f"and are not read: {unknown[:5]}{', ...' if len(unknown) > 5 else ''}")
            ids = np.asarray([token_id for token_id in found if token_id is not None], np.int64)
        mapping = self.map_genes(adata, gene_column)
        column_ids = np.where(mapping.column_to_matched >= 0,
                              mapping.vocab_ids[np.maximum(mapping.column_to_matched, 0)], -1)
        columns = np.flatnonzero(np.isin(column_ids, ids))
        if not len(columns):
            raise ValueError(f"None of the {len(ids)} genes passed as genes= is measured in this file; pass genes it "
                             "has (e.g. those two files share), or leave out genes= to read them all.")
        return columns

    def _normalized_chunk(self, counts, mapping: GeneMapping, log_normalized: bool, log2: bool = False):
        """Raw (or log1p, or with `log2` log2(x + 1)) chunk -> (CSR of log1p(normalize_total) values over the matched genes, no zeros;
        the counts the matched genes carry; all counts; each cell's total count, NaN for log1p input), counts on
        the linear scale for log1p input.

        normalize_total divides by the total over all input genes, as scanpy does; duplicated genes are
        summed before the log. log(1 + x) rather than log1p: 3x faster in float32, same to 5e-7 here.
        Entries stay in input column order (a duplicated gene at its first column).
        """
        counts = to_csr(counts)
        data = counts.data.astype(np.float32, copy=False)
        check_expression_values(data)
        if log2:
            data = data * np.float32(np.log(2))  # log2(1 + x) -> ln(1 + x)
        indptr = counts.indptr.astype(np.int64)
        indices = mapping.column_to_matched[counts.indices]
        linear, scale = data, None
        if log_normalized:
            linear = np.expm1(data)
            total = float(linear.sum(dtype=np.float64))
            totals = np.full(counts.shape[0], np.nan, np.float32)
        else:
            totals = sp.csr_matrix((data, counts.indices, indptr), shape=counts.shape) @ np.ones(counts.shape[1], np.float32)
            scale = np.divide(self.target_sum, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
            total = float(totals.sum(dtype=np.float64))
        all_matched = len(mapping.columns) == counts.shape[1]
        matched = total if all_matched else float(linear.sum(dtype=np.float64, where=indices >= 0))
        if mapping.coverage.n_duplicated:
            values = linear if log_normalized else data * np.repeat(scale, np.diff(indptr))
            rank = np.empty(len(mapping.vocab_ids), np.int32)  # matched gene -> its place in first-column order
            rank[mapping.by_first_column] = np.arange(len(mapping.vocab_ids), dtype=np.int32)
            selector = sp.csr_matrix(
                (np.ones(len(mapping.columns), np.float32), (mapping.columns, rank[mapping.column_to_matched[mapping.columns]])),
                shape=(counts.shape[1], len(mapping.vocab_ids)),
            )
            summed = sp.csr_matrix((values, counts.indices, indptr), shape=counts.shape) @ selector
            summed.sort_indices()  # first-column order, as without duplicates, so ties stay deterministic
            indptr, values = summed.indptr.astype(np.int64), np.log(summed.data + np.float32(1))
            indices = mapping.by_first_column[summed.indices]
        else:
            if not all_matched:
                indptr, indices, data = drop_entries(indptr, indices, data, indices >= 0)
            values = data if log_normalized else log1p_scaled(data, np.repeat(scale, np.diff(indptr)))
        if not values.all():  # explicit zeros (or underflow) would otherwise count as expressed
            indptr, indices, values = drop_entries(indptr, indices, values, values != 0)
        matrix = sp.csr_matrix((values, indices.astype(np.int32), indptr), shape=(counts.shape[0], len(mapping.vocab_ids)))
        return matrix, matched, total, totals

    def _encode_chunk(self, matrix, mapping, gene_selection, limit, rng, start) -> EncodedChunk:
        indptr, indices, values = matrix.indptr.astype(np.int64), matrix.indices, matrix.data
        lengths = np.diff(indptr)
        truncate = gene_selection != "all" and len(lengths) > 0 and lengths.max() > limit
        ranking = None
        if self.binning == "quantile_per_cell" or (truncate and rng is None):
            ranking = value_ranking(indptr, values)
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


def value_ranking(indptr: np.ndarray, values: np.ndarray) -> RowRanking:
    """Each row's log1p values ranked on the fixed 1/4096 grid (so ties do not depend on chunking)."""
    quantised = np.minimum(values, np.float32(QUANT_MAX / QUANT_SCALE))
    quantised *= np.float32(QUANT_SCALE)
    return RowRanking(indptr, quantised.astype(np.uint32))


def obs_labels(obs, column: str, label2id: dict | None = None) -> np.ndarray:
    """An `obs` column -> int64 labels: `label2id` if given, category codes, integers as they are, else sorted names."""
    if column not in obs.columns:
        raise KeyError(f"label_column {column!r} is not an obs column; available: {list(obs.columns)}")
    values = obs[column]
    n_missing = int(values.isna().sum())
    if n_missing:
        raise ValueError(f"obs[{column!r}] has {n_missing} missing labels; drop those cells first (adata[~adata.obs[{column!r}].isna()]).")
    if label2id is not None:
        missing = sorted({str(v) for v in values if v not in label2id})
        if missing:
            raise KeyError(f"Labels missing from label2id: {missing[:10]}")
        return np.array([label2id[v] for v in values], dtype=np.int64)
    if str(values.dtype) == "category":
        return np.asarray(values.cat.codes, dtype=np.int64)
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    return np.unique(array.astype(str), return_inverse=True)[1].astype(np.int64)


def check_cells(adata) -> None:
    """A clear error for what is not a tokenizable AnnData: another type, or no X. (No cells is fine: an empty batch.)"""
    if not all(hasattr(adata, name) for name in ("X", "var", "n_obs")):
        raise TypeError(
            f"Expected an AnnData (or an .h5ad path), got {type(adata).__module__}.{type(adata).__name__}. Wrap a "
            "matrix with its gene names: anndata.AnnData(X, var=pandas.DataFrame(index=gene_names))."
        )
    if adata.X is None:
        raise ValueError("adata.X is None: put the counts in X first (e.g. adata.X = adata.layers['counts']).")


class ExpressionSource:
    """An AnnData's cells with another matrix as X: one of its layers, or `.raw` (with `.raw`'s genes)."""

    def __init__(self, adata, layer: str | None, use_raw: bool):
        self.obs, self.obs_names, self.uns, self.n_obs = adata.obs, adata.obs_names, adata.uns, adata.n_obs
        self.isbacked = getattr(adata, "isbacked", False)
        if use_raw:
            self.X, self.var = adata.raw.X, adata.raw.var
        else:
            self.X, self.var = adata.layers[layer], adata.var
        self.var_names, self.n_vars = self.var.index, len(self.var)


class GenePanel:
    """An AnnData (or `ExpressionSource`) restricted to some of its gene columns, read chunk by chunk."""

    class _Rows:
        def __init__(self, matrix, columns: np.ndarray):
            self.matrix, self.columns = matrix, columns
            self.shape = (matrix.shape[0], len(columns))

        def __getitem__(self, rows):
            return to_csr(to_csr(self.matrix[rows])[:, self.columns])

    def __init__(self, adata, columns: np.ndarray):
        self.obs, self.obs_names, self.uns, self.n_obs = adata.obs, adata.obs_names, adata.uns, adata.n_obs
        self.isbacked = getattr(adata, "isbacked", False)
        self.X, self.var = self._Rows(adata.X, columns), adata.var.iloc[columns]
        self.var_names, self.n_vars = self.var.index, len(columns)


def expression_source(adata, layer: str | None, use_raw: bool):
    """`adata` itself, or an `ExpressionSource` reading `layers[layer]` / `.raw`; clear errors when they are absent."""
    if layer is not None and use_raw:
        raise ValueError("Pass layer= or use_raw=True, not both: they name two different expression matrices.")
    if use_raw and getattr(adata, "raw", None) is None:
        raise ValueError("use_raw=True, but adata.raw is None: leave out use_raw=True to read X"
                         + (f", or read a layer (one of {list(adata.layers)}: layer=NAME)." if adata.layers else "."))
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer {layer!r} is not in adata.layers (it has {list(adata.layers) or 'none'}); "
                       + ("pass one of those, or " if adata.layers else "") + "leave out the layer to read X.")
    return adata if layer is None and not use_raw else ExpressionSource(adata, layer, use_raw)


def counts_hint(adata, rows: int = 64) -> str:
    """Where `adata` keeps raw counts besides a log-normalised X: a layer or `.raw` whose first cells hold non-negative
    integers, some above 1 (a 0/1 mask is not counts), named with the argument (and flag) that reads it; "" if none."""
    candidates = {f"layer={name!r} (--layer {name})": matrix for name, matrix in adata.layers.items()}
    if getattr(adata, "raw", None) is not None:
        candidates["use_raw=True (--use-raw)"] = adata.raw.X
    for argument, matrix in candidates.items():
        try:
            values = to_csr(matrix[: min(rows, adata.n_obs)])
        except (TypeError, ValueError):
            continue
        data = values.data
        if data.size and data.min() >= 0 and data.max() > 1 and np.array_equal(data, np.round(data)):
            return f"Raw counts seem to be there too: pass {argument} to read them instead."
    return ""


def read_chunks(adata, chunk_size: int, first):
    """(first cell, counts) per chunk of `chunk_size` cells, in order; `first` is the first chunk, already read.
    A backed file is read in blocks of `BACKED_READ_CHUNKS` chunks, each cut into chunks in memory; an in-memory X
    is sliced chunk by chunk."""
    block_cells = chunk_size * (BACKED_READ_CHUNKS if getattr(adata, "isbacked", False) else 1)
    for block_start in range(0, adata.n_obs, block_cells):
        if block_cells == chunk_size:
            yield block_start, first if block_start == 0 else adata.X[block_start : block_start + chunk_size]
            continue
        block = to_csr(adata.X[block_start : block_start + block_cells])
        for offset in range(0, block.shape[0], chunk_size):
            yield block_start + offset, block[offset : offset + chunk_size]


@contextlib.contextmanager
def opened(adata) -> Iterator:
    """An AnnData as given (checked by `check_cells`), or an .h5ad path opened backed (read only) and closed after."""
    if not isinstance(adata, (str, os.PathLike)):
        check_cells(adata)
        yield adata
        return
    backed = read_h5ad_backed(adata)
    try:
        yield backed
    finally:
        backed.file.close()


def read_h5ad_backed(path):
    """Open an `.h5ad` on disk (backed, read only) so cells are read chunk by chunk."""
    try:
        import anndata
    except ImportError as error:
        raise ImportError("Reading .h5ad files needs anndata: pip install anndata") from error
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file; pass the path of an .h5ad file.")
    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception as error:  # h5py / anndata speak HDF5 ("file signature not found", "bad heap index")
        raise ValueError(f"{path} could not be read as an .h5ad file ({type(error).__name__}: {error}). Is it "
                         "complete (not truncated by a copy or download) and written by anndata?") from error
