"""In-silico perturbation: delete, overexpress, set or scale genes in real cells, and read what the model predicts.

How a perturbation is made. A tokenized cell is a list of (gene id, log1p value, bin) tokens, bins being the cell's own
quantiles. `delete` removes a gene's token (its attention mask is set to 0: no token attends to it, the cell embedding
does not pool it); `overexpress` gives it the cell's highest value and the top bin (appending the token when the cell
did not express the gene), as Geneformer moves an overexpressed gene to the front of the rank; `set` gives it a value
(log1p of counts per 10,000, the tokenizer's units) and the bin of the nearest value in that cell; `scale` multiplies
its normalised count. Every other token stays exactly as it was: no rank shifts, no re-binning. `knockout` is `delete`
where a cell expresses the gene. Where it does not (too few counts to be detected, or a gene the file does not measure),
there is no token to remove, so the cell is compared the other way round: a copy with the gene added, at `value` or at
the level the value head predicts for it in that cell (the gene masked), is the reference, and the cell without it the
knocked-out side.

How the change of every gene is predicted. Pretraining taught the value head to predict masked genes from the rest of
the cell. Each cell's gene tokens are split once, at random with `seed`, into `masking_rounds` groups (7: about the 15%
that pretraining masks); in each round one group is masked and predicted from the others. This runs on the cell as it
is (the reference) and on each perturbed copy, with the same groups. The perturbed genes are never masked, in the copy
or in its reference (the reference's round that holds them is run again with them visible). A gene's predicted change
is the copy's prediction minus the reference's, made with the same masks and the same context except the perturbation:
the model's error in reconstructing the cell cancels, and what is left is the effect of the perturbation on the model.
Against the observed values instead, every gene would carry that reconstruction error.

What it is and is not: the head predicts a gene's level in cells that express it (masked tokens were expressed genes),
so changes exist only for each cell's expressed genes (its tokens) and say nothing about genes switching on or off.
They are associations learned from expression, not measured causal effects: `docs/perturbation.md` has the check
against real CRISPR screens, next to simple baselines.

The cell embedding's shift is measured too (1 - cosine with the unperturbed embedding) and, given a start and a goal
state, the move toward the goal (cosine with the goal cells' mean embedding, after minus before), with a Mann-Whitney
test against the other perturbations' shifts and Benjamini-Hochberg FDR, in the columns Geneformer users know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .fileio import local_or_hub
from .gene_regulation import GeneIndex
from .inference import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MAX_TOKENS_PER_BATCH,
    embeddings_and_coverage,
    is_scgene,
    iter_batches,
    load_model,
    load_tokenizer,
    load_weights,
    training_genes,
)
from .modeling_scgene import NUM_SPECIAL_TOKENS, ScGeneForMaskedExpression
from .tokenization_scgene import opened

logger = logging.get_logger(__name__)

MODES = ("delete", "knockout", "overexpress", "set", "scale")
PERTURBATION_KEY = "scgene_perturbation"
SHIFT_COLUMNS = ["cells", "cosine_shift", "cosine_shift_std", "shift_pval", "shift_fdr"]
GOAL_COLUMNS = ["shift_to_goal", "shift_to_goal_std", "goal_pval", "goal_fdr"]
CELLS_PER_BATCH = 8  # cells whose perturbed copies are made together (the copies are then cut by the token budget)


@dataclass
class PerturbationResult:
    """What `perturb` returns.

    `shifts`: one row per perturbation: `cells` perturbed, mean `cosine_shift` (1 - cosine of the cell embedding with
    its unperturbed self) and its std, and `shift_pval` / `shift_fdr` against the other perturbations' shifts; with a
    goal state also `shift_to_goal` (cosine with the goal's mean embedding, after minus before), its std, `goal_pval`,
    `goal_fdr`. `changes`: perturbations x genes, the mean predicted change (log1p units) over the perturbed cells that
    express the gene, NaN where none does; `counts`: over how many cells. `cell_changes` / `cell_shifts`: per cell
    (cells x genes, NaN where not predicted; and the cosine shift), kept for a single perturbation only.
    """

    shifts: pd.DataFrame
    changes: pd.DataFrame | None
    counts: pd.DataFrame | None
    cell_changes: np.ndarray | None = None
    cell_shifts: np.ndarray | None = None
    record: dict = field(default_factory=dict)

    def top_changes(self, n_genes: int = 20, min_cells: int = 3) -> pd.DataFrame:
        """The long table `perturbation, gene, change, cells, rank`: each perturbation's `n_genes` largest |changes|
        among the genes predicted in at least `min_cells` cells (fewer for a perturbation of fewer cells)."""
        if self.changes is None:
            raise ValueError("This run predicted no expression changes (expression=False).")
        table = (self.changes.rename_axis(index="perturbation", columns="gene").stack().rename("change").reset_index()
                 .merge(self.counts.rename_axis(index="perturbation", columns="gene").stack().rename("cells")
                        .reset_index(), on=["perturbation", "gene"]))
        perturbed = table["perturbation"].map(self.shifts["cells"])
        table = table[table["cells"] >= np.minimum(min_cells, perturbed)]
        table["rank"] = table["change"].abs().groupby(table["perturbation"]).rank(method="first", ascending=False)
        table = table[table["rank"] <= n_genes].astype({"rank": int, "cells": int})
        return table.sort_values(["perturbation", "rank"]).reset_index(drop=True)

    def pseudobulk_changes(self, specific: bool = False) -> pd.DataFrame:
        """perturbations x genes: each gene's predicted change summed over the perturbed cells that express it and
        divided by all the perturbed cells, as a screen's pseudobulk change is (0 where not predicted).
        `specific=True` subtracts the mean of the other perturbations' rows: the model's response to any perturbation
        (e.g. "one expressed gene fewer") removed, what is particular to each left. On real screens that part tracks
        the observed changes better than the whole (`docs/perturbation.md`)."""
        if self.changes is None:
            raise ValueError("This run predicted no expression changes (expression=False).")
        cells = self.shifts["cells"].to_numpy()[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            bulk = np.nan_to_num(self.changes.to_numpy() * self.counts.to_numpy() / cells)
        if specific:
            if len(bulk) < 2:
                raise ValueError("specific=True compares each perturbation with the others: run two or more (a list "
                                 "of genes, or genes='all').")
            bulk = bulk - (bulk.sum(0) - bulk) / (len(bulk) - 1)
        return pd.DataFrame(bulk, index=self.changes.index, columns=self.changes.columns)


# ----------------------------------------------------------------------------------------------------------------------
# What to perturb
# ----------------------------------------------------------------------------------------------------------------------


def parse_perturbations(genes, tokenizer, measured: GeneIndex) -> list[tuple[str, list[int]]]:
    """`genes` -> [(name, vocabulary ids)]: a gene, `"A+B"` (together), a list of those (or of tuples), or `"all"`
    (each measured gene alone). Unknown names raise one error listing them."""
    if isinstance(genes, str) and genes == "all":
        return [(name, [int(vocab_id)]) for name, vocab_id in zip(measured.names, measured.vocab_ids)]
    items = [genes] if isinstance(genes, str) else list(genes)
    if not items:
        raise ValueError("genes= names no gene: pass a gene, 'A+B', a list of them, or 'all'.")
    perturbations, unknown = [], []
    for item in items:
        names = item.split("+") if isinstance(item, str) else [str(name) for name in item]
        ids = [tokenizer._lookup(name.strip()) for name in names]
        unknown += [name for name, vocab_id in zip(names, ids) if vocab_id is None]
        perturbations.append(("+".join(name.strip() for name in names), sorted({i for i in ids if i is not None})))
    if unknown:
        raise ValueError(f"{len(unknown)} gene(s) are not in the model's vocabulary: {unknown[:10]}. Use gene symbols "
                         "or Ensembl ids the tokenizer knows.")
    return perturbations


def selected_cells(adata, groupby, groups, state_key, start_state, goal_state) -> tuple[np.ndarray, np.ndarray | None]:
    """(cells to perturb as a bool mask, goal cells or None) from `groupby`/`groups` and the start / goal states."""
    def column(name):
        if name not in adata.obs.columns:
            raise KeyError(f"{name!r} is not an obs column; available: {list(adata.obs.columns)[:20]}")
        return adata.obs[name].astype(str).to_numpy()

    chosen = np.ones(adata.n_obs, bool)
    if groupby is not None:
        if groups is None:
            raise ValueError("groupby= selects the cells of groups=: name the groups to perturb.")
        labels = column(groupby)
        groups = [groups] if isinstance(groups, str) else [str(g) for g in groups]
        missing = sorted(set(groups) - set(labels))
        if missing:
            raise ValueError(f"groups {missing} are not in obs[{groupby!r}]: {sorted(set(labels))[:20]}")
        chosen &= np.isin(labels, groups)
    goal = None
    if (start_state is None) != (goal_state is None) or (state_key is None) != (start_state is None):
        raise ValueError("A move toward a goal needs state_key, start_state and goal_state together.")
    if state_key is not None:
        states = column(state_key)
        for state in (start_state, goal_state):
            if state not in set(states):
                raise ValueError(f"{state!r} is not a value of obs[{state_key!r}]: {sorted(set(states))[:20]}")
        chosen &= states == str(start_state)
        goal = states == str(goal_state)
    if not chosen.any():
        raise ValueError("No cell is selected to perturb: check groupby=/groups= and start_state=.")
    return chosen, goal


# ----------------------------------------------------------------------------------------------------------------------
# Perturbed copies of a batch of cells
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Copies:
    """The perturbed copies of some cells: which cell and perturbation each is, its inputs, and its perturbed tokens."""

    cell_rows: torch.Tensor  # (N,) row of the cell in the batch
    perturbation: torch.Tensor  # (N,) index into the perturbation list
    inputs: dict[str, torch.Tensor]  # (N, W) each
    perturbed: torch.Tensor  # (N, W) bool: tokens the perturbation changed, removed or added


def widened(inputs: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """The batch with `extra` padding columns on the right, where overexpressed genes the cell lacks are added."""
    return {name: F.pad(tensor, (0, extra)) for name, tensor in inputs.items()}


def gene_slots(ids: np.ndarray, perturbations: list[list[int]], extra: int) -> tuple[np.ndarray, np.ndarray]:
    """For every (cell, perturbation): the column of each of its genes in the cell (-1: not a token) and the gene ids
    (-1 past a perturbation's last gene): (B, P, E) each."""
    n_cells, n_perturbations = ids.shape[0], len(perturbations)
    genes = np.full((n_perturbations, extra), -1, np.int64)
    for index, vocab_ids in enumerate(perturbations):
        genes[index, : len(vocab_ids)] = vocab_ids
    # the column of each vocabulary id in each cell: through a sorted copy of the cell's ids
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    slots = np.full((n_cells, n_perturbations, extra), -1, np.int64)
    for row in range(n_cells):
        where = np.searchsorted(sorted_ids[row], genes).clip(max=ids.shape[1] - 1)
        found = (sorted_ids[row][where] == genes) & (genes >= NUM_SPECIAL_TOKENS)
        slots[row] = np.where(found, order[row][where], -1)
    return slots, np.broadcast_to(genes, slots.shape)


def nearest_bins(values: torch.Tensor, bins: torch.Tensor, genes: torch.Tensor, new_values: torch.Tensor,
                 top_bin: int) -> torch.Tensor:
    """(N,) the bin of each new value in its cell: the bin of the cell's nearest value, the top bin above them all."""
    distance = (values - new_values[:, None]).abs().masked_fill(~genes, float("inf"))  # (N, W)
    nearest = bins.gather(1, distance.argmin(1, keepdim=True)).squeeze(1)
    highest = values.masked_fill(~genes, float("-inf")).amax(1)
    return torch.where(new_values > highest, torch.full_like(nearest, top_bin), nearest)


def set_tokens(inputs: dict, r: torch.Tensor, c: torch.Tensor, genes: torch.Tensor, new_values: torch.Tensor,
               cell_genes: torch.Tensor, tokenizer) -> None:
    """Give the tokens at rows `r`, columns `c` the `genes` and `new_values`, with their bins (the nearest value's bin
    among the `cell_genes` tokens, or the global bins), and unmask them."""
    values, bins = inputs["expression_values"], inputs["expression_bins"]
    if tokenizer.binning == "global":
        new_bins = torch.from_numpy(tokenizer.bin_rows(new_values.numpy(), np.ones(len(r), np.int64)).astype(np.int64))
    else:
        new_bins = nearest_bins(values[r], bins[r], cell_genes[r], new_values, tokenizer.n_bins - 1)
    inputs["input_ids"][r, c], values[r, c], bins[r, c], inputs["attention_mask"][r, c] = genes, new_values, new_bins, 1


def perturbed_copies(base, gene_tokens, slots, genes, mode, value, tokenizer) -> Copies | None:
    """Copies of the batch's cells with each applicable perturbation made (see the module docstring); None if none
    applies. `slots`, `genes`: `gene_slots` of the batch; `gene_tokens` (B, W): the cells' real gene tokens.
    For `knockout` a copy is the cell *with* the genes: those it expresses as they are, the others added at `value`
    (None: left for `impute_added` to fill); `without_genes` then makes the knocked-out copy."""
    present = slots >= 0  # (B, P, E)
    wanted = genes >= 0
    applies = (present & wanted).any(2) if mode in ("delete", "scale") else wanted.any(2)  # (B, P)
    cell_rows, perturbation = np.nonzero(applies)
    if not len(cell_rows):
        return None
    cell_rows_t = torch.from_numpy(cell_rows)
    inputs = {name: tensor[cell_rows_t].clone() for name, tensor in base.items()}
    ids, values, bins, mask = (inputs[k] for k in ("input_ids", "expression_values", "expression_bins", "attention_mask"))
    cell_genes = gene_tokens[cell_rows_t]
    n_copies, width = ids.shape
    extra = slots.shape[2]
    perturbed = torch.zeros((n_copies, width), dtype=torch.bool)
    top_value = values.masked_fill(~cell_genes, float("-inf")).amax(1).clamp(min=0)  # (N,) the cell's highest
    rows = torch.arange(n_copies)
    for k in range(extra):
        slot = torch.from_numpy(slots[cell_rows, perturbation, k])
        gene = torch.from_numpy(genes[cell_rows, perturbation, k].copy())
        column = torch.where(slot >= 0, slot, width - extra + k)
        active = (gene >= 0) & ((slot >= 0) | torch.tensor(mode in ("overexpress", "set", "knockout")))
        r, c = rows[active], column[active]
        perturbed[r, c] = True
        if mode == "delete":
            mask[r, c] = 0
            continue
        if mode == "knockout":  # expressed genes stay as they are; the others are added
            active &= slot < 0
            r, c = rows[active], column[active]
            if value is None:
                ids[r, c], mask[r, c] = gene[active], 1
                continue
        if mode == "overexpress":
            new = top_value[r]
        elif mode in ("set", "knockout"):
            new = torch.full((len(r),), float(value))
        else:  # scale the normalised count, in log1p units
            new = torch.log1p(torch.expm1(values[r, c]) * float(value))
        set_tokens(inputs, r, c, gene[active], new, cell_genes & ~perturbed, tokenizer)
    return Copies(cell_rows_t, torch.from_numpy(perturbation), inputs, perturbed)


# ----------------------------------------------------------------------------------------------------------------------
# Masked predictions and embeddings
# ----------------------------------------------------------------------------------------------------------------------


class Predictor:
    """Runs the masked-expression model on (N, W) inputs in slices under the token budget."""

    def __init__(self, model: ScGeneForMaskedExpression, max_tokens: int):
        self.model, self.max_tokens = model, max_tokens
        self.mask_value, self.mask_bin = float(model.config.mask_value), model.config.n_bins
        self.device = next(model.parameters()).device

    def slices(self, n_rows: int, width: int):
        step = max(1, self.max_tokens // max(width, 1))
        return (slice(start, start + step) for start in range(0, n_rows, step))

    def masked_values(self, inputs: dict, masked: torch.Tensor) -> torch.Tensor:
        """(N, W) the value head's predictions with the `masked` tokens' values and bins hidden."""
        out = torch.zeros(masked.shape, dtype=torch.float32)
        for part in self.slices(*masked.shape):
            batch = {name: tensor[part].to(self.device) for name, tensor in inputs.items()}
            hidden = masked[part].to(self.device)
            batch["expression_values"] = batch["expression_values"].masked_fill(hidden, self.mask_value)
            batch["expression_bins"] = batch["expression_bins"].masked_fill(hidden, self.mask_bin)
            out[part] = self.model(**batch, return_dict=True).predicted_values.float().cpu()
        return out

    def embeddings(self, inputs: dict) -> torch.Tensor:
        """(N, d) the cell embeddings of unmasked inputs."""
        n_rows, width = inputs["input_ids"].shape
        parts = [self.model.base_model(**{name: tensor[part].to(self.device) for name, tensor in inputs.items()},
                                       return_dict=True).pooler_output.float().cpu()
                 for part in self.slices(n_rows, width)]
        return torch.cat(parts)


def masking_groups(cells: np.ndarray, width: int, rounds: int, seed: int) -> torch.Tensor:
    """(B, W) the masking round of each column of each cell: a random split seeded by (`seed`, the cell's row in the
    input), so a cell is masked the same way whatever its batch."""
    groups = [np.random.default_rng([seed, int(cell)]).permutation(width) % rounds for cell in cells]
    return torch.from_numpy(np.stack(groups))


def predicted_changes(predictor: Predictor, base: dict, gene_tokens: torch.Tensor, copies: Copies,
                      groups: torch.Tensor, rounds: int, reference: torch.Tensor) -> torch.Tensor:
    """(N, W) each copy's predicted change at its unperturbed gene tokens (NaN elsewhere), as the module docstring
    describes; `reference` (B, W) holds the unperturbed cells' round-by-round predictions."""
    rows = copies.cell_rows
    copy_groups = groups[rows]
    readable = gene_tokens[rows] & ~copies.perturbed  # (N, W)
    perturbed_reference = reference[rows].clone()
    predicted = torch.zeros_like(perturbed_reference)
    for round_index in range(rounds):
        masked = readable & (copy_groups == round_index)
        hit = masked.any(1)
        if hit.any():
            inputs = {name: tensor[hit] for name, tensor in copies.inputs.items()}
            predicted[hit] = torch.where(masked[hit], predictor.masked_values(inputs, masked[hit]), predicted[hit])
        # the reference of a copy whose perturbed gene falls in this round: the round again with that gene visible
        rerun = (copies.perturbed & gene_tokens[rows] & (copy_groups == round_index)).any(1) & hit
        if rerun.any():
            inputs = {name: tensor[rows[rerun]] for name, tensor in base.items()}
            again = predictor.masked_values(inputs, masked[rerun])
            perturbed_reference[rerun] = torch.where(masked[rerun], again, perturbed_reference[rerun])
    return torch.where(readable, predicted - perturbed_reference, torch.full_like(predicted, float("nan")))


def reference_predictions(predictor: Predictor, base: dict, gene_tokens: torch.Tensor, groups: torch.Tensor,
                          rounds: int) -> torch.Tensor:
    """(B, W) the unperturbed cells' predictions, each gene predicted in its own round."""
    reference = torch.zeros(gene_tokens.shape)
    for round_index in range(rounds):
        masked = gene_tokens & (groups == round_index)
        if masked.any():
            reference = torch.where(masked, predictor.masked_values(base, masked), reference)
    return reference


def impute_added(predictor: Predictor, copies: Copies, added: torch.Tensor, cell_genes: torch.Tensor,
                 tokenizer) -> None:
    """Give the `added` tokens (N, W) of `knockout` copies the level the model predicts for each in its cell (all of a
    copy's added genes masked together, one forward) and that level's bin."""
    predicted = predictor.masked_values(copies.inputs, added).clamp(min=0)  # (N, W)
    r, c = added.nonzero(as_tuple=True)
    set_tokens(copies.inputs, r, c, copies.inputs["input_ids"][r, c], predicted[r, c], cell_genes & ~copies.perturbed,
               tokenizer)


def without_genes(copies: Copies) -> Copies:
    """The knocked-out side of `knockout` copies: each copy with its perturbed tokens removed (attention mask 0), its
    cell being the copy itself (row i of the copies)."""
    inputs = {name: tensor.clone() for name, tensor in copies.inputs.items()}
    inputs["attention_mask"][copies.perturbed] = 0
    return Copies(torch.arange(len(copies.cell_rows)), copies.perturbation, inputs, copies.perturbed)


def knockout_changes(predictor: Predictor, context: dict, copies: Copies, added: torch.Tensor, groups: torch.Tensor,
                     rounds: int, reference: torch.Tensor) -> torch.Tensor:
    """(N, W) `predicted_changes` of knocked-out copies against their `context` (N, W), the cell with the genes, each
    copy being its own cell. Its reference predictions are the cell's (`reference`) where nothing was added, and are
    made afresh where genes were (`added`)."""
    tokens = context["attention_mask"].bool() & (context["input_ids"] >= NUM_SPECIAL_TOKENS)
    reference = reference.clone()
    fresh = added.any(1)
    if fresh.any():
        reference[fresh] = reference_predictions(predictor, {name: tensor[fresh] for name, tensor in context.items()},
                                                 tokens[fresh], groups[fresh], rounds)
    return predicted_changes(predictor, context, tokens, copies, groups, rounds, reference)


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------------


def rank_test_against_rest(values: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels,) two-sided Mann-Whitney p-value of each label's values against all other labels' values (normal
    approximation, tie-averaged ranks); NaN for a label with no values or nothing to compare with."""
    ranks = scipy.stats.rankdata(values)
    total = len(values)
    counts = np.bincount(labels, minlength=n_labels).astype(float)
    rank_sums = np.bincount(labels, weights=ranks, minlength=n_labels)
    rest = total - counts
    statistic = rank_sums - counts * (counts + 1) / 2
    spread = np.sqrt(counts * rest * (total + 1) / 12)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (statistic - counts * rest / 2) / spread
    pvalues = 2 * scipy.stats.norm.sf(np.abs(z))
    return np.where((counts > 0) & (rest > 0) & (spread > 0), pvalues, np.nan)


def fdr(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN stays NaN."""
    adjusted = np.full(len(pvalues), np.nan)
    finite = ~np.isnan(pvalues)
    if finite.any():
        adjusted[finite] = scipy.stats.false_discovery_control(pvalues[finite])
    return adjusted


def shift_table(names, perturbation, shifts, goal_shifts) -> pd.DataFrame:
    """One row per perturbation from the per-copy shifts (see `PerturbationResult`)."""
    n = len(names)
    counts = np.bincount(perturbation, minlength=n)

    def mean_and_std(values):
        sums = np.bincount(perturbation, weights=values, minlength=n)
        squares = np.bincount(perturbation, weights=values**2, minlength=n)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = sums / counts
            std = np.sqrt(np.maximum(squares / counts - mean**2, 0) * counts / np.maximum(counts - 1, 1))
        return mean, std

    mean, std = mean_and_std(shifts)
    pvalues = rank_test_against_rest(shifts, perturbation, n)
    table = pd.DataFrame({"cells": counts, "cosine_shift": mean, "cosine_shift_std": std, "shift_pval": pvalues,
                          "shift_fdr": fdr(pvalues)}, index=pd.Index(names, name="perturbation"))
    if goal_shifts is not None:
        mean, std = mean_and_std(goal_shifts)
        pvalues = rank_test_against_rest(goal_shifts, perturbation, n)
        table = table.assign(shift_to_goal=mean, shift_to_goal_std=std, goal_pval=pvalues, goal_fdr=fdr(pvalues))
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def load_masked_expression_model(model, device, instead: str = "pass a pretrained checkpoint, or expression=False for "
                                                                "the embedding shifts alone") -> ScGeneForMaskedExpression:
    """A checkpoint (None: the shipped default) or a loaded model -> `ScGeneForMaskedExpression` in eval mode; a model
    without the head raises an error that suggests `instead`."""
    if model is None or isinstance(model, (str, os.PathLike)):
        source = local_or_hub(DEFAULT_CHECKPOINT if model is None else model,
                              "a checkpoint is a folder with config.json and model.safetensors")
        model = load_weights(AutoModelForMaskedLM, source)
    if not is_scgene(model, ScGeneForMaskedExpression):
        raise ValueError(f"Predicting expression changes needs the masked-expression head (ScGeneForMaskedExpression), "
                         f"got {type(model).__name__}: {instead}.")
    model.training_genes = training_genes(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def adapt_to_cells(
    adata,
    model=None,
    *,
    steps: int = 1500,
    learning_rate: float = 3e-4,
    batch_size: int = 32,
    seed: int = 0,
    tokenizer=None,
    progress: bool = True,
    **tokenize_kwargs,
) -> ScGeneForMaskedExpression:
    """A copy of `model` (default: the shipped checkpoint) trained `steps` more steps of masked-expression modelling
    on the cells of `adata` (raw counts; in memory or backed), to pass to `perturb`: the model learns these cells'
    co-expression, which is what its predicted changes read. Self-supervised: no label and no perturbed cell is
    needed, so adapt on the unperturbed (e.g. control) cells. Same collator as pretraining (15% of genes masked),
    without the contrastive term (it needs count views; the expression head is what perturbation reads). Only the
    cells the seeded batches draw are read (at most `steps` x `batch_size`), so a large file need not fit in memory.
    `tokenize_kwargs` (gene_column, layer, ...) go to the tokenizer, as in `perturb`. On two real CRISPR screens this
    raised pearson_delta with the observed changes, from below to just above the mean of the other perturbations
    (`docs/perturbation.md`); the defaults are the settings measured there."""
    import copy

    from .data.collators import DataCollatorForMaskedExpression

    if steps < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"steps and batch_size must be positive integers and learning_rate positive, got {steps}, "
                         f"{batch_size} and {learning_rate}.")
    model = load_masked_expression_model(model, None)
    tokenizer = load_tokenizer(tokenizer, model)
    drawn = np.random.default_rng(seed).choice(adata.n_obs, (steps, batch_size))  # each step's cells
    rows, drawn = np.unique(drawn, return_inverse=True)
    drawn = drawn.reshape(steps, batch_size)  # positions into rows
    batch = tokenizer(adata[rows], return_tensors="np", **tokenize_kwargs)
    lengths = batch["attention_mask"].sum(1)
    features = [{name: batch[name][row, : lengths[row]] for name in ("input_ids", "expression_values",
                                                                    "expression_bins")} for row in range(len(rows))]
    collator = DataCollatorForMaskedExpression(tokenizer, seed=seed)
    adapted = copy.deepcopy(model).train()
    adapted.config.contrastive_loss_weight, adapted.contrastive_projection = 0.0, None  # (docstring)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=learning_rate)
    for step in tqdm(range(steps), unit="steps", desc="Adapting", disable=not progress):
        collator.epoch = step
        inputs = collator([features[i] for i in drawn[step]])
        loss = adapted(**{name: tensor.to(adapted.device) for name, tensor in inputs.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return adapted.eval()


def perturb(
    adata,
    model=None,
    genes="all",
    *,
    mode: str = "delete",
    value: float | None = None,
    groupby: str | None = None,
    groups=None,
    state_key: str | None = None,
    start_state: str | None = None,
    goal_state: str | None = None,
    expression: bool = True,
    masking_rounds: int = 7,
    seed: int = 0,
    key_added: str | None = PERTURBATION_KEY,
    tokenizer=None,
    max_tokens_per_batch: int | None = None,
    device=None,
    max_memory_gb: float = 4.0,
    progress: bool = True,
    read_genes=None,
    **tokenize_kwargs,
) -> PerturbationResult:
    """Perturb `genes` in the cells of `adata` and predict what changes (see the module docstring for the method).

    `genes`: a gene, `"A+B"` (perturbed together), a list of those, or `"all"` (each measured gene alone).
    `mode`: `"delete"`, `"knockout"` (delete where the cell expresses the genes; elsewhere, e.g. for a gene the file
    does not measure, the cell with them added at `value` or, by default, at the level the model predicts for them in
    it, against the cell without them), `"overexpress"` (the cell's highest value), `"set"` (`value`, log1p of counts
    per 10,000) or `"scale"` (the normalised count times `value`). A cell is perturbed when the perturbation applies to
    it (delete and scale: it expresses at least one of the genes). `groupby`/`groups` restrict the cells;
    `state_key`, `start_state`, `goal_state` perturb the start cells and measure their move toward the goal cells'
    mean embedding.
    `expression=False` skips the predicted expression changes (1 forward per perturbed cell instead of about
    `masking_rounds + 1`). `model`: a pretrained checkpoint with its masked-expression head (default: the one shipped
    with scgene). With an AnnData in memory and `key_added`, writes `adata.uns[key_added]` (the tables and the run's
    settings) and, for a single perturbation, `adata.layers[key_added]` (per-cell changes, NaN where not predicted) and
    `adata.obs[key_added + "_shift"]`. `read_genes`: gene names to read from the file, normalised over them (the
    tokenizer's `genes=`, named apart from the perturbed `genes`); `genes="all"` then perturbs each of them.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    value_checked = mode in ("set", "scale") or (mode == "knockout" and value is not None)
    if value_checked and (value is None or not value > 0):
        raise ValueError(f"mode={mode!r} needs value= > 0 ({'a factor' if mode == 'scale' else 'log1p of counts per 10,000'}"
                         f", got {value}); to remove a gene use mode='delete' or 'knockout'.")
    if mode in ("delete", "overexpress") and value is not None:
        raise ValueError(f"mode={mode!r} takes no value= (it is for 'set', 'scale' and 'knockout').")
    if not isinstance(masking_rounds, int) or masking_rounds < 2:
        raise ValueError(f"masking_rounds must be an integer >= 2 (each round masks 1/rounds of a cell's genes), got "
                         f"{masking_rounds!r}.")
    if expression:
        masked_model = load_masked_expression_model(model, device)
    elif mode == "knockout" and value is None:  # the head predicts the level at which a lacking cell gets the gene
        masked_model = load_masked_expression_model(model, device, "pass a pretrained checkpoint, or value= (the level "
                                                                   "at which knockout adds the gene where it is lacking)")
    else:
        masked_model = load_model(DEFAULT_CHECKPOINT if model is None else model, device=device)
    encoder = masked_model.base_model
    tokenizer = load_tokenizer(tokenizer, masked_model)
    max_tokens = max_tokens_per_batch or DEFAULT_MAX_TOKENS_PER_BATCH
    if read_genes is not None:
        tokenize_kwargs = tokenize_kwargs | {"genes": list(read_genes)}
    with opened(adata) as cells:
        measured = GeneIndex(cells, tokenizer, tokenize_kwargs.get("gene_column"), masked_model.config.vocab_size)
        if read_genes is not None and isinstance(genes, str) and genes == "all":
            genes = list(measured.names[measured.subset(read_genes, tokenizer)])
        perturbations = parse_perturbations(genes, tokenizer, measured)
        names = [name for name, _ in perturbations]
        if len(set(names)) < len(names):
            raise ValueError("genes= names a perturbation twice: list each once.")
        chosen, goal = selected_cells(cells, groupby, groups, state_key, start_state, goal_state)
        needed_gb = 2 * len(perturbations) * len(measured) * 4 / 1e9 if expression else 0
        if needed_gb > max_memory_gb:
            raise ValueError(f"{len(perturbations)} perturbations x {len(measured)} genes need {needed_gb:.1f} GB of "
                             f"change tables (max_memory_gb={max_memory_gb}): perturb fewer genes, read fewer genes "
                             "(read_genes=), or pass expression=False for the embedding shifts alone.")
        goal_embedding = None
        if goal is not None:
            goal_cells = np.flatnonzero(goal)
            goal_embeddings, _, _ = embeddings_and_coverage(cells[goal_cells], encoder, tokenizer, batch_size=None,
                                                            max_tokens_per_batch=max_tokens, progress=False,
                                                            **tokenize_kwargs)
            goal_embedding = torch.from_numpy(goal_embeddings.mean(0))
        predictor = Predictor(masked_model, max_tokens)
        gene_position = torch.from_numpy(measured.position)
        sums = torch.zeros((len(perturbations), len(measured)), dtype=torch.float32) if expression else None
        counts = torch.zeros((len(perturbations), len(measured)), dtype=torch.int32) if expression else None
        single = len(perturbations) == 1 and expression
        cell_changes = np.full((cells.n_obs, len(measured)), np.nan, np.float32) if single else None
        copy_perturbation, copy_cell, copy_shift, copy_goal = [], [], [], []
        extra = max(len(ids) for _, ids in perturbations)
        subset = cells if chosen.all() else cells[np.flatnonzero(chosen)]
        cell_index = np.flatnonzero(chosen)
        batches = iter_batches(tokenizer, subset, max_tokens, CELLS_PER_BATCH, tokenize_kwargs | {"progress": False})
        with torch.inference_mode(), tqdm(total=int(chosen.sum()), unit="cells", desc="Perturbing",
                                          disable=not progress) as bar:
            for batch in batches:
                base = widened(batch.inputs, extra)
                gene_tokens = base["attention_mask"].bool() & (base["input_ids"] >= NUM_SPECIAL_TOKENS)  # (B, W)
                slots, slot_genes = gene_slots(base["input_ids"].numpy(), [ids for _, ids in perturbations], extra)
                copies = perturbed_copies(base, gene_tokens, slots, slot_genes, mode, value, tokenizer)
                bar.update(len(batch.cells))
                if copies is None:
                    continue
                cell_rows = copies.cell_rows  # (N,) each copy's cell in the batch
                cell_genes = gene_tokens[cell_rows]  # (N, W) that cell's own gene tokens
                rows = batch.cells[cell_rows.numpy()]
                if mode == "knockout":  # the copies hold the genes; the knocked-out side is compared with them
                    added = copies.perturbed & ~cell_genes
                    if value is None:
                        impute_added(predictor, copies, added, cell_genes, tokenizer)
                    context, copies = copies.inputs, without_genes(copies)
                    before = predictor.embeddings(context)  # (N, d)
                else:
                    before = predictor.embeddings(base)[cell_rows]  # (N, d)
                after = predictor.embeddings(copies.inputs)
                copy_perturbation.append(copies.perturbation.numpy())
                copy_cell.append(cell_index[rows])
                copy_shift.append((1 - F.cosine_similarity(before, after, dim=1)).numpy())
                if goal_embedding is not None:
                    toward = (F.cosine_similarity(after, goal_embedding[None], dim=1)
                              - F.cosine_similarity(before, goal_embedding[None], dim=1))
                    copy_goal.append(toward.numpy())
                if not expression:
                    continue
                groups_of = masking_groups(cell_index[batch.cells], base["input_ids"].shape[1], masking_rounds, seed)
                reference = reference_predictions(predictor, base, gene_tokens, groups_of, masking_rounds)
                if mode == "knockout":
                    change = knockout_changes(predictor, context, copies, added, groups_of[cell_rows], masking_rounds,
                                              reference[cell_rows])
                else:
                    change = predicted_changes(predictor, base, gene_tokens, copies, groups_of, masking_rounds,
                                               reference)
                position = torch.where(cell_genes, gene_position[copies.inputs["input_ids"]], -1)
                known = ~torch.isnan(change) & (position >= 0)
                target = copies.perturbation[:, None].expand_as(position)[known] * len(measured) + position[known]
                sums.view(-1).index_add_(0, target, change[known])
                counts.view(-1).index_add_(0, target, torch.ones_like(target, dtype=torch.int32))
                if single:
                    copy_rows, columns = known.nonzero(as_tuple=True)
                    cell_changes[cell_index[rows[copy_rows.numpy()]], position[known].numpy()] = change[known].numpy()
    if not copy_perturbation:
        raise ValueError(f"No selected cell expresses any of the genes to {mode}: nothing was perturbed. Check the gene "
                         "names against adata.var_names (delete and scale need the gene among a cell's tokens).")
    perturbation = np.concatenate(copy_perturbation)
    shifts = np.concatenate(copy_shift)
    table = shift_table(names, perturbation, shifts, np.concatenate(copy_goal) if copy_goal else None)
    changes = change_counts = None
    if expression:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (sums / counts).numpy()
        changes = pd.DataFrame(np.where(counts.numpy() > 0, mean, np.nan), index=pd.Index(names, name="perturbation"),
                               columns=measured.names)
        change_counts = pd.DataFrame(counts.numpy(), index=changes.index, columns=measured.names)
    record = {"model": str(getattr(masked_model, "name_or_path", "") or "in-memory model"), "mode": mode,
              "value": value, "masking_rounds": masking_rounds, "seed": seed, "perturbations": len(names),
              "cells_perturbed": int(len(np.unique(np.concatenate(copy_cell))))}
    result = PerturbationResult(table, changes, change_counts, record=record)
    if len(perturbations) == 1:
        result.cell_shifts = np.full(len(chosen), np.nan, np.float32)
        result.cell_shifts[np.concatenate(copy_cell)] = shifts
        result.cell_changes = cell_changes
    if key_added and not isinstance(adata, (str, os.PathLike)):
        write_result(adata, result, measured, key_added)
    return result


def write_result(adata, result: PerturbationResult, measured: GeneIndex, key_added: str) -> None:
    """`uns[key_added]` (tables and settings); for one perturbation also `layers` and `obs` (see `perturb`)."""
    entry = {"record": result.record, "shifts": result.shifts.reset_index()}
    if result.changes is not None:
        entry["top_changes"] = result.top_changes()
    adata.uns[key_added] = entry
    if result.cell_shifts is not None:
        adata.obs[f"{key_added}_shift"] = result.cell_shifts
    if result.cell_changes is not None:
        layer = np.full((adata.n_obs, adata.n_vars), np.nan, np.float32)
        layer[:, measured.columns] = result.cell_changes
        adata.layers[key_added] = layer

