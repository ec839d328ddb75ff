"""Score `scgene.perturb` on the real CRISPR screens of `../shared/data/perturbation` (see `scgene.perturbation_benchmark`
for the method and baselines), one table per screen plus a summary; rows appended to a JSONL file.

    python scripts/perturbation_benchmark.py [--data ../shared/data/perturbation] [--model DIR] [--seeds 0 1 2]
        [--max-control-cells 500] [--jsonl docs/perturbation_runs.jsonl] [--markdown OUT.md]
    python scripts/perturbation_benchmark.py --runs docs/perturbation_runs.jsonl --seeds 0 1 2 [--adapt-steps 1500]
        [--knockout-mode delete]
        (tabulates saved runs: the summaries and, per screen, each target's mean over the seeds)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import pandas as pd

from scgene.perturbation_benchmark import EFFECT_FDR, PerturbationReport, evaluate_perturbation
from scgene.reports import markdown_table

# file -> screen kind (sets the in-silico mode)
SCREENS = {
    "papalexi2021_thp1_eccite_ko_299genes_dev.h5ad": "knockout",
    "norman2019_k562_crispra_500hvg.h5ad": "crispra",
    "datlinger2017_jurkat_cropseq_ko_2000genes.h5ad": "knockout",
    "mcfaline2023_gbm_crispr_500hvg.h5ad": "crispri",
}


def seed_means(summaries: pd.DataFrame) -> pd.DataFrame:
    """Each (screen, method)'s mean over the seeds' summaries."""
    columns = ["pearson_delta", "direction_accuracy", "replicate_pearson_delta", "replicate_direction_accuracy",
               "targets_scored", "targets"]
    means = summaries.groupby(["screen", "method"], sort=False)[columns].mean().reset_index()
    means[columns[-2:]] = means[columns[-2:]].map(lambda count: f"{count:.3g}")  # 5, or 22.3 when seeds differ
    return means


def scores(delta: pd.Series, direction: pd.Series) -> list[str]:
    """'pearson_delta / direction accuracy' cells, '–' for an undefined pearson_delta."""
    return [f"{'–' if pd.isna(r) else f'{r:.2f}'} / {'–' if pd.isna(d) else f'{d:.2f}'}"
            for r, d in zip(delta, direction, strict=True)]


def per_target(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One screen's targets that the model perturbed, each method's 'pearson_delta / direction' averaged over the
    seeds' tables (but no change's, which is none), with the target's facts: cells, its own observed change, the
    replicate ceiling, and on how many seeds its effect was measurable."""
    rows = pd.concat(tables)
    rows = rows[rows.groupby("target")["model_cells_perturbed"].transform("max") > 0]
    means = rows.groupby(["target", "method"], sort=False)[["pearson_delta", "direction_accuracy"]].mean()
    wide = pd.Series(scores(means["pearson_delta"], means["direction_accuracy"]), index=means.index).unstack("method")
    facts = rows.groupby("target").agg(
        cells=("cells", "first"), observed=("target_observed_change", "mean"),
        replicate_delta=("replicate_pearson_delta", "mean"), replicate_direction=("replicate_direction_accuracy", "mean"))
    seeds_measurable = sum((table.groupby("target")["effect_fdr"].first() < EFFECT_FDR).astype(int) for table in tables)
    facts[f"effect_fdr < {EFFECT_FDR} (seeds)"] = [f"{seeds_measurable[target]}/{len(tables)}" for target in facts.index]
    facts["target measured (its observed change)"] = [
        "no" if pd.isna(change) else f"yes ({change:+.2f})" for change in facts.pop("observed")]
    facts["replicate"] = scores(facts.pop("replicate_delta"), facts.pop("replicate_direction"))
    methods = [method for method in dict.fromkeys(rows["method"]) if method != "no change"]  # always – / 0.00
    return facts.join(wide[methods]).reset_index()


def in_silico_mode(screen: str, knockout_mode: str) -> str:
    """The in-silico mode a screen kind is scored with: `knockout_mode` for knockout and CRISPRi screens."""
    return "overexpress" if screen == "crispra" else knockout_mode


def saved_reports(path: str, screens: list[str], seeds: list[int], adapt_steps: int, knockout_mode: str) -> list:
    """(file, seed, report) of the runs saved in the JSONL file at `path` that match the screens, seeds, adaptation
    steps and in-silico mode asked for; of a run saved more than once, the last."""
    reports = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            run = json.loads(line)
            settings = run["settings"]
            if (run["file"] in screens and settings["seed"] in seeds and (settings["adapt_steps"] or 0) == adapt_steps
                    and settings["mode"] == in_silico_mode(SCREENS[run["file"]], knockout_mode)):
                reports[run["file"], settings["seed"]] = PerturbationReport(pd.DataFrame(run["table"]), settings)
    if not reports:
        raise SystemExit(f"{path} holds no run of {screens} with seeds {seeds}, --adapt-steps {adapt_steps} and "
                         f"--knockout-mode {knockout_mode}.")
    order = sorted(reports, key=lambda run: (list(SCREENS).index(run[0]), run[1]))  # as the script runs them
    return [(file, seed, reports[file, seed]) for file, seed in order]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "perturbation"))
    parser.add_argument("--model", help="checkpoint (default: the shipped one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-control-cells", type=int, default=500)
    parser.add_argument("--screens", nargs="*", default=list(SCREENS))
    parser.add_argument("--adapt-steps", type=int, default=0,
                        help="masked-expression steps on the seen control cells before perturbing (default 0)")
    parser.add_argument("--adapt-learning-rate", type=float, default=3e-4)
    parser.add_argument("--knockout-mode", choices=["knockout", "delete"], default="knockout",
                        help="in-silico mode of the knockout and CRISPRi screens (default %(default)s)")
    parser.add_argument("--jsonl", help="append one JSON line per (screen, seed)")
    parser.add_argument("--runs", metavar="JSONL", help="run nothing: tabulate the matching runs saved in this file")
    parser.add_argument("--markdown", help="write the summary and per-target tables here")
    args = parser.parse_args()
    if args.runs:
        reports = saved_reports(args.runs, args.screens, args.seeds, args.adapt_steps, args.knockout_mode)
    else:
        reports = []
        for name in args.screens:
            adata = ad.read_h5ad(Path(args.data) / name)
            for seed in args.seeds:
                report = evaluate_perturbation(adata, args.model, screen=SCREENS[name], seed=seed,
                                               mode=in_silico_mode(SCREENS[name], args.knockout_mode),
                                               max_control_cells=args.max_control_cells, adapt_steps=args.adapt_steps,
                                               adapt_learning_rate=args.adapt_learning_rate)
                reports.append((name, seed, report))
                print(f"### {name} (seed {seed})\n\n{report.to_markdown()}", flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"file": name, **json.loads(report.to_json())}) + "\n")
    tables = {measurable: seed_means(pd.concat([report.summary(measurable).reset_index()
                                                .assign(screen=name.split("_")[0], seed=seed)
                                                for name, seed, report in reports]))
              for measurable in (False, True)}
    sections = [f"{markdown_table(tables[False])}\n\nTargets with a measurable effect only (effect_fdr < {EFFECT_FDR}; "
                f"targets: mean over the seeds):\n\n{markdown_table(tables[True])}"]
    for name in dict.fromkeys(name for name, _, _ in reports):
        runs = [report.table for file, _, report in reports if file == name]
        sections.append(f"{name}: pearson_delta / direction accuracy (top genes), mean of {len(runs)} seed(s)\n\n"
                        + markdown_table(per_target(runs)))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
