"""Signed gene regulation: the gene × gene network a dual-branch checkpoint holds for a set of cells.

Seed 001's dual-branch encoder regulates each layer's expression attention with a signed map from the gene branch
(`ScGeneRegulatedAttention`): per layer l and head h,

    R_lh[i, j] = λ_h · A_reg[i, j] · tanh(s_h[j])

is how much regulator gene j raises (> 0) or lowers (< 0) the update of target gene i in that cell. The gene branch
reads gene identities only, so R depends on which genes a cell expresses (its tokens), not on how much.

`regulation` turns R into one network per set of cells:
1. per cell, the mean of R over layers and heads (`ScGeneModel` returns R per layer as (cells, heads, G, G));
2. per (regulator, target) pair, the mean over the cells in which both are among the cell's tokens, kept when they
   share at least `min_cells` cells; a gene's regulation of itself is left out;
3. per regulator, the `top_k` targets of largest |weight|.

Memory is bounded by the accumulators, regulators × genes × 8 bytes per group (never genes × genes per cell); pass
`regulators=` (e.g. the transcription factors, `transcription_factors()`) on large gene sets.

The weights are associations a model learned from expression, not causal effects: `scgene.regulation_benchmark`
scores them against curated networks, next to correlation and tree baselines.
"""

from __future__ import annotations

import os
from importlib import resources

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .inference import DEFAULT_REGULATION_CHECKPOINT, load_model, load_tokenizer, run_over_cells, run_record
from .modeling_scgene import NUM_SPECIAL_TOKENS
from .tokenization_scgene import opened

REGULATION_KEY = "scgene_regulation"
NETWORK_COLUMNS = ["source", "target", "weight", "abs_weight", "rank", "cells"]
ACCUMULATOR_BYTES = 8  # a float32 sum and a float32 count per (regulator, target) pair


def collectri() -> pd.DataFrame:
    """CollecTRI, the curated signed human TF -> target network shipped with scgene (`source, target, weight` of
    +1 activation or -1 repression; CC BY 4.0, see `resources/regulation/README.md`)."""
    with resources.files("scgene").joinpath("resources/regulation/collectri.csv.gz").open("rb") as handle:
        return pd.read_csv(handle, compression="gzip")


def transcription_factors() -> list[str]:
    """The 1,186 human transcription factors with curated targets in CollecTRI (`collectri()`'s sources), sorted."""
    return sorted(collectri()["source"].unique())


class GeneIndex:
    """The genes a network can hold: the vocabulary genes `adata` measures, named as in `adata.var_names` (the first
    column of a gene the input has twice), with the vocabulary id -> position map the accumulators use."""

    def __init__(self, adata, tokenizer, gene_column: str | None, vocab_size: int):
        mapping = tokenizer.map_genes(adata, gene_column)
        columns = np.flatnonzero(mapping.column_to_matched >= 0)
        first_column = np.full(len(mapping.vocab_ids), np.iinfo(np.int64).max)
        np.minimum.at(first_column, mapping.column_to_matched[columns], columns)
        self.vocab_ids = mapping.vocab_ids  # (n,) ascending
        self.columns = first_column  # (n,) the adata column of each
        self.names = np.asarray(adata.var_names)[first_column].astype(str)
        self.position = np.full(vocab_size, -1, dtype=np.int64)  # vocabulary id -> index into vocab_ids, -1 if absent
        self.position[self.vocab_ids] = np.arange(len(self.vocab_ids))

    def __len__(self) -> int:
        return len(self.vocab_ids)

    def subset(self, names, tokenizer) -> np.ndarray:
        """Positions (ascending) of the named genes (symbols, Ensembl ids or aliases) that this index holds."""
        ids = [tokenizer._lookup(name) for name in names]
        positions = self.position[[i for i in ids if i is not None]]
        return np.unique(positions[positions >= 0])


class RegulationAccumulator:
    """Sums and counts of the per-cell regulation, (groups, regulators, genes), filled batch by batch."""

    def __init__(self, genes: GeneIndex, regulator_positions: np.ndarray, n_groups: int, max_memory_gb: float):
        needed = n_groups * len(regulator_positions) * len(genes) * ACCUMULATOR_BYTES
        if needed > max_memory_gb * 2**30:
            raise ValueError(
                f"The network of {len(regulator_positions)} regulators x {len(genes)} genes x {n_groups} group(s) needs "
                f"{needed / 2**30:.1f} GB, over max_memory_gb={max_memory_gb}: pass regulators= (e.g. "
                "scgene.transcription_factors()), fewer genes (genes=), or raise max_memory_gb."
            )
        self.n_genes = len(genes)
        self.regulator_of_gene = np.full(len(genes), -1, dtype=np.int64)  # gene position -> regulator row, -1 if none
        self.regulator_of_gene[regulator_positions] = np.arange(len(regulator_positions))
        shape = (n_groups, len(regulator_positions), len(genes))
        self.sums = torch.zeros(shape, dtype=torch.float32)
        self.counts = torch.zeros(shape, dtype=torch.float32)

    def add(self, regulation: torch.Tensor, gene_positions: torch.Tensor, groups: torch.Tensor) -> None:
        """`regulation` (B, G, G): [target i, regulator j] of each cell; `gene_positions` (B, G): each token's gene
        position, -1 for padding, special tokens and unmatched genes; `groups` (B,): each cell's group."""
        regulator_rows = torch.from_numpy(self.regulator_of_gene)[gene_positions.clamp(min=0)]
        regulator_rows[gene_positions < 0] = -1
        targets, regulators = gene_positions[:, :, None], regulator_rows[:, None, :]  # (B, G, 1), (B, 1, G)
        keep = (targets >= 0) & (regulators >= 0) & (gene_positions[:, :, None] != gene_positions[:, None, :])
        rows = groups[:, None, None] * self.sums.shape[1] + regulators  # (B, 1, G)
        flat = (rows * self.n_genes + targets)[keep]  # index into (groups * regulators * genes)
        self.sums.view(-1).index_add_(0, flat, regulation.float()[keep])
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    def top_targets(self, group: int, top_k: int, min_cells: int) -> tuple[np.ndarray, ...]:
        """(regulator row, target position, weight, cells) of each regulator's `top_k` strongest targets seen in at
        least `min_cells` cells, strongest first."""
        counts = self.counts[group]
        weights = torch.where(counts >= min_cells, self.sums[group] / counts.clamp(min=1), torch.zeros(()))
        strength, targets = weights.abs().topk(min(top_k, self.n_genes), dim=1)  # (R, k)
        rows = torch.arange(weights.shape[0])[:, None].expand_as(targets)
        found = strength > 0
        rows, targets = rows[found], targets[found]
        return rows.numpy(), targets.numpy(), weights[rows, targets].numpy(), counts[rows, targets].numpy()


def network_table(accumulator, group, genes, regulator_positions, top_k, min_cells) -> pd.DataFrame:
    """The long table `source, target, weight, abs_weight, rank, cells` of one group (rank 1 = strongest per source)."""
    rows, targets, weights, cells = accumulator.top_targets(group, top_k, min_cells)
    table = pd.DataFrame({"source": genes.names[regulator_positions[rows]], "target": genes.names[targets],
                          "weight": weights, "abs_weight": np.abs(weights), "cells": cells.astype(np.int64)})
    table["rank"] = table.groupby("source", sort=False).cumcount() + 1
    return table[NETWORK_COLUMNS]


def cell_groups(adata, groupby: str | None) -> tuple[np.ndarray, list[str]]:
    """Each cell's group code and the group names (one group of every cell without `groupby`)."""
    if groupby is None:
        return np.zeros(adata.n_obs, dtype=np.int64), ["all"]
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby={groupby!r} is not an obs column; available: {list(adata.obs.columns)}")
    labels = adata.obs[groupby].astype(str).to_numpy()
    names, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64), [str(name) for name in names]


def regulation(
    adata,
    model=None,
    *,
    regulators=None,
    groupby: str | None = None,
    top_k: int = 100,
    min_cells: int = 5,
    key_added: str | None = REGULATION_KEY,
    tokenizer=None,
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    device=None,
    max_memory_gb: float = 4.0,
    progress: bool = True,
    **tokenize_kwargs,
) -> pd.DataFrame:
    """The signed regulator -> target network a dual-branch checkpoint holds for these cells (see the module docstring).

    Returns the long table `source, target, weight, abs_weight, rank, cells` (with `group` first when `groupby` is
    given): `weight` > 0 reads as activation, < 0 as repression; decoupler accepts it as a network unchanged.
    `model`: a dual-branch checkpoint (default: `DEFAULT_REGULATION_CHECKPOINT`, shipped with scgene).
    `regulators`: gene names whose outgoing edges are kept (default: every gene). `top_k` targets per regulator,
    each seen together with it in at least `min_cells` cells. With an AnnData in memory and `key_added`, writes
    `adata.varp[key_added]` (sparse, rows = regulators, columns = targets, over all cells) and
    `adata.uns[key_added]` (the run's settings; with `groupby`, each group's table under "groups").
    Tokenizing and batching are `scgene.embed`'s (`tokenize_kwargs` as there).
    """
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive number of targets per regulator, got {top_k!r}.")
    if not isinstance(min_cells, (int, np.integer)) or min_cells < 1:
        raise ValueError(f"min_cells must be a positive number of cells, got {min_cells!r}.")
    encoder = load_model(DEFAULT_REGULATION_CHECKPOINT if model is None else model, device=device)
    if encoder.config.encoder_type != "dual_branch":
        raise ValueError(
            f"{getattr(encoder, 'name_or_path', 'this model')} is a {encoder.config.encoder_type!r} encoder: signed "
            "regulation comes from the dual-branch encoder (encoder_type='dual_branch'). Leave model= out for the one "
            "shipped with scgene (scgene.DEFAULT_REGULATION_CHECKPOINT), or pretrain one with --encoder_type dual_branch."
        )
    tokenizer = load_tokenizer(tokenizer, encoder)
    with opened(adata) as cells:
        genes = GeneIndex(cells, tokenizer, tokenize_kwargs.get("gene_column"), encoder.config.vocab_size)
        if regulators is None:
            regulator_positions = np.arange(len(genes))
        else:
            regulator_positions = genes.subset([regulators] if isinstance(regulators, str) else list(regulators),
                                               tokenizer)
            if not len(regulator_positions):
                raise ValueError("None of the regulators= genes is measured in adata (matched by symbol, Ensembl id "
                                 "or alias): check the names, or leave regulators= out for every gene.")
        group_codes, group_names = cell_groups(cells, groupby)
        accumulator = RegulationAccumulator(genes, regulator_positions, len(group_names), max_memory_gb)
        position = torch.from_numpy(genes.position)
        group_codes = torch.from_numpy(group_codes)

        def consume(batch, outputs):
            ids = batch.inputs["input_ids"].cpu()
            real = batch.inputs["attention_mask"].cpu().bool() & (ids >= NUM_SPECIAL_TOKENS)
            gene_positions = torch.where(real, position[ids], -1)  # (B, G)
            per_cell = torch.stack(outputs.regulation).float().mean(dim=(0, 2)).cpu()  # L x (B, H, G, G) -> (B, G, G)
            accumulator.add(per_cell, gene_positions, group_codes[torch.from_numpy(batch.cells)])

        coverage = run_over_cells(encoder, tokenizer, cells, consume, batch_size=batch_size,
                                  max_tokens_per_batch=max_tokens_per_batch, progress=progress,
                                  description="Regulation", encode_kwargs=tokenize_kwargs,
                                  model_kwargs={"output_regulation": True})
    tables = {name: network_table(accumulator, index, genes, regulator_positions, top_k, min_cells)
              for index, name in enumerate(group_names)}
    if groupby is None:
        network = tables["all"]
    else:
        network = pd.concat([table.assign(group=name) for name, table in tables.items()], ignore_index=True)
        network = network[["group"] + NETWORK_COLUMNS]
    if key_added and not isinstance(adata, (str, os.PathLike)):
        accumulator.sums, accumulator.counts = accumulator.sums.sum(0, keepdim=True), accumulator.counts.sum(0, keepdim=True)
        overall = tables["all"] if groupby is None else network_table(accumulator, 0, genes, regulator_positions,
                                                                        top_k, min_cells)
        adata.varp[key_added] = varp_matrix(overall, genes, adata.n_vars)
        record = run_record(encoder, tokenizer, coverage, regulators=len(regulator_positions), top_k=top_k,
                            min_cells=min_cells, groupby=groupby,
                            aggregation="mean over layers and heads, then over the cells holding both genes")
        if groupby is not None:
            record["groups"] = {name: table for name, table in tables.items()}
        adata.uns[key_added] = record
    return network


def varp_matrix(table: pd.DataFrame, genes: GeneIndex, n_vars: int) -> sp.csr_matrix:
    """(n_vars, n_vars) sparse: [regulator column, target column] = weight, for the table's edges."""
    column_of = dict(zip(genes.names, genes.columns))
    rows = table["source"].map(column_of).to_numpy(np.int64)
    columns = table["target"].map(column_of).to_numpy(np.int64)
    return sp.csr_matrix((table["weight"].to_numpy(np.float32), (rows, columns)), shape=(n_vars, n_vars))
