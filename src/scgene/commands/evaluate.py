"""`scgene evaluate IN.h5ad --model DIR --label-key COL`: does the model's cell embedding carry cell identity?

Scores the checkpoint's embeddings next to baselines on the same cells (the same model untrained, the prior alone,
50 PCs of log1p HVGs, logistic regression on expression) and prints a markdown table with the targets met; `--json`
and `--markdown` save it. See `scgene.evaluation` for the metrics.
"""

from __future__ import annotations

import argparse
import sys

from . import (
    USER_ERRORS,
    add_report_arguments,
    claimed_reports,
    coverage_report_shown,
    show_report,
    user_error_message,
)
from .embed import GENES_HELP, POOLING_LAYER_HELP, add_tokenizing_arguments, command_inputs, genes_option

FLAGS = {"label_key": "--label-key", "batch_key": "--batch-key", "max_length": "--max-length",
         "gene_column=": "--gene-column", "tokenizer=": "--tokenizer", "layer=": "--layer ", "use_raw=True": "--use-raw",
         "ScGeneConfig.pooling_layer": "--pooling-layer"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation import BASELINES, EvaluationSettings

    defaults = EvaluationSettings()
    parser.add_argument("input", help="labelled .h5ad with raw counts in X (read, never modified)")
    parser.add_argument("--model", help="ScGene checkpoint folder or Hub id (any head: its encoder is used; default: the "
                                        "checkpoint shipped with scgene)")
    parser.add_argument("--label-key", required=True, help="obs column with the cell labels (e.g. cell_type)")
    parser.add_argument("--batch-key", help="obs column with batches: adds label transfer across batches and batch mixing")
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                        help="baselines scored on the same cells (default: all)")
    add_report_arguments(parser)
    parser.add_argument("--leiden-resolution", type=float, default=defaults.leiden_resolution, help="default %(default)s")
    parser.add_argument("--n-neighbors", type=int, default=defaults.n_neighbors, help="kNN and graph neighbours (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="folds, clustering and the untrained model (default %(default)s)")
    add_tokenizing_arguments(parser)
    parser.add_argument("--pooling-layer", type=int, help=POOLING_LAYER_HELP)
    parser.add_argument("--genes", help=GENES_HELP.replace("(default", "for the model, the untrained model and the prior "
                                                                       "(default"))
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvaluationSettings, evaluate
    from .annotated_copy import read_input

    try:
        if args.n_neighbors < 1 or (args.max_length is not None and args.max_length < 1):
            raise ValueError("--n-neighbors and --max-length must be positive integers.")
        inputs = command_inputs(args)
        genes = genes_option(args.genes)
        with claimed_reports(args, inputs, "evaluate"):
            with read_input(args.input) as backed:  # a one-line error for a missing or corrupt file
                adata = backed.to_memory()
            settings = EvaluationSettings(n_neighbors=args.n_neighbors, leiden_resolution=args.leiden_resolution,
                                          seed=args.seed)
            options = {key: getattr(args, key) for key in ("gene_column", "max_length", "layer")
                       if getattr(args, key) is not None} | ({"use_raw": True} if args.use_raw else {})
            if genes is not None:
                options["genes"] = genes
            report = evaluate(adata, args.model, label_key=args.label_key, batch_key=args.batch_key,
                              tokenizer=args.tokenizer, baselines=args.baselines, settings=settings, device=args.device,
                              pooling_layer=args.pooling_layer, **options)
            report.save(markdown=args.markdown, json_path=args.json)
    except USER_ERRORS as error:
        print(user_error_message("evaluate", error, FLAGS), file=sys.stderr)
        return 1
    return show_report(report, args)
