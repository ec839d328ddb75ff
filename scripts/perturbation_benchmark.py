"""Score `scgene.perturb` on the real CRISPR screens of `../shared/data/perturbation` (see `scgene.perturbation_benchmark`
for the method and baselines), one table per screen plus a summary; rows appended to a JSONL file.

    python scripts/perturbation_benchmark.py [--data ../shared/data/perturbation] [--model DIR] [--seeds 0 1 2]
        [--max-control-cells 500] [--jsonl docs/perturbation_runs.jsonl] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import pandas as pd

from scgene.perturbation_benchmark import EFFECT_FDR, evaluate_perturbation
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
    parser.add_argument("--jsonl", help="append one JSON line per (screen, seed)")
    parser.add_argument("--markdown", help="write the summary and per-target tables here")
    args = parser.parse_args()
    sections, summaries = [], {False: [], True: []}
    for name in args.screens:
        adata = ad.read_h5ad(Path(args.data) / name)
        for seed in args.seeds:
            report = evaluate_perturbation(adata, args.model, screen=SCREENS[name], seed=seed,
                                           max_control_cells=args.max_control_cells, adapt_steps=args.adapt_steps,
                                           adapt_learning_rate=args.adapt_learning_rate)
            for measurable in summaries:
                summaries[measurable].append(report.summary(measurable).reset_index()
                                             .assign(screen=name.split("_")[0], seed=seed))
            sections.append(f"### {name} (seed {seed})\n\n{report.to_markdown()}")
            print(sections[-1], flush=True)
            if args.jsonl:
                with open(args.jsonl, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"file": name, **json.loads(report.to_json())}) + "\n")
    tables = {measurable: seed_means(pd.concat(rows)) for measurable, rows in summaries.items()}
    overview = (f"{markdown_table(tables[False])}\n\nTargets with a measurable effect only (effect_fdr < "
                f"{EFFECT_FDR}; targets: mean over the seeds):\n\n{markdown_table(tables[True])}")
    text = overview + "\n\n" + "\n\n".join(sections) + "\n"
    print(overview)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
