"""Cells in, answers out: `embed`, `annotate`, `embed_genes` and `gene_prior` on a user's AnnData.

The scverse-facing layer over the pure-torch model: each function takes an AnnData (in memory, backed, or a path to an
`.h5ad`), a checkpoint (a folder, a Hub id, or a loaded model), tokenizes the cells with the tokenizer saved in the
checkpoint and writes `obsm` / `obs` / `varm`, as `scanpy.tl` functions do.

Inference is exact and fast:
- cells are tokenized a chunk at a time (a backed file is never densified whole), collected into windows of at most
  `WINDOW_TOKENS` tokens, sorted by length within the window and cut into batches under a token budget
  (`max_tokens_per_batch`), so a batch wastes little on padding and peak memory is set by the budget, not the number
  of cells;
- padding is masked everywhere, so a cell's output does not depend on its batch mates, the batch size or the order;
  results go back to input order;
- the model runs in eval mode under `torch.inference_mode`, on SDPA by default; on a GPU, a background thread
  tokenizes the next batches while the device runs the current one (`prefetched`).
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .fileio import TOKENIZER_FOLDER, local_or_hub
from .modeling_scgene import NUM_SPECIAL_TOKENS, ScGeneForCellClassification, ScGenePreTrainedModel
from .tokenization_scgene import ScGeneTokenizer, opened

logger = logging.get_logger(__name__)

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # inference precisions (autocast)
DEFAULT_MAX_TOKENS_PER_BATCH = 16384  # a few hundred MB of activations at d=256; lower it when memory is short
WINDOW_TOKENS = 1 << 21  # cells are length-sorted within windows of about 2M tokens (~25 MB of token arrays)
UNKNOWN_LABEL = "Unknown"
PRIOR_GAP_WARNING = 0.25  # warn when more than this share of a run's gene tokens has no prior row
TRAINING_GENES_FILE = "training_genes.json"  # in a pretrained checkpoint: the vocabulary ids its corpus carried
UNSEEN_GENES_WARNING = 0.5  # warn when more than this share of a run's gene tokens are genes pretraining never saw
# The checkpoint used when no model is given: built by scripts/build_default_checkpoint.py (its README.md is the card).
DEFAULT_CHECKPOINT = Path(__file__).parent / "resources" / "default_model"
# The dual-branch checkpoint trained the same way, whose signed regulation `scgene.regulation` reads by default.
DEFAULT_REGULATION_CHECKPOINT = Path(__file__).parent / "resources" / "dual_branch_model"


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """Loading the encoder from a head checkpoint reports the head's weights as unexpected, which is expected here:
    transformers' loading report and its progress bar are silenced; `load_model` raises on missing weights itself."""
    names = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    loggers = [std_logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    bars = logging.is_progress_bar_enabled()
    for each in loggers:
        each.setLevel(std_logging.ERROR)
    logging.disable_progress_bar()  # no "Loading weights" bar: loading takes a moment, and progress=False means quiet
    try:
        yield
    finally:
        for each, level in zip(loggers, levels):
            each.setLevel(level)
        if bars:
            logging.enable_progress_bar()


def load_checkpoint(auto_class, source: str, **kwargs):
    """`auto_class.from_pretrained(source, **kwargs)`, with one-line errors for what a user can fix: a
    damaged weights file, weights whose shapes the config contradicts, a name that is neither a folder nor a Hub model
    available here."""
    from safetensors import SafetensorError

    try:
        with quiet_transformers_loading():
            return auto_class.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        raise ValueError(f"{source}: model.safetensors is damaged ({error}); save or download the checkpoint "
                         "again.") from None
    except RuntimeError as error:
        if "mismatched_sizes" not in str(error):
            raise
        raise ValueError(f"{source}: the shapes in config.json (hidden_size, intermediate_size, vocab_size, ...) do "
                         "not match the weights in model.safetensors; use the config.json saved with these "
                         "weights.") from None
    except OSError as error:
        if os.path.isdir(source):
            raise
        raise FileNotFoundError(f"{source} is neither a local checkpoint folder nor a Hub model available here "
                                f"({str(error).splitlines()[0]}); check the path.") from None


def load_weights(model_class, source: str, **kwargs):
    """`model_class.from_pretrained(source, **kwargs)` through `load_checkpoint`, refusing a config that describes
    weights the weights file lacks (they would be randomly initialised)."""
    model, info = load_checkpoint(model_class, source, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{model.name_or_path}: config.json describes {len(missing)} weights that model.safetensors lacks "
            f"(e.g. {missing[:3]}): the config and the weights disagree (a config edited by hand?). Use the "
            "config.json saved with these weights; the model would otherwise run with randomly initialised parts."
        )
    return model


def load_model(model, classifier: bool = False, device=None, pooling_layer: int | None = None) -> ScGenePreTrainedModel:
    """A checkpoint path / Hub id or a loaded ScGene model (None: `DEFAULT_CHECKPOINT`) -> the model to run, in eval
    mode on `device`.

    `classifier=False` returns the encoder (`ScGeneModel`: the base model of any head); `classifier=True` needs a
    `ScGeneForCellClassification` checkpoint. `pooling_layer` overrides the checkpoint's read-out layer.
    """
    if model is None:
        if classifier:
            raise ValueError("No cell-type annotator ships with scgene (none beat logistic regression on transfer: "
                             "docs/transfer.md): pass model= a classifier fine-tuned with examples/finetune_cell_type.py.")
        if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
            raise FileNotFoundError(f"The default checkpoint is missing from {DEFAULT_CHECKPOINT}: rebuild it with "
                                    "`python scripts/build_default_checkpoint.py`, or pass a model.")
        model = DEFAULT_CHECKPOINT
    overrides = {} if pooling_layer is None else {"pooling_layer": pooling_layer}
    if overrides and not isinstance(model, (str, os.PathLike)):
        raise ValueError("pooling_layer is applied when loading a checkpoint; on a loaded model set "
                         "model.config.pooling_layer instead (or load it with from_pretrained(path, pooling_layer=...)).")
    if isinstance(model, (str, os.PathLike)):
        model = local_or_hub(model, "a checkpoint is a folder with config.json and model.safetensors")
        auto_class = AutoModelForSequenceClassification if classifier else AutoModel
        if classifier and "ScGeneForCellClassification" not in (load_checkpoint(AutoConfig, model).architectures or []):
            raise ValueError(
                f"{model} is not a cell-type classifier checkpoint (its config names no ScGeneForCellClassification): "
                "loading it as one would add an untrained head. Fine-tune one with examples/finetune_cell_type.py."
            )
        model = load_weights(auto_class, model, **overrides)
    if not is_scgene(model):
        raise TypeError(f"model must be an ScGene checkpoint path, Hub id or ScGene model, got {type(model).__name__}.")
    if classifier:
        if not is_scgene(model, ScGeneForCellClassification):
            raise ValueError(
                f"Annotation needs a cell-type classifier (ScGeneForCellClassification), got {type(model).__name__}: "
                "fine-tune one with examples/finetune_cell_type.py."
            )
    else:
        model = model.base_model
    model.training_genes = training_genes(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def is_scgene(model, kind: type = ScGenePreTrainedModel) -> bool:
    """Whether `model` is a ScGene model of `kind`, built by this package's classes or by a checkpoint's copy of them
    (remote code, as the `cell-embedding` pipeline loads): compared by class name, not identity."""
    return any(cls.__name__ == kind.__name__ and cls.__module__.rsplit(".", 1)[-1] == "modeling_scgene"
               for cls in type(model).__mro__)


def training_genes(model: ScGenePreTrainedModel) -> torch.Tensor | None:
    """(vocab_size,) bool: the genes the checkpoint was pretrained on, from its `training_genes.json`; None without."""
    path = os.path.join(str(getattr(model, "name_or_path", "") or ""), TRAINING_GENES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        ids = json.load(handle)["gene_ids"]
    mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    mask[torch.as_tensor(ids, dtype=torch.long)] = True
    return mask


def load_tokenizer(tokenizer, model: ScGenePreTrainedModel) -> ScGeneTokenizer:
    """`tokenizer` (an ScGeneTokenizer or a folder / Hub id), or by default the one saved with the checkpoint, with the
    settings it was saved with. Its vocabulary must be the model's."""
    if tokenizer is None:
        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if not source:
            raise ValueError(
                "This model was not loaded from a checkpoint, so there is no saved tokenizer: pass tokenizer= "
                "(the ScGeneTokenizer the model was trained with)."
            )
        try:
            tokenizer = ScGeneTokenizer.from_pretrained(source)
        except OSError as error:
            raise ValueError(
                f"No tokenizer saved with the checkpoint {source} (preprocessor_config.json): pass "
                "tokenizer= (the ScGeneTokenizer or folder the model was trained with)."
            ) from error
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = ScGeneTokenizer.from_pretrained(local_or_hub(tokenizer, TOKENIZER_FOLDER))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}: "
            "gene ids would point at the wrong genes. Use the tokenizer saved with the checkpoint."
        )
    if model.config.expression_encoding == "binned" and tokenizer.n_bins != model.config.n_bins:
        raise ValueError(
            f"The tokenizer makes {tokenizer.n_bins} expression bins but the model expects {model.config.n_bins}: use "
            "the tokenizer saved with the checkpoint."
        )
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Length-sorted, token-budget batches
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CellBatch:
    """Padded model inputs of some cells and their positions in the input."""

    cells: np.ndarray  # (B,) input row of each cell
    inputs: dict[str, torch.Tensor]  # (B, G) each


def padded_batch(flat: dict[str, np.ndarray], starts: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows `flat[name][start : start + length]` of each token array as (B, longest) tensors padded with 0 (the <pad>
    id, value and bin), plus the attention mask; the gather positions are computed once for all arrays."""
    positions = np.arange(int(lengths.max()))
    real = positions[None, :] < lengths[:, None]  # (B, G)
    gather = np.where(real, starts[:, None] + positions[None, :], 0)
    dtypes = {"input_ids": torch.long, "expression_values": torch.float32, "expression_bins": torch.long}
    batch = {name: torch.from_numpy(np.where(real, flat[name][gather], 0)).to(dtypes[name]) for name in dtypes}
    batch["attention_mask"] = torch.from_numpy(real).long()
    return batch


def plan_batches(lengths: np.ndarray, max_tokens: int, max_cells: int | None) -> list[np.ndarray]:
    """Cells sorted by decreasing length (ties by input order), cut so that cells x longest <= max_tokens (a cell longer
    than the budget goes alone) and at most `max_cells` cells per batch."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, max_tokens // longest)
        if max_cells:
            size = min(size, max_cells)
        batches.append(order[start : start + size])
        start += size
    return batches


def iter_batches(tokenizer, adata, max_tokens: int, max_cells: int | None, encode_kwargs) -> Iterator[CellBatch]:
    """Tokenize `adata` chunk by chunk and yield length-sorted batches (CPU tensors), window by window (see the module
    docstring)."""
    window, window_tokens = [], 0

    def flush():
        starts = np.concatenate([np.concatenate([[0], np.cumsum(c.lengths)[:-1]]) for c in window]).astype(np.int64)
        offsets = np.cumsum([0] + [len(c.input_ids) for c in window[:-1]])
        starts += np.repeat(offsets, [len(c.lengths) for c in window])
        lengths = np.concatenate([c.lengths for c in window])
        cells = np.concatenate([np.arange(c.start, c.start + len(c.lengths)) for c in window])
        flat = {name: np.concatenate([getattr(c, name) for c in window]) for name in ("input_ids", "expression_values", "expression_bins")}
        for rows in plan_batches(lengths, max_tokens, max_cells):
            yield CellBatch(cells[rows], padded_batch(flat, starts[rows], lengths[rows]))

    for chunk in tokenizer.iter_encoded(adata, **encode_kwargs):
        window.append(chunk)
        window_tokens += len(chunk.input_ids)
        if window_tokens >= WINDOW_TOKENS:
            yield from flush()
            window, window_tokens = [], 0
    if window:
        yield from flush()


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, in order, produced by a background thread at most `depth` ahead of the consumer: on a GPU, the CPU
    tokenizes the next batches while the device runs this one. An exception in the producer is raised here; a consumer
    that stops early stops the producer."""
    import queue
    import threading

    box, stop, finished = queue.Queue(maxsize=depth), threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(finished)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)

    producer = threading.Thread(target=produce, name="scgene-prefetch", daemon=True)
    producer.start()
    try:
        while (item := box.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        producer.join()


def on_device(batches: Iterator[CellBatch], device: torch.device) -> Iterator[CellBatch]:
    """CPU batches moved to `device`. On a GPU they are made (and pinned) by a background thread while the device runs
    the batch before, and copied without blocking."""
    if device.type == "cpu":
        yield from batches
        return
    if device.type == "cuda":
        batches = prefetched(CellBatch(batch.cells, {name: tensor.pin_memory() for name, tensor in batch.inputs.items()})
                             for batch in batches)
    for batch in batches:
        yield CellBatch(batch.cells, {name: tensor.to(device, non_blocking=True) for name, tensor in batch.inputs.items()})


@dataclass
class PriorCoverage:
    """How many of the gene tokens a run fed the model have a prior row (a gene identity the model knows)."""

    gene_tokens: int = 0
    without_prior: int = 0
    unseen_in_training: int | None = None  # gene tokens of genes pretraining never saw (None: no record)

    @property
    def share_without_prior(self) -> float:
        return self.without_prior / self.gene_tokens if self.gene_tokens else 0.0

    def report(self) -> None:
        message = (f"{self.share_without_prior:.1%} of the {self.gene_tokens} gene tokens have no prior row: the model "
                   "sees their expression but not which genes they are")
        if self.share_without_prior > PRIOR_GAP_WARNING:
            logger.warning(message + ". The checkpoint's prior covers few of this file's genes; a prior with the "
                           "knowledge of every vocabulary gene (scgene build-prior, the default --knowledge-genes "
                           "vocabulary) avoids it.")
        else:
            logger.info(message + ".")
        if self.unseen_in_training is not None and self.gene_tokens:
            share = self.unseen_in_training / self.gene_tokens
            (logger.warning if share > UNSEEN_GENES_WARNING else logger.info)(
                f"{share:.1%} of the gene tokens are genes the checkpoint's pretraining corpus never held"
                + (": the model meets them untrained; expect a weaker embedding." if share > UNSEEN_GENES_WARNING
                   else "."))

    def to_dict(self) -> dict:
        shares = {"gene_tokens": self.gene_tokens, "share_without_prior": round(self.share_without_prior, 4)}
        if self.unseen_in_training is not None and self.gene_tokens:
            shares["share_unseen_in_training"] = round(self.unseen_in_training / self.gene_tokens, 4)
        return shares


def run_record(model: ScGenePreTrainedModel, tokenizer: ScGeneTokenizer, coverage: PriorCoverage, **extra) -> dict:
    """What produced a result, for `uns`: the checkpoint, the tokenizer settings and both coverages (h5ad-writable)."""
    from . import __version__

    settings = {key: value for key, value in tokenizer.to_dict().items()
                if key not in ("vocab", "auto_map", "bin_edges") and value is not None}
    record = {"model": str(getattr(model, "name_or_path", "") or "in-memory model"), "scgene_version": __version__,
              "tokenizer": settings, "gene_coverage": str(tokenizer.last_coverage or "not measured"),
              "prior_coverage": coverage.to_dict()}
    return record | {key: value for key, value in extra.items() if value is not None}


def run_over_cells(
    model: ScGenePreTrainedModel,
    tokenizer: ScGeneTokenizer,
    adata,
    consume: Callable[[CellBatch, object], None],
    *,
    batch_size: int | None,
    max_tokens_per_batch: int | None,
    progress: bool,
    description: str,
    encode_kwargs: dict,
    model_kwargs: dict | None = None,
    dtype: str | None = None,
    torch_compile: bool = False,
) -> PriorCoverage:
    """Run `model` over every cell of `adata` in token-budget batches (`model_kwargs` go to its forward);
    `consume(batch, outputs)` gets each result. `dtype` "bfloat16" / "float16" runs the forward under autocast
    (matrix products in that precision; the weights, the frozen prior and the norms stay float32). `torch_compile`
    runs the forward through `torch.compile(model, dynamic=True, fullgraph=True)`: one graph, no breaks, for every
    batch shape.
    Returns (and logs, as a warning when high) the share of gene tokens without a prior row."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive number of cells, got {batch_size!r}.")
    if max_tokens_per_batch is not None and (not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
        raise ValueError(f"max_tokens_per_batch must be a positive number of tokens, got {max_tokens_per_batch!r}.")
    if "seed" in encode_kwargs:
        raise ValueError("Inference keeps each cell's highest-expressed genes; gene sampling (seed=) is for training data.")
    if (dtype or "float32") not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if max_tokens_per_batch is None:
        max_tokens_per_batch = np.iinfo(np.int64).max if batch_size else DEFAULT_MAX_TOKENS_PER_BATCH
    device = next(model.parameters()).device
    has_prior = model.get_gene_prior().detach().abs().sum(dim=1) > 0  # (V,)
    trained = getattr(model, "training_genes", None)
    trained = None if trained is None else trained.to(device)
    coverage = PriorCoverage(unseen_in_training=None if trained is None else 0)
    batches = on_device(iter_batches(tokenizer, adata, max_tokens_per_batch, batch_size,
                                     encode_kwargs | {"progress": False}), device)
    precision = DTYPES[dtype or "float32"]
    forward = torch.compile(model, dynamic=True, fullgraph=True) if torch_compile else model
    autocast = torch.autocast(device.type, dtype=precision) if precision else contextlib.nullcontext()
    with torch.inference_mode(), autocast, tqdm(total=adata.n_obs, unit="cells", desc=description, disable=not progress) as bar:
        for batch in batches:
            ids = batch.inputs["input_ids"]
            genes = (ids >= NUM_SPECIAL_TOKENS) & batch.inputs["attention_mask"].bool()  # (B, G)
            coverage.gene_tokens += int(genes.sum())
            coverage.without_prior += int((genes & ~has_prior[ids]).sum())
            if trained is not None:
                coverage.unseen_in_training += int((genes & ~trained[ids]).sum())
            consume(batch, forward(**batch.inputs, return_dict=True, **(model_kwargs or {})))
            bar.update(len(batch.cells))
    coverage.report()
    return coverage


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def embed(
    adata,
    model=None,
    *,
    tokenizer=None,
    key_added: str | None = "X_scgene",
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    device=None,
    pooling_layer: int | None = None,
    dtype: str | None = None,
    torch_compile: bool = False,
    out=None,
    progress: bool = True,
    **tokenize_kwargs,
) -> np.ndarray:
    """Cell embeddings (the model's `pooler_output`) -> `adata.obsm[key_added]`, float32, one row per cell in input order.

    `model`: a checkpoint folder, Hub id or loaded ScGene model (any head; its encoder is used); by default the
    checkpoint that ships with scgene (`DEFAULT_CHECKPOINT`). `tokenizer`: by default
    the one saved with the checkpoint, with its saved settings; `tokenize_kwargs` (`gene_selection`, `max_length`,
    `top_k`, `gene_column`, `layer`, `use_raw`, and `genes`: read only these genes, normalised over them) override
    them. `max_tokens_per_batch` (default 16,384) bounds memory; `batch_size` caps cells
    per batch. `pooling_layer` reads another layer than the checkpoint's (-2: the second-to-last). A path is read backed
    and never written: the embeddings are returned. Results do not depend on `batch_size`, `max_tokens_per_batch`, cell
    order or batch mates. `dtype` "bfloat16" or "float16" runs under autocast (faster on GPUs; measured to agree with
    float32 at cosine >= 0.999 per cell). `torch_compile=True` compiles the forward once (`torch.compile`, dynamic
    shapes): it pays off on large inputs, mostly on GPUs. `out`: an array-like of shape (cells, hidden_size) (an h5py dataset, a
    numpy memmap) that each batch is written into as it comes, instead of an array in memory; it is returned, and
    `obsm` is left alone (`uns` still gets the record).
    """
    encoder = load_model(model, classifier=False, device=device, pooling_layer=pooling_layer)
    tokenizer = load_tokenizer(tokenizer, encoder)
    embeddings, coverage, _ = embeddings_and_coverage(adata, encoder, tokenizer, batch_size=batch_size,
                                                      max_tokens_per_batch=max_tokens_per_batch, progress=progress,
                                                      dtype=dtype, torch_compile=torch_compile, out=out,
                                                      **tokenize_kwargs)
    if key_added and not isinstance(adata, (str, os.PathLike)):
        if out is None:
            adata.obsm[key_added] = embeddings
        adata.uns[key_added] = run_record(encoder, tokenizer, coverage, pooling_layer=pooling_layer, dtype=dtype,
                                           torch_compile=torch_compile or None)
    return embeddings


def embeddings_and_coverage(adata, encoder, tokenizer, *, batch_size, max_tokens_per_batch, progress, dtype=None,
                            torch_compile=False, out=None, **tokenize_kwargs) -> tuple[np.ndarray, PriorCoverage, np.ndarray]:
    """`embed`'s work on a loaded encoder and tokenizer: the embeddings (written into `out` when given), the prior
    coverage of their tokens, and whether each cell had counts on any gene it was read on."""
    with opened(adata) as cells:
        shape = (cells.n_obs, encoder.config.hidden_size)
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; the embeddings need {shape} (cells, hidden_size).")
        embeddings = np.zeros(shape, np.float32) if out is None else out
        rows = embeddings if isinstance(embeddings, np.ndarray) else InOrderWriter(embeddings)
        has_counts = np.zeros(cells.n_obs, bool)

        def consume(batch, outputs):
            rows[batch.cells] = outputs.pooler_output.float().cpu().numpy()
            ids, values = batch.inputs["input_ids"], batch.inputs["expression_values"]
            has_counts[batch.cells] = ((ids >= NUM_SPECIAL_TOKENS) & (values != 0)).any(dim=1).cpu().numpy()

        coverage = run_over_cells(encoder, tokenizer, cells, consume, batch_size=batch_size,
                                  max_tokens_per_batch=max_tokens_per_batch, progress=progress, description="Embedding",
                                  encode_kwargs=tokenize_kwargs, dtype=dtype, torch_compile=torch_compile)
    return embeddings, coverage, has_counts


class InOrderWriter:
    """Rows arriving in any order, written to `target` (e.g. an HDF5 dataset) in contiguous slabs, in input order:
    a row waits in a buffer until every row before it has come. Batches come window by window (`iter_batches`), so
    the buffer holds at most about one window's cells."""

    def __init__(self, target):
        self.target, self.written = target, 0  # rows before `written` are in target
        self.buffer = np.zeros((1024, target.shape[1]), np.float32)  # row written + i at buffer[start + i]
        self.filled = np.zeros(1024, bool)
        self.start = 0

    def __setitem__(self, rows: np.ndarray, values: np.ndarray) -> None:
        positions = self.start + rows - self.written
        if positions.max() >= len(self.filled):
            self.compact(int(positions.max()) + 1 - self.start)
            positions = self.start + rows - self.written
        self.buffer[positions], self.filled[positions] = values, True
        pending = self.filled[self.start :]
        ready = len(pending) if pending.all() else int(np.argmin(pending))
        if ready:
            self.target[self.written : self.written + ready] = self.buffer[self.start : self.start + ready]
            self.filled[self.start : self.start + ready] = False
            self.written, self.start = self.written + ready, self.start + ready

    def compact(self, needed: int) -> None:
        """Move the waiting rows to the front of a buffer with room for `needed` of them."""
        size = max(len(self.filled), 2 * needed)
        buffer, filled = np.zeros((size, self.buffer.shape[1]), np.float32), np.zeros(size, bool)
        waiting = len(self.filled) - self.start
        buffer[:waiting], filled[:waiting] = self.buffer[self.start :], self.filled[self.start :]
        self.buffer, self.filled, self.start = buffer, filled, 0


def annotate(
    adata,
    model=None,
    *,
    tokenizer=None,
    key_added: str = "scgene_label",
    min_confidence: float | None = None,
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    device=None,
    progress: bool = True,
    **tokenize_kwargs,
) -> pd.DataFrame:
    """Cell-type labels from a `ScGeneForCellClassification` checkpoint.

    Writes `obs[key_added]` (categorical, names from the model's `id2label`), `obs[key_added + "_confidence"]` (the
    highest class probability, calibrated by the checkpoint's `classifier_temperature`) and `obsm[key_added + "_probabilities"]` (columns in `id2label` order, listed in
    `uns[key_added]["labels"]`). Cells whose confidence is below `min_confidence` are labelled "Unknown" (a type the
    classifier never saw), and so are cells without counts on vocabulary genes (confidence 0), with a warning. Returns the two obs columns as a DataFrame (also for a path, which is never written).
    """
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence is a probability between 0 and 1, got {min_confidence}.")
    classifier = load_model(model, classifier=True, device=device)
    tokenizer = load_tokenizer(tokenizer, classifier)
    names = [str(classifier.config.id2label[i]) for i in range(classifier.config.num_labels)]
    with opened(adata) as cells:
        probabilities = np.zeros((cells.n_obs, len(names)), np.float32)
        expressed_genes = np.zeros(cells.n_obs, np.int64)
        obs_names = cells.obs_names.copy()

        temperature = classifier.config.classifier_temperature

        def consume(batch, outputs):
            probabilities[batch.cells] = torch.softmax(outputs.logits.float() / temperature, dim=-1).cpu().numpy()
            ids, values = batch.inputs["input_ids"], batch.inputs["expression_values"]
            expressed_genes[batch.cells] = ((ids >= NUM_SPECIAL_TOKENS) & (values != 0)).sum(dim=1).cpu().numpy()

        coverage = run_over_cells(classifier, tokenizer, cells, consume, batch_size=batch_size,
                                  max_tokens_per_batch=max_tokens_per_batch, progress=progress, description="Annotating",
                                  encode_kwargs=tokenize_kwargs)
    confidence = probabilities.max(axis=1) if len(names) else np.zeros(len(probabilities), np.float32)
    labels = np.asarray(names, dtype=object)[probabilities.argmax(axis=1)] if len(probabilities) else np.array([], object)
    categories = list(names)
    empty = expressed_genes == 0  # no counts on vocabulary genes: the classifier would still name a type
    if empty.any():
        logger.warning(f"{int(empty.sum())} cells have no counts on the vocabulary's genes: labelled "
                       f"{UNKNOWN_LABEL!r} with confidence 0.")
        confidence = np.where(empty, 0.0, confidence).astype(np.float32)
    if min_confidence is not None or empty.any():
        labels = np.where(empty | (confidence < (min_confidence or 0)), UNKNOWN_LABEL, labels)
        categories = categories + ([UNKNOWN_LABEL] if UNKNOWN_LABEL not in categories else [])
    result = pd.DataFrame(
        {key_added: pd.Categorical(labels, categories=categories), f"{key_added}_confidence": confidence},
        index=obs_names,
    )
    if not isinstance(adata, (str, os.PathLike)):
        for column in result.columns:
            adata.obs[column] = result[column].values
        adata.obsm[f"{key_added}_probabilities"] = probabilities
        adata.uns[key_added] = {"labels": names} | run_record(classifier, tokenizer, coverage,
                                                              min_confidence=min_confidence)
    return result


def embed_genes(
    adata,
    model=None,
    *,
    tokenizer=None,
    key_added: str | None = "X_scgene_genes",
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    device=None,
    progress: bool = True,
    **tokenize_kwargs,
) -> pd.DataFrame:
    """Contextual gene embeddings: each gene's last-layer state averaged over the cells that express it.

    Writes `varm[key_added]` (n_vars x hidden_size; NaN for genes outside the vocabulary or never expressed) and
    `var[key_added + "_n_cells"]` (cells averaged over). Returns a DataFrame of the expressed genes (index: the input's
    gene names). Duplicated input genes share their summed row, as in tokenization.
    """
    encoder = load_model(model, classifier=False, device=device)
    tokenizer = load_tokenizer(tokenizer, encoder)
    hidden = encoder.config.hidden_size
    sums = torch.zeros(encoder.config.vocab_size, hidden, dtype=torch.float64, device=encoder.device)
    counts = torch.zeros(encoder.config.vocab_size, dtype=torch.float64, device=encoder.device)

    def consume(batch, outputs):
        ids, values = batch.inputs["input_ids"], batch.inputs["expression_values"]
        expressed = (ids >= NUM_SPECIAL_TOKENS) & (values != 0) & batch.inputs["attention_mask"].bool()  # (B, G)
        sums.index_add_(0, ids[expressed], outputs.last_hidden_state[expressed].double())
        counts.index_add_(0, ids[expressed], torch.ones_like(ids[expressed], dtype=torch.float64))

    with opened(adata) as cells:
        run_over_cells(encoder, tokenizer, cells, consume, batch_size=batch_size,
                       max_tokens_per_batch=max_tokens_per_batch, progress=progress, description="Embedding genes",
                       encode_kwargs=tokenize_kwargs)
        per_gene, n_cells = gene_rows(cells, tokenizer, (sums / counts.clamp(min=1)[:, None]).float().cpu().numpy(),
                                      counts.cpu().numpy(), tokenize_kwargs.get("gene_column"))
        var_names = cells.var_names.copy()
    per_gene[n_cells == 0] = np.nan
    if key_added and not isinstance(adata, (str, os.PathLike)):
        adata.varm[key_added] = per_gene
        adata.var[f"{key_added}_n_cells"] = n_cells.astype(np.int64)
    expressed = n_cells > 0
    return pd.DataFrame(per_gene[expressed], index=var_names[expressed]).assign(n_cells=n_cells[expressed].astype(np.int64))


def gene_prior(model=None, *, tokenizer=None, adata=None, key_added: str | None = "X_scgene_prior") -> pd.DataFrame:
    """The static prior gene embedding of every vocabulary gene that has one (a non-zero row), as a DataFrame indexed by
    symbol (Ensembl id where a gene has no symbol) with an `ensembl_id` column. With `adata`, also writes its genes'
    rows to `adata.varm[key_added]` (NaN where a gene has no prior)."""
    encoder = load_model(model, classifier=False, device="cpu")
    tokenizer = load_tokenizer(tokenizer, encoder)
    prior = encoder.get_gene_prior().detach().float().cpu().numpy()
    has_prior = np.abs(prior).sum(axis=1) > 0
    has_prior[:NUM_SPECIAL_TOKENS] = False
    ids = np.flatnonzero(has_prior)
    names = tokenizer.convert_ids_to_genes(ids)
    table = pd.DataFrame(prior[ids], index=pd.Index(names, name="gene"))
    table.insert(0, "ensembl_id", [tokenizer.ensembl_ids[i] for i in ids])
    if adata is not None and key_added:
        rows, with_prior = gene_rows(adata, tokenizer, prior, has_prior.astype(np.float64), None)
        rows[with_prior == 0] = np.nan
        adata.varm[key_added] = rows
    return table


def gene_rows(adata, tokenizer, per_id: np.ndarray, weight_per_id: np.ndarray, gene_column):
    """Per-vocabulary-id rows -> one row per input gene (NaN for unmatched genes), and each gene's weight (0 unmatched)."""
    mapping = tokenizer.map_genes(adata, gene_column)
    rows = np.full((adata.n_vars, per_id.shape[1]), np.nan, np.float32)
    weight = np.zeros(adata.n_vars)
    matched = mapping.column_to_matched >= 0
    ids = mapping.vocab_ids[mapping.column_to_matched[matched]]
    rows[matched] = per_id[ids]
    weight[matched] = weight_per_id[ids]
    return rows, weight
