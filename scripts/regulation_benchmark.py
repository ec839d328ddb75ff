"""The regulation table of docs/regulation.md: `scgene.regulation_benchmark.evaluate_regulation` on every labelled
human set of `scripts/transfer_sets.csv`, for one or more dual-branch checkpoints, over seeds.

Each seed draws the cells (at most `--max-cells`), the shuffled-target null and the untrained model; the split of
CollecTRI's TFs (half held out and scored) is `--split-seed`'s for every seed, the split a checkpoint pretrained with
`--regulation_prior` learned the other half of. The first checkpoint is scored with every baseline; the others on the
same cells, pairs and split (their rows only). The tree baseline, one model per target, runs only for `--tree-seeds`. Every run is appended to `--runs` (JSON lines) and the summary, mean
± sd over seeds, is printed as markdown.

    python scripts/regulation_benchmark.py --model "ScGene=src/scgene/resources/dual_branch_model" \
        --model "ScGene + regulation prior=outputs/constrained" --model "ScGene, 1,024 tokens=...@1024" \
        --seeds 0 1 2 --runs docs/regulation_runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata
import pandas as pd
from leave_one_dataset_out import SETS, prepared_file, read_sets

from scgene.regulation_benchmark import BASELINES, evaluate_regulation

REPO = Path(__file__).resolve().parents[1]
SUMMARY = ["edge_auroc", "epr", "sign_balanced_accuracy", "sign_auroc", "signed_edges_scored"]


def named_model(value: str) -> tuple[str, str, dict]:
    """NAME=PATH, or NAME=PATH@N to read N tokens per cell instead of the checkpoint tokenizer's max_length."""
    name, _, path = value.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"--model {value}: write NAME=PATH or NAME=PATH@MAX_LENGTH")
    path, _, length = path.partition("@")
    return name, path, ({"max_length": int(length)} if length else {})


def summary(runs: list[dict]) -> str:
    """Mean ± sd over seeds of `SUMMARY`, one table per metric: rows = networks, columns = sets."""
    rows = [{"set": run["set"], "seed": run["seed"], "network": network, **scores}
            for run in runs for network, scores in run["scores"].items()]
    table = pd.DataFrame(rows)
    order = list(dict.fromkeys(table["network"]))
    sets = list(dict.fromkeys(table["set"]))
    text = []
    for metric in SUMMARY:
        grouped = table.groupby(["network", "set"])[metric].agg(["mean", "std", "count"])
        lines = [f"**{metric}**", "", "| network | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
        for network in order:
            cells = []
            for name in sets:
                if (network, name) not in grouped.index or pd.isna(grouped.loc[(network, name), "mean"]):
                    cells.append("–")
                    continue
                mean, std, count = grouped.loc[(network, name)]
                cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if count > 1 else ""))
            lines.append(f"| {network} | " + " | ".join(cells) + " |")
        text.append("\n".join(lines))
    return "\n\n".join(text) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scrna")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "regulation")
    parser.add_argument("--model", type=named_model, action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--sets", nargs="*", help="set names (default: every labelled set)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--max-cells", type=int, default=1000)
    parser.add_argument("--split-seed", type=int, default=0, help="the TF split (that of --regulation_split_seed)")
    parser.add_argument("--tree-estimators", type=int, default=30)
    parser.add_argument("--tree-seeds", type=int, nargs="*", default=[0],
                        help="seeds that also run the tree baseline (minutes per set: one model per target)")
    parser.add_argument("--runs", type=Path, help="append each run here (JSON lines)")
    args = parser.parse_args()
    labelled, _ = read_sets(SETS)
    chosen = [s for s in labelled if args.sets is None or s.name in args.sets]
    runs = []
    for labelled_set in chosen:
        adata = anndata.read_h5ad(prepared_file(args.data, labelled_set, args.work))
        for seed in args.seeds:
            for index, (name, path, tokenize_kwargs) in enumerate(args.model):
                start = time.perf_counter()
                baselines = [b for b in BASELINES if b != "trees" or seed in args.tree_seeds] if index == 0 else ()
                report = evaluate_regulation(adata, path, name=name, baselines=baselines,
                                             max_cells=args.max_cells, tree_estimators=args.tree_estimators, seed=seed,
                                             split_seed=args.split_seed,
                                             **tokenize_kwargs)
                table = report.table if index == 0 else report.table.loc[[name]]
                run = {"set": labelled_set.name, "seed": seed, "model": name, "path": path, "info": report.info,
                       "tokenize": tokenize_kwargs,
                       "seconds": round(time.perf_counter() - start, 1),
                       "scores": {row: {k: (None if pd.isna(v) else float(v)) for k, v in values.items()}
                                  for row, values in table.iterrows()}}
                if index == 0:
                    print(f"## {labelled_set.name}, seed {seed}\n\n{report.to_markdown()}", flush=True)
                runs.append(run)
                if args.runs:
                    with args.runs.open("a") as handle:
                        handle.write(json.dumps(run) + "\n")
    print(summary(runs))


if __name__ == "__main__":
    main()
