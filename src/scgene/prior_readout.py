"""The prior read-out: how much of the frozen prior a checkpoint's cell embedding adds (`prior_readout_weight`).

The cell embedding is the transformer's pooled gene states plus `prior_readout_weight` times the prior pooled the same
way (`ScGeneModel.pool_prior`). The weight is fitted so that both parts spread cells equally, on the pretraining
corpus (never on the data it will be scored on): from AnnData files (`fit_prior_readout_weight`) or from the
tokenized corpus the pretraining script reads (`fit_prior_readout_weight_on_tokens`).
"""

from __future__ import annotations

import numpy as np
import torch

from .inference import (
    DEFAULT_MAX_TOKENS_PER_BATCH,
    CellBatch,
    load_model,
    load_tokenizer,
    padded_batch,
    plan_batches,
    run_over_cells,
)
from .tokenization_scgene import opened


def fit_prior_readout_weight(adata, model=None, *, tokenizer=None, max_cells: int = 2000, seed: int = 0,
                             progress: bool = True, **tokenize_kwargs) -> float:
    """The `prior_readout_weight` (see `ScGeneConfig`) under which the prior's part of the cell embedding spreads the
    cells as much as the transformer's part: the ratio of their root-mean-square distances to their means, over
    `max_cells` cells sampled from `adata` (an AnnData or path, or a list of them pooled: fit it on the pretraining
    corpus). Set it with `model.config.prior_readout_weight = weight` and save the model. For a corpus written by
    `scgene tokenize`, use `fit_prior_readout_weight_on_tokens`."""
    encoder = load_model(model, classifier=False)
    tokenizer = load_tokenizer(tokenizer, encoder)
    files = adata if isinstance(adata, (list, tuple)) else [adata]
    if not files or not isinstance(max_cells, int) or max_cells < 1:
        raise ValueError("fit_prior_readout_weight needs cells: pass an AnnData (or a list of them) and max_cells >= 1.")
    parts = ReadoutParts(encoder)
    for cells_or_path in files:
        with opened(cells_or_path) as cells:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(cells.n_obs, min(cells.n_obs, max(1, max_cells // len(files))), replace=False))
            sample = cells[rows].to_memory() if cells.isbacked else cells[rows]
            run_over_cells(encoder, tokenizer, sample, parts.consume, batch_size=None, max_tokens_per_batch=None,
                           progress=progress, description="Fitting the prior read-out", encode_kwargs=tokenize_kwargs)
    return parts.weight()


def fit_prior_readout_weight_on_tokens(cells, model, *, max_length: int, max_cells: int = 2000,
                                       seed: int = 0) -> float:
    """`fit_prior_readout_weight` on cells already tokenized by `scgene tokenize` (a `datasets.Dataset` with
    `input_ids`, `expression_values`, `expression_bins`; what the pretraining script reads), each cell read as
    inference reads it: its `max_length` - 1 highest-expressed genes after <cls> (ties by vocabulary order). `model`:
    any ScGene model (its encoder is read)."""
    if not isinstance(max_cells, int) or max_cells < 1 or not len(cells):
        raise ValueError("fit_prior_readout_weight_on_tokens needs cells: a non-empty dataset and max_cells >= 1.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(cells), min(len(cells), max_cells), replace=False))
    columns = ("input_ids", "expression_values", "expression_bins")
    sample = cells.select(rows).select_columns(list(columns)).with_format("numpy")
    flat, lengths = {name: [] for name in columns}, []
    for cell in sample:
        genes = np.argsort(-cell["expression_values"][1:], kind="stable")[: max_length - 1] + 1  # <cls> stays first
        keep = np.concatenate([[0], np.sort(genes)])
        for name in columns:
            flat[name].append(np.asarray(cell[name])[keep])
        lengths.append(len(keep))
    flat = {name: np.concatenate(arrays) for name, arrays in flat.items()}
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    encoder, parts, device = model.base_model, ReadoutParts(model), next(model.parameters()).device
    was_training = encoder.training
    encoder.eval()
    with torch.inference_mode():
        for batch in plan_batches(lengths, DEFAULT_MAX_TOKENS_PER_BATCH, None):
            inputs = {name: tensor.to(device) for name, tensor in padded_batch(flat, starts[batch], lengths[batch]).items()}
            parts.consume(CellBatch(batch, inputs), encoder(**inputs, return_dict=True))
    encoder.train(was_training)
    return parts.weight()


class ReadoutParts:
    """The two parts of the cell embeddings of a model, gathered batch by batch: the prior pooled as the gene states
    are, and the rest (the transformer's). `weight()` is the ratio of their spreads."""

    def __init__(self, model):
        self.encoder = model.base_model
        self.current_weight = model.config.prior_readout_weight
        self.prior, self.transformer = [], []

    def consume(self, batch: CellBatch, outputs) -> None:
        inputs = batch.inputs
        prior = self.encoder.pool_prior(inputs["input_ids"], inputs["attention_mask"], inputs["expression_values"])
        self.prior.append(prior.float().cpu().numpy())
        self.transformer.append((outputs.pooler_output - self.current_weight * prior).float().cpu().numpy())

    def weight(self) -> float:
        def spread(rows):
            rows = np.concatenate(rows).astype(np.float64)
            return float(np.sqrt(((rows - rows.mean(axis=0)) ** 2).sum(axis=1).mean()))

        prior_spread = spread(self.prior)
        if not prior_spread > 0:
            raise ValueError("The prior read on these cells does not vary (all prior rows of their genes are zero or "
                             "equal): there is nothing for a prior read-out to add. Check the checkpoint's prior.")
        return spread(self.transformer) / prior_spread
