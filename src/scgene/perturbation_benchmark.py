"""Score in-silico perturbation against a real CRISPR screen, next to the baselines that beat most models.

The control cells are split in two (seeded halves). The *reference* half is the truth's: for each target of the
screen, the observed change is the pseudobulk log1p(counts per 10,000) of its perturbed cells minus that of the
reference control cells, over the measured genes. Every prediction is made from the other, *seen* half, and without
the perturbed cells of the scored target. (Were the truth and a baseline to share control cells, the noise of their
mean would be part of both, and the mean of other perturbations would score that shared noise: the row
`mean of other perturbations, truth's control` shows how much.) Predictions:

- `scgene`: `scgene.perturb` on the seen control cells (knockout for knockouts and CRISPRi, so that a target the
  file does not measure is scored too; overexpress for CRISPRa);
  a gene's predicted change is summed over the cells that express it and divided by the cells perturbed (a
  pseudobulk, like the observed change);
- `scgene, specific`: the same minus the mean of the model's changes for the other targets it could perturb
  (`PerturbationResult.pseudobulk_changes(specific=True)`): what is left of the prediction once its generic response
  to any perturbation (e.g. "one expressed gene fewer") is removed;
- `scgene, nearest perturbations`: the mean change of the screen's other targets (as below), each weighted by the
  cosine similarity of ScGene's specific predictions for it and for the scored target (clipped at 0; targets the model
  did not perturb weigh 0): ScGene as a perturbation embedding that says which observed perturbations to borrow from;
- `no change`: zero everywhere;
- `mean of other perturbations`: the mean change of the screen's other targets (those sharing no gene with it), each
  against the seen control cells;
- `mean of other perturbations, truth's control`: the same against the reference control cells (it leaks; see above);
- `mean of other perturbations, GO-weighted`: the same mean, each other target weighted by the cosine similarity of
  its GO and hallmark memberships with the scored target's (in the gene knowledge table that ScGene's prior is built
  from; clipped at 0), the "kNN on GO features" baseline of perturbation benchmarks; the plain mean where no other
  target shares an annotation with it;
- `additive`: for a combination `A+B` whose single perturbations are in the screen, the sum of their changes against
  the seen control cells (no score for the other targets);
- `linear co-expression`: on the seen control cells, each gene regressed on the target gene (ordinary least squares, one
  regressor), times the target's change (to 0 when deleted, to each cell's highest value when overexpressed); a
  target the screen does not measure, or that no seen control cell expresses, gets no prediction and no score (NaN),
  so that the summary averages this baseline over the targets it can predict (`targets_scored`).

Metrics per target: `pearson_delta` (Pearson r of predicted and observed change over the measured genes, the targets
excluded), `direction_accuracy` on the `top_genes` genes whose observed change is largest (a zero prediction has no
direction and counts as wrong), and the target gene's own observed change, reported apart. The `replicate_` columns
say how reproducible a target's effect is at all, a ceiling for any prediction: the same two metrics between two
halves of its cells, one against the seen and one against the reference control cells (pearson_delta near 0: the
target changed nothing measurable). `effect_pvalue` tests whether the target changed the scored genes' mean expression
at all: the squared distance between its cells' and the reference control cells' means, against the same distance
with the two groups' labels shuffled; `effect_fdr` is its Benjamini-Hochberg adjustment over the scored targets.
`summary(measurable=True)` averages over the targets with an effect (`effect_fdr` < 0.05): on a target without one,
the top observed changes are noise and no prediction can beat chance on their direction.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .gene_regulation import GeneIndex
from .inference import load_tokenizer
from .perturbation import adapt_to_cells, fdr, load_masked_expression_model, perturb
from .prior.knowledge import DEFAULT_TABLE, KnowledgeTable, read_knowledge_table
from .regulation_benchmark import log_expression
from .reports import SavedReport, markdown_table

METHODS = ("scgene", "scgene, specific", "scgene, nearest perturbations", "no change", "mean of other perturbations",
           "mean of other perturbations, truth's control", "mean of other perturbations, GO-weighted", "additive",
           "linear co-expression")
MODE_OF_SCREEN = {"knockout": "knockout", "crispri": "knockout", "crispra": "overexpress"}
SCREEN_MODES = ("delete", "knockout", "overexpress")  # the in-silico modes that need no value per target
EFFECT_FDR = 0.05  # a target whose effect_fdr is below this changed the screen's genes measurably


def pearson_delta(predicted: np.ndarray, observed: np.ndarray) -> float:
    """Pearson r of two change vectors; NaN when either is constant."""
    if predicted.std() == 0 or observed.std() == 0:
        return float("nan")
    return float(np.corrcoef(predicted, observed)[0, 1])


def direction_accuracy(predicted: np.ndarray, observed: np.ndarray, top_genes: int) -> float:
    """Share of the `top_genes` largest observed changes whose sign the prediction gets right (0 is no sign)."""
    top = np.argsort(-np.abs(observed), kind="stable")[:top_genes]
    return float(np.mean((np.sign(predicted[top]) == np.sign(observed[top])) & (predicted[top] != 0)))


@dataclass
class PerturbationReport(SavedReport):
    """One row per (target, method); `summary()` averages each method over the targets."""

    table: pd.DataFrame
    settings: dict = field(default_factory=dict)

    def summary(self, measurable: bool = False) -> pd.DataFrame:
        """Each method's mean over the targets the model could perturb (those with `model_cells_perturbed` > 0), so
        every method is scored on the same targets; `targets_scored`: those where its pearson_delta is defined.
        `measurable=True`: only over those of them with a measurable effect (`effect_fdr` < `EFFECT_FDR`)."""
        common = self.table[self.table["model_cells_perturbed"] > 0]
        if measurable:
            common = common[common["effect_fdr"] < EFFECT_FDR]
        by_method = common.groupby("method", sort=False)
        return (by_method[["pearson_delta", "direction_accuracy", "replicate_pearson_delta",
                               "replicate_direction_accuracy"]].mean()
                .join(by_method["pearson_delta"].count().rename("targets_scored"))
                .join(by_method["target"].count().rename("targets")))

    def to_markdown(self) -> str:
        facts = (f"{self.settings.get('screen')} screen, in-silico {self.settings.get('mode')} on "
                 f"{self.settings.get('control_cells_seen')} control cells; {self.settings.get('genes')} genes")
        return (facts + "\n\n" + markdown_table(self.summary().reset_index())
                + f"\n\nTargets with a measurable effect (effect_fdr < {EFFECT_FDR}) only:\n\n"
                + markdown_table(self.summary(measurable=True).reset_index()) + "\n\nPer target:\n\n"
                + markdown_table(self.table) + "\n")

    def to_json(self) -> str:
        table = self.table.astype(object).where(self.table.notna(), None)  # NaN -> null
        return json.dumps({"settings": self.settings, "table": table.to_dict(orient="records")}, default=str)


@functools.cache
def shipped_knowledge() -> KnowledgeTable:
    """The human gene knowledge table that ships with scgene, read once per process."""
    return read_knowledge_table(DEFAULT_TABLE)


def knowledge_table(knowledge: KnowledgeTable | str | None) -> KnowledgeTable:
    """`knowledge` as a table: one already read, a file to read, or None for the one shipped with scgene."""
    if isinstance(knowledge, KnowledgeTable):
        return knowledge
    return shipped_knowledge() if knowledge is None else read_knowledge_table(knowledge)


def borrowing_weights(similarity: np.ndarray, asked: list[str], targets: list[str]) -> np.ndarray:
    """(asked, targets) the weight of each screened target's observed change in the prediction for each asked
    perturbation: `similarity` (asked x targets, >= 0) over the targets that share no gene with it, normalised to sum
    to 1; where all of those are 0, equal weights (the plain mean of the other perturbations); none without any."""
    others = np.array([[not set(a.split("+")) & set(t.split("+")) for t in targets] for a in asked], bool)
    others = others.reshape(len(asked), len(targets))
    weights = np.where(others, similarity, 0.0)
    weights = np.where(weights.sum(1, keepdims=True) > 0, weights, others.astype(float))
    totals = weights.sum(1, keepdims=True)
    return np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)


def annotation_similarity(targets: list[str], tokenizer, knowledge: KnowledgeTable) -> np.ndarray:
    """(targets, targets) cosine similarity of the targets' GO and hallmark memberships in `knowledge` (a combination's
    genes summed), clipped at 0; a target none of whose genes the table annotates is similar to none."""
    annotations = [k for k, column in enumerate(knowledge.binary_columns) if column.startswith(("GO:", "HALLMARK_"))]
    row_of = {gene: row for row, gene in enumerate(knowledge.genes)}
    row_of |= {ensembl_id: row for row, ensembl_id in enumerate(knowledge.ensembl_ids or []) if ensembl_id}
    vectors = np.zeros((len(targets), len(annotations)))
    for index, target in enumerate(targets):
        for gene in target.split("+"):
            token_id = tokenizer._lookup(gene)  # aliases and Ensembl ids too; then its Ensembl id first, else symbol
            names = [] if token_id is None else [tokenizer.convert_ids_to_genes([token_id], key)[0]
                                                 for key in ("ensembl", "symbol")]
            row = next((row_of[name] for name in names if name in row_of), None)
            if row is not None:
                vectors[index] += knowledge.binary[row, annotations]
    return clipped_cosine(vectors)


def clipped_cosine(vectors: np.ndarray) -> np.ndarray:
    """(rows, rows) cosine similarity of the rows of `vectors`, clipped at 0; 0 for a row of zeros."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return np.clip(unit @ unit.T, 0, None)


def additive_changes(changes: np.ndarray, targets: list[str]) -> np.ndarray:
    """(targets, genes) for each combination `A+B` whose single perturbations are among `targets`, the sum of their
    rows of `changes`; NaN for the other targets."""
    row_of = {target: row for row, target in enumerate(targets)}
    summed = np.full(changes.shape, np.nan)
    for index, target in enumerate(targets):
        singles = target.split("+")
        if len(singles) > 1 and all(single in row_of for single in singles):
            summed[index] = changes[[row_of[single] for single in singles]].sum(0)
    return summed


def screen_labels(adata, perturbation_key: str, control: str) -> tuple[np.ndarray, list[str]]:
    """Each cell's label in `obs[perturbation_key]`, and the screen's targets (every label but `control`, sorted)."""
    if perturbation_key not in adata.obs.columns:
        raise KeyError(f"{perturbation_key!r} is not an obs column: {list(adata.obs.columns)[:20]}")
    labels = adata.obs[perturbation_key].astype(str).to_numpy()
    if control not in set(labels):
        raise ValueError(f"No {control!r} cells in obs[{perturbation_key!r}]: the observed change needs control cells.")
    return labels, sorted(set(labels) - {control})


def observed_changes(expression: np.ndarray, labels: np.ndarray, targets: list[str], control_rows: np.ndarray
                     ) -> np.ndarray:
    """(targets, genes) mean log expression of each target's cells minus that of the cells at `control_rows`."""
    baseline = expression[control_rows].mean(0)
    return np.stack([expression[labels == target].mean(0) - baseline for target in targets])


def replicate_scores(expression: np.ndarray, rows: np.ndarray, seen: np.ndarray, reference: np.ndarray,
                     scored: np.ndarray, top_genes: int, rng: np.random.Generator) -> tuple[float, float]:
    """pearson_delta and direction accuracy over the `scored` genes between two random halves of a target's cells
    (`rows`), the first half against the `seen` control cells, the second against the `reference` ones: how
    reproducible its effect is."""
    rows = rng.permutation(rows)
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2:]
    predicted = (expression[first].mean(0) - expression[seen].mean(0))[scored]
    observed = (expression[second].mean(0) - expression[reference].mean(0))[scored]
    return pearson_delta(predicted, observed), direction_accuracy(predicted, observed, top_genes)


def effect_pvalue(expression: np.ndarray, rows: np.ndarray, reference: np.ndarray, scored: np.ndarray,
                  permutations: int, rng: np.random.Generator, chunk: int = 100) -> float:
    """Permutation p-value that the cells at `rows` differ from the `reference` control cells in their mean
    expression of the `scored` genes: the squared distance between the two means, against the same distance with the
    cells' labels shuffled `permutations` times (in chunks, so memory stays at `chunk` x cells)."""
    pooled = expression[np.concatenate([rows, reference])][:, scored]  # (cells, scored genes)
    n_rows, n_cells = len(rows), len(pooled)

    def distances(in_rows: np.ndarray) -> np.ndarray:  # (P, cells) 0/1 -> (P,)
        difference = in_rows @ pooled / n_rows - (1 - in_rows) @ pooled / (n_cells - n_rows)
        return (difference**2).sum(1)

    observed = distances((np.arange(n_cells) < n_rows)[None].astype(pooled.dtype))[0]
    exceeded = 0
    for start in range(0, permutations, chunk):
        shuffled = np.stack([rng.permutation(n_cells) < n_rows for _ in range(min(chunk, permutations - start))])
        exceeded += int((distances(shuffled.astype(pooled.dtype)) >= observed).sum())
    return (1 + exceeded) / (1 + permutations)


def linear_changes(expression: np.ndarray, control_rows: np.ndarray, targets: list[str], gene_names: np.ndarray,
                   mode: str) -> np.ndarray:
    """(targets, genes) the linear co-expression model's predicted change (see the module docstring); NaN for a
    target none of whose genes it can regress on (not measured, or constant in the control cells)."""
    control = expression[control_rows]
    centred = control - control.mean(0)
    variance = (centred**2).mean(0)
    column = {name: index for index, name in enumerate(gene_names)}
    changes = np.zeros((len(targets), expression.shape[1]))
    fitted = np.zeros(len(targets), bool)
    for row, target in enumerate(targets):
        for gene in target.split("+"):
            g = column.get(gene)
            if g is None or variance[g] == 0:
                continue
            slope = (centred * centred[:, [g]]).mean(0) / variance[g]
            shift = -control[:, g].mean() if mode in ("delete", "knockout") else (control.max(1) - control[:, g]).mean()
            changes[row] += slope * shift
            fitted[row] = True
    changes[~fitted] = np.nan
    return changes


def evaluate_perturbation(
    adata,
    model=None,
    *,
    screen: str,
    mode: str | None = None,
    perturbation_key: str = "perturbation",
    control: str = "control",
    targets=None,
    max_control_cells: int = 500,
    top_genes: int = 20,
    effect_permutations: int = 999,
    masking_rounds: int = 7,
    adapt_steps: int = 0,
    adapt_learning_rate: float = 3e-4,
    seed: int = 0,
    tokenizer=None,
    knowledge: KnowledgeTable | str | None = None,
    progress: bool = False,
) -> PerturbationReport:
    """Score `scgene.perturb` on the screen in `adata` (raw counts; `obs[perturbation_key]` names each cell's target,
    `A+B` for two, or `control`) against its observed changes, next to the baselines (module docstring).
    `screen`: "knockout", "crispri" or "crispra". `mode`: the in-silico perturbation (default: knockout for knockout
    and CRISPRi screens, overexpress for CRISPRa; delete scores only the targets the file measures). `targets`: which
    to score (default all; the model perturbs only these, so the nearest-perturbation row borrows only from them).
    The model sees up to `max_control_cells` of the seen half of the control cells (a seeded sample) and never a
    perturbed cell or a reference control cell; with `adapt_steps`, it first trains that many masked-expression steps
    (at `adapt_learning_rate`) on the cells it sees (`scgene.adapt_to_cells`). `effect_permutations`: of the test
    that a target changed anything (`effect_pvalue`). `knowledge`: the gene table whose GO and hallmark columns weight
    the GO-weighted baseline (default: the human table ScGene's prior is built from)."""
    if screen not in MODE_OF_SCREEN:
        raise ValueError(f"screen must be one of {list(MODE_OF_SCREEN)}, got {screen!r}.")
    mode = MODE_OF_SCREEN[screen] if mode is None else mode
    if mode not in SCREEN_MODES:
        raise ValueError(f"mode must be one of {SCREEN_MODES} to score a screen, got {mode!r}.")
    labels, all_targets = screen_labels(adata, perturbation_key, control)
    targets = all_targets if targets is None else [str(t) for t in targets]
    unknown = sorted(set(targets) - set(all_targets))
    if unknown:
        raise ValueError(f"Targets {unknown[:10]} have no cells in obs[{perturbation_key!r}].")
    masked_model = load_masked_expression_model(model, None)
    tokenizer = load_tokenizer(tokenizer, masked_model)
    genes = GeneIndex(adata, tokenizer, None, masked_model.config.vocab_size)
    expression = log_expression(adata, genes, np.arange(len(genes)))  # (cells, genes)
    rng = np.random.default_rng(seed)
    control_rows = rng.permutation(np.flatnonzero(labels == control))
    if len(control_rows) < 4:
        raise ValueError(f"{len(control_rows)} {control!r} cells: scoring needs at least 4 control cells, half of them "
                         "held out as the truth's reference.")
    reference, seen = np.sort(control_rows[: len(control_rows) // 2]), np.sort(control_rows[len(control_rows) // 2:])
    observed = observed_changes(expression, labels, all_targets, reference)
    observed_from_seen = observed_changes(expression, labels, all_targets, seen)
    sample = seen[np.sort(rng.permutation(len(seen))[:max_control_cells])]
    similarity = annotation_similarity(all_targets, tokenizer, knowledge_table(knowledge))
    additive = additive_changes(observed_from_seen, all_targets)
    column = {name: index for index, name in enumerate(genes.names)}
    # deletion needs the gene among the cells' tokens; knockout and overexpress add it where a cell (or the file) lacks it
    perturbable = [t for t in targets if mode != "delete" or any(g in column for g in t.split("+"))]
    model_changes, model_specific = np.zeros((len(targets), len(genes))), np.zeros((len(targets), len(genes)))
    model_cells = dict.fromkeys(targets, 0)
    model_name = str(getattr(masked_model, "name_or_path", "") or "in-memory model")
    if adapt_steps:
        masked_model = adapt_to_cells(adata[sample], masked_model, steps=adapt_steps,
                                      learning_rate=adapt_learning_rate, seed=seed, tokenizer=tokenizer,
                                      progress=progress)
    if perturbable:
        result = perturb(adata[sample].copy(), masked_model, genes=perturbable, mode=mode,
                         masking_rounds=masking_rounds, seed=seed, tokenizer=tokenizer, key_added=None,
                         progress=progress)
        rows = [targets.index(t) for t in perturbable]
        model_changes[rows] = result.pseudobulk_changes().to_numpy()
        model_specific[rows] = result.pseudobulk_changes(specific=len(perturbable) > 1).to_numpy()
        model_cells |= result.shifts["cells"].to_dict()
    specific_of_all = np.zeros((len(all_targets), len(genes)))  # 0 for a target the model did not perturb
    perturbed = [t for t in targets if model_cells[t]]
    specific_of_all[[all_targets.index(t) for t in perturbed]] = model_specific[[targets.index(t) for t in perturbed]]
    scored_rows = [all_targets.index(t) for t in targets]
    plain = borrowing_weights(np.zeros((len(targets), len(all_targets))), targets, all_targets)  # (targets, all)
    nearest = borrowing_weights(clipped_cosine(specific_of_all)[scored_rows], targets, all_targets)
    go_weighted = borrowing_weights(similarity[scored_rows], targets, all_targets)
    linear = linear_changes(expression, seen, targets, genes.names, mode)
    permutation_rng = np.random.default_rng([seed, 1])  # its own stream: the other draws stay as they were
    rows, effect_pvalues = [], []
    for index, target in enumerate(targets):
        target_genes = target.split("+")
        position = all_targets.index(target)  # its row among all the screen's targets
        truth = observed[position]
        scored = np.ones(len(genes), bool)
        measured = [column[g] for g in target_genes if g in column]
        scored[measured] = False
        specific = model_specific[index] if model_cells[target] else np.zeros(len(genes))
        predictions = {"scgene": model_changes[index], "scgene, specific": specific,
                       "scgene, nearest perturbations": nearest[index] @ observed_from_seen,
                       "no change": np.zeros(len(genes)),
                       "mean of other perturbations": plain[index] @ observed_from_seen,
                       "mean of other perturbations, truth's control": plain[index] @ observed,
                       "mean of other perturbations, GO-weighted": go_weighted[index] @ observed_from_seen,
                       "additive": None if np.isnan(additive[position]).any() else additive[position],
                       "linear co-expression": None if np.isnan(linear[index]).any() else linear[index]}
        target_rows = np.flatnonzero(labels == target)
        replicate = replicate_scores(expression, target_rows, seen, reference, scored, top_genes, rng)
        effect_pvalues.append(effect_pvalue(expression, target_rows, reference, scored, effect_permutations,
                                            permutation_rng))
        for method, predicted in predictions.items():
            delta, direction = ((float("nan"), float("nan")) if predicted is None else
                                (pearson_delta(predicted[scored], truth[scored]),
                                 direction_accuracy(predicted[scored], truth[scored], top_genes)))
            rows.append({
                "target": target, "method": method, "cells": len(target_rows),
                "pearson_delta": delta, "direction_accuracy": direction,
                "target_measured": len(measured) == len(target_genes),
                "target_observed_change": float(truth[measured].mean()) if measured else float("nan"),
                "model_cells_perturbed": int(model_cells[target]),
                "replicate_pearson_delta": replicate[0], "replicate_direction_accuracy": replicate[1],
                "effect_pvalue": effect_pvalues[-1],
            })
    table = pd.DataFrame(rows)
    table["effect_fdr"] = table["target"].map(dict(zip(targets, fdr(np.array(effect_pvalues)), strict=True)))
    settings = {"screen": screen, "mode": mode, "control_cells_seen": len(sample),
                "control_cells_reference": len(reference), "genes": len(genes), "top_genes": top_genes,
                "effect_permutations": effect_permutations, "masking_rounds": masking_rounds,
                "adapt_steps": adapt_steps, "adapt_learning_rate": adapt_learning_rate if adapt_steps else None,
                "seed": seed, "model": model_name}
    return PerturbationReport(table, settings)
