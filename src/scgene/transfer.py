"""The runs of the leave-one-dataset-out transfer protocol (`scripts/leave_one_dataset_out.py`, its OUT/runs.jsonl):
read with clear errors, and summarised by left-out set as mean ± sd over seeds. The protocol's OUT/table.md and the
model card's "Leave-one-dataset-out transfer" section (`scgene push --transfer`) are made by the same code.

A run is one JSON line: `held_out` (the set left out), `seed`, `variant` and `steps` (the recipe; older runs lack
them: the demo recipe, 300 steps), `genes` ("hvg" where every model read only the set's HVGs), `depth_quantile` (where every embedding, baselines
included, read the set with each cell thinned to that quantile of the set's count totals), `prior_readout_weight` (where
the model's cell embedding added its prior, pooled, with this weight fitted on the fold's corpus), `corpus_fraction`
(where the fold pretrained, prior included, on that share of each corpus file's cells: a point of the learning
curve in cells), `scores` (the rows of `scgene.evaluate`'s table: embedding -> metric -> value; the
baselines only in the first run of a fold and seed), and optionally `annotation`, `info` and `train_seconds`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

DEFAULT_VARIANT = "demo recipe"
DEFAULT_STEPS = 300
SCGENE_ROW = "ScGene"  # the model's row in scgene.evaluate's table; the others are baselines
RUNS_FILE = "runs.jsonl"


def recipe_name(variant: str, steps: int = DEFAULT_STEPS) -> str:
    """A recipe's name in the tables: the variant, and its step count when not the default (a learning-curve point)."""
    return variant if steps == DEFAULT_STEPS else f"{variant}, {steps} steps"


HVG_READOUT = "read on the set's HVGs"  # a run whose models read only the genes the PCA baseline reads (genes="hvg")


def depth_readout(quantile: float) -> str:
    """The readout of a run whose every embedding read the set with each cell thinned to this quantile of its depth."""
    return f"read at the set's {100 * quantile:g}th-percentile depth"


PRIOR_READOUT = "+ prior read-out"  # a run whose model adds its prior, pooled, to the cell embedding


def readouts(run: dict) -> list[str]:
    """How a run read the left-out set, beyond the usual (its genes, its depth, the prior read out): suffixes of its
    rows' names."""
    return ([HVG_READOUT] if run.get("genes") == "hvg" else []) + (
        [depth_readout(run["depth_quantile"])] if run.get("depth_quantile") else []) + (
        [PRIOR_READOUT] if run.get("prior_readout_weight") else [])


def corpus_share(run: dict) -> list[str]:
    """A learning-curve run, pretrained (prior included) on a share of each corpus file's cells: that share, named."""
    return [f"{100 * run['corpus_fraction']:g}% of the corpus"] if run.get("corpus_fraction") else []


def run_recipe(run: dict) -> str:
    name = recipe_name(run.get("variant", DEFAULT_VARIANT), run.get("steps", DEFAULT_STEPS))
    return ", ".join([name, *corpus_share(run), *readouts(run)])


def scgene_row(run: dict) -> str:
    """The row a run's model gets in the tables: ScGene and its recipe (baselines keep their own names)."""
    return f"{SCGENE_ROW} ({run_recipe(run)})"


def _run_problem(run) -> str | None:
    """What makes `run` not a run of the protocol, None when nothing does."""
    if not isinstance(run, dict):
        return "not a JSON object"
    missing = [key for key in ("held_out", "seed", "scores") if key not in run]
    if missing:
        return f"no {', '.join(missing)}"
    scores = run["scores"]
    if not isinstance(scores, dict) or not all(isinstance(row, dict) for row in scores.values()):
        return "'scores' is not embedding -> metric -> value"
    if SCGENE_ROW not in scores:
        return f"'scores' has no {SCGENE_ROW!r} row"
    if not all(value is None or isinstance(value, (int, float)) for row in scores.values() for value in row.values()):
        return "a score is not a number"
    return None


def read_runs(path: str | os.PathLike) -> list[dict]:
    """The runs of a protocol's runs.jsonl, each checked; a clear error for a missing file or a malformed line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: pass the protocol's runs file, {path / RUNS_FILE}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the {RUNS_FILE} that scripts/leave_one_dataset_out.py "
                                "writes in its --out folder.")
    runs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not JSON ({error.msg})"
        else:
            problem = _run_problem(run)
        if problem:
            raise ValueError(f"{path}, line {number}: {problem}. Each line must be one run written by "
                             "scripts/leave_one_dataset_out.py (held_out, seed, scores with a 'ScGene' row).")
        runs.append(run)
    if not runs:
        raise ValueError(f"{path} holds no runs: run scripts/leave_one_dataset_out.py --out {path.parent} first.")
    return runs


def finite_values(scores: list[dict], metric: str) -> list[float]:
    """The finite values of `metric` among a row's scores (one dict per run)."""
    values = (row.get(metric) for row in scores)
    return [float(value) for value in values if value is not None and math.isfinite(value)]


def mean_sd(values) -> str:
    """'mean ± sd' (sample sd) of the finite values; the value alone for one, '–' for none."""
    values = np.array([v for v in values if v is not None and math.isfinite(v)], float)
    if not len(values):
        return "–"
    return f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else "")


def scores_by_fold(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """Left-out set -> row -> its scores, one dict per run: the model's rows named by recipe (`scgene_row`), the
    baselines under their own names (shared by the recipes of a fold). In order of first appearance."""
    by_fold: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        for row, scores in run["scores"].items():
            name = scgene_row(run) if row == SCGENE_ROW else row
            by_fold.setdefault(run["held_out"], {}).setdefault(name, []).append(scores)
    return by_fold


def metric_tables(runs: list[dict], metrics: dict[str, str]) -> list[str]:
    """Markdown lines: per metric (key -> heading) that was measured, a table with a row per embedding and a column
    per left-out set, each cell the mean ± sd over seeds and their number n ('–' where not measured)."""
    by_fold = scores_by_fold(runs)
    held_outs = list(by_fold)
    names = list(dict.fromkeys(name for rows in by_fold.values() for name in rows))
    lines = []
    for metric, heading in metrics.items():
        values = {name: [finite_values(by_fold[held_out].get(name, []), metric) for held_out in held_outs]
                  for name in names}
        measured = {name: row for name, row in values.items() if any(row)}
        if not measured:
            continue
        lines += [f"**{heading}**", "", "| embedding | " + " | ".join(held_outs) + " |",
                  "|---" * (len(held_outs) + 1) + "|"]
        for name, row in measured.items():
            lines.append(f"| {name} | " + " | ".join(mean_sd(v) + (f" (n={len(v)})" if v else "") for v in row) + " |")
        lines.append("")
    return lines


__all__ = ["corpus_share", "depth_readout", "readouts", "read_runs", "metric_tables", "scores_by_fold", "mean_sd", "recipe_name", "run_recipe", "scgene_row"]
