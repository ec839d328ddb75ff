"""`scgene evaluate-perturbation SCREEN.h5ad --screen knockout`: do in-silico perturbations match a real screen?

For each target, `scgene.perturb` on the screen's control cells is scored against the observed change of the
target's cells, next to no change, the mean of the other perturbations (plain and GO-weighted), the sum of the
single perturbations for a combination and a linear co-expression model; prints
markdown tables (per method over all targets, per method over the targets with a measurable effect, then per
target), `--json` and `--markdown` save them. See `scgene.perturbation_benchmark`.
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

SCREEN_FLAGS = {"perturbation_key": "--perturbation-key", "max_control_cells": "--max-control-cells",
                "screen must": "--screen must", "tokenizer=": "--tokenizer",
                " or pass its name (gene_column=)": ""}  # the knowledge table's gene column has no flag here


def add_screen_arguments(parser: argparse.ArgumentParser, screen_help: str, knowledge_use: str) -> None:
    """The arguments of a command that reads a CRISPR screen: the file, what it did, how its cells are labelled, the
    model and the gene knowledge table (`knowledge_use`: what the table is for)."""
    from ..perturbation_benchmark import MODE_OF_SCREEN

    parser.add_argument("input", help=".h5ad screen with raw counts in X and each cell's target in obs (read, never "
                                      "modified)")
    parser.add_argument("--screen", required=True, choices=list(MODE_OF_SCREEN), help=screen_help)
    parser.add_argument("--model", help="a pretrained ScGene checkpoint with its masked-expression head (default: the "
                                        "one shipped with scgene)")
    parser.add_argument("--perturbation-key", default="perturbation", help="obs column naming each cell's target "
                                                                           "(A+B for two; default %(default)s)")
    parser.add_argument("--control", default="control", help="its value for control cells (default %(default)s)")
    parser.add_argument("--max-control-cells", type=int, default=500,
                        help="control cells the model perturbs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the control cells' sample and the masks (default 0)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the one saved with the model)")
    parser.add_argument("--knowledge", help="gene knowledge table (.csv/.tsv/.xlsx, 0/1 'GO:' and 'HALLMARK_' columns) "
                                            f"{knowledge_use} (default: the one shipped with scgene)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..perturbation_benchmark import SCREEN_MODES

    add_screen_arguments(parser, "knockout and crispri are scored with in-silico knockout, crispra with overexpression",
                         "that weights the GO-weighted baseline")
    parser.add_argument("--mode", choices=SCREEN_MODES,
                        help="the in-silico perturbation instead (delete scores only the targets the file measures)")
    parser.add_argument("--targets", nargs="*", help="targets to score (default: all)")
    parser.add_argument("--top-genes", type=int, default=20, help="genes of the direction accuracy (default %(default)s)")
    parser.add_argument("--adapt-steps", type=int, default=0,
                        help="first train the model this many masked-expression steps on the control cells it sees "
                             "(self-supervised, no perturbed cell; default %(default)s)")
    parser.add_argument("--adapt-learning-rate", type=float, default=3e-4, help="(default %(default)s)")
    add_report_arguments(parser, "the table and settings")


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    import anndata

    from ..inference import DEFAULT_CHECKPOINT
    from ..perturbation_benchmark import evaluate_perturbation

    try:
        for flag, value in (("--max-control-cells", args.max_control_cells), ("--top-genes", args.top_genes)):
            if value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value}.")
        if args.adapt_steps < 0 or args.adapt_learning_rate <= 0:
            raise ValueError("--adapt-steps must be 0 or more and --adapt-learning-rate positive, got "
                             f"{args.adapt_steps} and {args.adapt_learning_rate}.")
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"{args.input} is not a file; pass the path of an .h5ad screen.")
        inputs = [args.input, *existing_paths(args.model or DEFAULT_CHECKPOINT, args.tokenizer, args.knowledge)]
        with claimed_reports(args, inputs, "evaluate-perturbation"):
            report = evaluate_perturbation(anndata.read_h5ad(args.input), args.model, screen=args.screen, mode=args.mode,
                                           perturbation_key=args.perturbation_key, control=args.control,
                                           targets=args.targets, max_control_cells=args.max_control_cells,
                                           top_genes=args.top_genes, adapt_steps=args.adapt_steps,
                                           adapt_learning_rate=args.adapt_learning_rate, seed=args.seed,
                                           tokenizer=args.tokenizer, knowledge=args.knowledge, progress=True)
            report.save(markdown=args.markdown, json_path=args.json)
    except USER_ERRORS as error:
        print(user_error_message("evaluate-perturbation", error, SCREEN_FLAGS), file=sys.stderr)
        return 1
    return show_report(report, args)
