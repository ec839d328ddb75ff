"""`scgene evaluate-regulation IN.h5ad`: does the checkpoint's signed network agree with a curated one?

Scores `scgene.regulation` against CollecTRI (or `--reference`) on a held-out half of its transcription factors, next
to correlation, tree, prior and prior-probe baselines on the same cells, and prints a markdown table with the targets
met (the model's, and the prior probe's); `--json` and `--markdown` save it. See `scgene.regulation_benchmark` for
the metrics and the shuffled-target null.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import (
    USER_ERRORS,
    add_report_arguments,
    claimed_reports,
    coverage_report_shown,
    existing_paths,
    show_report,
    user_error_message,
)

FLAGS = {"test_fraction": "--test-fraction", "max_cells": "--max-cells", "min_cells": "--min-cells",
         "null_ratio": "--null-ratio", "gene_column=": "--gene-column", "tokenizer=": "--tokenizer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..regulation_benchmark import BASELINES

    parser.add_argument("input", help=".h5ad with raw counts in X (read, never modified)")
    parser.add_argument("--model", help="a dual-branch ScGene checkpoint folder or Hub id (default: the one shipped "
                                        "with scgene)")
    parser.add_argument("--reference", help="signed reference network, a CSV/TSV with source, target, weight (default: "
                                            "CollecTRI, shipped with scgene)")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="baselines scored on the same cells (default: all)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of the TFs held out and scored "
                                                                         "(default %(default)s)")
    parser.add_argument("--max-cells", type=int, default=2000, help="cells drawn for the run (default %(default)s)")
    parser.add_argument("--min-cells", type=int, default=5, help="as for `scgene regulation` (default %(default)s)")
    parser.add_argument("--null-ratio", type=int, default=10, help="shuffled-target pairs per reference edge "
                                                                   "(default %(default)s)")
    parser.add_argument("--tree-estimators", type=int, default=50, help="trees per target of the tree baseline "
                                                                        "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="cells, null and untrained model (default 0)")
    parser.add_argument("--split-seed", type=int, help="the TF split (default: --seed); a model pretrained with "
                                                       "--regulation_prior is scored with its --regulation_split_seed")
    add_report_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the one saved with the model)")
    parser.add_argument("--gene-column", help="var column with gene names (default: the tokenizer's, else detect)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..gene_regulation import DEFAULT_REGULATION_CHECKPOINT
    from ..regulation_benchmark import evaluate_regulation
    from .annotated_copy import read_input

    try:
        for flag, value in (("--max-cells", args.max_cells), ("--min-cells", args.min_cells),
                            ("--null-ratio", args.null_ratio), ("--tree-estimators", args.tree_estimators)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}.")
        if args.reference is not None and not os.path.isfile(args.reference):
            raise FileNotFoundError(f"--reference {args.reference} is not a file; pass a CSV/TSV with source, target, "
                                    "weight, or leave it out for CollecTRI.")
        inputs = [args.input, *existing_paths(args.model or DEFAULT_REGULATION_CHECKPOINT, args.tokenizer, args.reference)]
        with claimed_reports(args, inputs, "evaluate-regulation"):
            with read_input(args.input) as adata:
                options = {"gene_column": args.gene_column} if args.gene_column else {}
                report = evaluate_regulation(adata, args.model, args.reference, baselines=args.baselines,
                                             test_fraction=args.test_fraction, max_cells=args.max_cells,
                                             min_cells=args.min_cells, null_ratio=args.null_ratio,
                                             tree_estimators=args.tree_estimators, seed=args.seed,
                                             split_seed=args.split_seed,
                                             tokenizer=args.tokenizer, device=args.device, **options)
            report.save(markdown=args.markdown, json_path=args.json)
    except USER_ERRORS as error:
        print(user_error_message("evaluate-regulation", error, FLAGS), file=sys.stderr)
        return 1
    return show_report(report, args)
