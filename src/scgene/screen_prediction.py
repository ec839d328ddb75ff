"""Predict a perturbation nobody screened from a screen that was: borrow the observed changes of the screened
perturbations that act alike.

How. For each screened target, the observed change is the pseudobulk log1p(counts per 10,000) of its cells minus that
of the control cells. An asked perturbation's prediction is the mean of those changes weighted by how alike the two
perturbations are, over the targets that share no gene with it (a screened target asked for is predicted from the
others; to score such predictions, `evaluate_perturbation` holds out control cells that they never see). Two
similarities:

- `"scgene"`: ScGene perturbs (up to `max_control_cells` of) the control cells with the asked perturbations and the
  screened targets together, in the screen's mode (knockout for knockout and CRISPRi screens, overexpress for
  CRISPRa). The similarity is the cosine of two perturbations' specific parts (each predicted pseudobulk change minus
  the mean of the others', `PerturbationResult.pseudobulk_changes(specific=True)`), clipped at 0.
- `"annotations"`: the cosine of the two perturbations' GO and hallmark memberships in the gene knowledge table that
  ScGene's prior is built from, clipped at 0.

Where no target is similar at all, the prediction is their plain mean (`ScreenPrediction.weights` shows it).

Why borrow instead of predicting the change from the model alone: scored on real screens (`docs/perturbation.md`,
the rows `scgene, nearest perturbations` and `mean of other perturbations, GO-weighted`), ScGene's own predicted
change is at best level with the plain mean of the other perturbations, while the weighted means do better where the
screen holds perturbations that act alike (THP-1's IFN-gamma pathway, K562). What this cannot do: predict an effect
that no screened perturbation had, or transfer a screen to cells unlike its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from transformers.utils import logging

from .gene_regulation import GeneIndex
from .inference import load_tokenizer
from .perturbation import load_masked_expression_model, parse_perturbations, perturb
from .perturbation_benchmark import (
    MODE_OF_SCREEN,
    annotation_similarity,
    borrowing_weights,
    clipped_cosine,
    knowledge_table,
    screen_labels,
)
from .prior.knowledge import KnowledgeTable
from .regulation_benchmark import log_expression

logger = logging.get_logger(__name__)

SIMILARITIES = ("scgene", "annotations")


@dataclass
class ScreenPrediction:
    """What `predict_from_screen` returns.

    `changes`: asked perturbations x the screen's genes, the predicted pseudobulk change (log1p units). `weights`:
    asked perturbations x screened targets, the weight of each target's observed change (rows sum to 1; 0 for a target
    sharing a gene with the asked perturbation). `observed`: screened targets x genes, their observed changes against
    the control cells. `settings`: how it was run.
    """

    changes: pd.DataFrame
    weights: pd.DataFrame
    observed: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def top_changes(self, n_genes: int | None = 20) -> pd.DataFrame:
        """The long table `perturbation, gene, change, rank`: each asked perturbation's `n_genes` largest predicted
        |changes| (all genes with None)."""
        table = self.changes.rename_axis(index="perturbation", columns="gene").stack().rename("change").reset_index()
        table["rank"] = table["change"].abs().groupby(table["perturbation"]).rank(method="first", ascending=False)
        table = table.astype({"rank": int})
        if n_genes is not None:
            table = table[table["rank"] <= n_genes]
        return table.sort_values(["perturbation", "rank"]).reset_index(drop=True)

    def nearest(self, n_targets: int | None = 5) -> pd.DataFrame:
        """The long table `perturbation, screened_target, weight, rank`: the `n_targets` screened targets each asked
        perturbation borrows most from (all with None; only those with weight > 0)."""
        table = self.weights.rename_axis(index="perturbation", columns="screened_target").stack().rename("weight")
        table = table[table > 0].reset_index()
        table["rank"] = table["weight"].groupby(table["perturbation"]).rank(method="first", ascending=False).astype(int)
        if n_targets is not None:
            table = table[table["rank"] <= n_targets]
        return table.sort_values(["perturbation", "rank"]).reset_index(drop=True)


def gene_key(label: str, tokenizer) -> str:
    """A perturbation's genes as vocabulary ids (`A+B` -> sorted ids joined by '+'), so that aliases and Ensembl ids
    of one gene compare equal; a name the vocabulary lacks stays as it is."""
    ids = [tokenizer._lookup(gene.strip()) for gene in label.split("+")]
    return "+".join(sorted(str(i) if i is not None else gene for i, gene in zip(ids, label.split("+"), strict=True)))


def predict_from_screen(
    adata,
    genes,
    model=None,
    *,
    screen: str,
    similarity: str = "scgene",
    perturbation_key: str = "perturbation",
    control: str = "control",
    max_control_cells: int = 500,
    masking_rounds: int = 7,
    seed: int = 0,
    tokenizer=None,
    knowledge: KnowledgeTable | str | None = None,
    progress: bool = True,
) -> ScreenPrediction:
    """Predict the expression change of perturbing `genes` (a gene, `"A+B"`, or a list of those) in the cells of the
    screen in `adata` (raw counts; `obs[perturbation_key]` names each cell's target, or `control`), from the observed
    changes of the screened perturbations that act alike (module docstring). `screen`: "knockout", "crispri" or
    "crispra"; the asked perturbations are of the same kind. `similarity`: "scgene" (the model's predicted changes,
    made on up to `max_control_cells` control cells, a seeded sample) or "annotations" (GO and hallmark memberships in
    `knowledge`, default the table ScGene's prior is built from). `model`: a checkpoint with its masked-expression
    head (default: the shipped one). The screen is read, never modified."""
    if screen not in MODE_OF_SCREEN:
        raise ValueError(f"screen must be one of {list(MODE_OF_SCREEN)}, got {screen!r}.")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    labels, targets = screen_labels(adata, perturbation_key, control)
    if not targets:
        raise ValueError(f"obs[{perturbation_key!r}] has only {control!r} cells: there is no perturbation to borrow from.")
    masked_model = load_masked_expression_model(model, None)  # with "annotations", for its tokenizer
    tokenizer = load_tokenizer(tokenizer, masked_model)
    measured = GeneIndex(adata, tokenizer, None, masked_model.config.vocab_size)
    asked = [name for name, _ in parse_perturbations(genes, tokenizer, measured)]
    if len(set(asked)) < len(asked):
        raise ValueError("genes= names a perturbation twice: list each once.")
    control_rows = np.flatnonzero(labels == control)
    means = group_mean_expression(adata, measured, labels, [control, *targets])  # (1 + targets, genes)
    observed = means[1:] - means[0]  # (targets, genes)
    if similarity == "scgene":
        alike = scgene_similarity(adata, masked_model, tokenizer, asked, targets, control_rows, screen,
                                  max_control_cells, masking_rounds, seed, progress)
    else:
        alike = annotation_similarity(asked + targets, tokenizer, knowledge_table(knowledge))[: len(asked), len(asked):]
    weights = borrowing_weights(alike, [gene_key(a, tokenizer) for a in asked],
                                [gene_key(t, tokenizer) for t in targets])  # (asked, targets)
    fallback = [a for a, row in zip(asked, alike, strict=True) if not row.any()]
    if fallback:
        logger.warning(f"No screened perturbation is alike {fallback[:10]} by {similarity!r}: their prediction is the "
                       "plain mean of the screened changes.")
    names = list(measured.names)
    settings = {"screen": screen, "similarity": similarity, "control_cells": len(control_rows),
                "screened_targets": len(targets), "plain_mean": fallback, "seed": seed,
                "model": str(getattr(masked_model, "name_or_path", "") or "in-memory model")}
    return ScreenPrediction(changes=pd.DataFrame(weights @ observed, index=asked, columns=names),
                            weights=pd.DataFrame(weights, index=asked, columns=targets),
                            observed=pd.DataFrame(observed, index=targets, columns=names), settings=settings)


def group_mean_expression(adata, genes: GeneIndex, labels: np.ndarray, groups: list[str], chunk: int = 10_000
                          ) -> np.ndarray:
    """(groups, genes) mean log1p(counts per 10,000) of each group's cells, read `chunk` cells at a time: memory stays
    at chunk x genes however many cells the screen has."""
    positions = np.arange(len(genes))
    means = np.zeros((len(groups), len(genes)))
    for index, group in enumerate(groups):
        rows = np.flatnonzero(labels == group)
        for start in range(0, len(rows), chunk):
            means[index] += log_expression(adata[rows[start: start + chunk]], genes, positions).sum(0)
        means[index] /= len(rows)
    return means


def scgene_similarity(adata, model, tokenizer, asked: list[str], targets: list[str], control_rows: np.ndarray,
                      screen: str, max_control_cells: int, masking_rounds: int, seed: int, progress: bool) -> np.ndarray:
    """(asked, targets) clipped cosine of the specific parts of ScGene's predictions, all made together on a seeded
    sample of the control cells; 0 for a target the vocabulary lacks or that no sampled cell could take."""
    known = [t for t in targets if all(tokenizer._lookup(g) is not None for g in t.split("+"))]
    if len(known) < len(targets):
        logger.warning(f"{len(targets) - len(known)} screened target(s) are not in the model's vocabulary "
                       f"({sorted(set(targets) - set(known))[:10]}): they count as alike to nothing.")
    together = asked + [t for t in known if t not in asked]
    sample = np.sort(np.random.default_rng(seed).permutation(control_rows)[:max_control_cells])
    result = perturb(adata[sample].copy(), model, genes=together, mode=MODE_OF_SCREEN[screen],
                     masking_rounds=masking_rounds, seed=seed, tokenizer=tokenizer, key_added=None,
                     progress=progress)
    specific = result.pseudobulk_changes(specific=len(together) > 1)
    specific.loc[result.shifts["cells"] == 0] = 0.0  # a perturbation no cell took has no prediction to compare
    rows = specific.reindex(asked + targets, fill_value=0.0).to_numpy()
    return clipped_cosine(rows)[: len(asked), len(asked):]
