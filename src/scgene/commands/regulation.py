"""`scgene regulation IN.h5ad --out edges.tsv`: the signed regulator -> target network a dual-branch checkpoint holds.

Writes the long table `source, target, weight, abs_weight, rank, cells` (a `group` column first with `--groupby`) as
tab-separated text, and with `--plot` a heatmap of the strongest regulators and their targets. See
`scgene.gene_regulation` for what the weights are. `--method prior-probe` writes instead the network the frozen prior
predicts from a curated reference (`scgene.regulation_probe`; `in_reference` in place of `cells`).
"""

from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS, claimed_files, coverage_report_shown, existing_paths, user_error_message
from .embed import add_reading_arguments, genes_option, reading_options

FLAGS = {"reference": "--reference ", "top_k": "--top-k", "min_cells": "--min-cells", "groupby=": "--groupby ", "regulators=": "--regulators ",
         "max_memory_gb": "--max-memory-gb", "gene_column=": "--gene-column", "tokenizer=": "--tokenizer",
         "layer=": "--layer ", "use_raw=True": "--use-raw", "max_length": "--max-length",
         "max_tokens_per_batch": "--max-tokens-per-batch"}
REGULATORS_HELP = ("'tfs' (the 1,186 transcription factors of CollecTRI, shipped with scgene), or a text file with one "
                   "gene name per line (default: every gene; on more than a few thousand genes pass 'tfs')")


def regulators_option(value: str | None):
    """`--regulators`: None (every gene), CollecTRI's TFs, or the names listed in a text file."""
    if value is None:
        return None
    if value == "tfs":
        from ..gene_regulation import transcription_factors

        return transcription_factors()
    return genes_option(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the .h5ad file (raw counts or log1p-normalised in X; read backed, never modified)")
    parser.add_argument("--out", required=True, help="the edges as a tab-separated table (.tsv), written atomically")
    parser.add_argument("--model", help="a dual-branch ScGene checkpoint folder or Hub id (default: the one shipped "
                                        "with scgene)")
    parser.add_argument("--method", choices=["attention", "prior-probe"], default="attention",
                        help="attention: the gene branch's signed map over these cells (default); prior-probe: the "
                             "edges the frozen prior predicts, learned from --reference (the same for any cells "
                             "measuring the same genes)")
    parser.add_argument("--reference", help="with --method prior-probe: a signed network (source, target, weight) to "
                                            "learn from (default: CollecTRI, shipped with scgene)")
    parser.add_argument("--regulators", help=REGULATORS_HELP)
    parser.add_argument("--groupby", help="obs column: one network per group (e.g. per cluster or cell type)")
    parser.add_argument("--top-k", type=int, default=100, help="targets kept per regulator (default %(default)s)")
    parser.add_argument("--min-cells", type=int, default=5,
                        help="keep a pair seen together in at least this many cells (default %(default)s)")
    parser.add_argument("--max-memory-gb", type=float, default=4.0,
                        help="refuse a network whose accumulators need more (default %(default)s)")
    parser.add_argument("--plot", metavar="IMAGE", help="save a heatmap of the strongest regulators' targets here")
    parser.add_argument("--plot-regulators", nargs="*", metavar="GENE", help="the regulators to plot (default: the 10 "
                                                                             "strongest)")
    parser.add_argument("--plot-group", help="with --groupby: the group whose network --plot shows")
    add_reading_arguments(parser)


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_path
    from ..gene_regulation import DEFAULT_REGULATION_CHECKPOINT, regulation
    from ..plotting import image_format, regulation_heatmap
    from ..regulation_probe import prior_regulation
    from .annotated_copy import read_input

    try:
        if args.plot:
            image_format(args.plot)
            if args.groupby and args.plot_group is None:
                raise ValueError("--plot with --groupby shows one group's network: name it with --plot-group.")
        if args.method == "prior-probe" and args.groupby:
            raise ValueError("--method prior-probe reads no expression, so every group would get the same network: "
                             "leave --groupby out, or use --method attention.")
        if args.reference and args.method != "prior-probe":
            raise ValueError("--reference is what --method prior-probe learns from: add --method prior-probe.")
        inputs = [args.input, *existing_paths(args.model or DEFAULT_REGULATION_CHECKPOINT, args.tokenizer, args.reference)]
        regulators = regulators_option(args.regulators)
        with claimed_files((args.out, args.plot), inputs, "regulation", args.overwrite):
            with read_input(args.input) as adata:
                if args.method == "prior-probe":
                    network = prior_regulation(adata, args.model, regulators=regulators, reference=args.reference,
                                               top_k=args.top_k, key_added=None, tokenizer=args.tokenizer,
                                               gene_column=args.gene_column)
                else:
                    options = reading_options(args, adata)
                    network = regulation(adata, args.model, regulators=regulators, groupby=args.groupby,
                                         top_k=args.top_k, min_cells=args.min_cells, tokenizer=args.tokenizer,
                                         device=args.device, max_memory_gb=args.max_memory_gb, key_added=None, **options)
            with atomic_path(args.out) as staged:
                network.to_csv(staged, sep="\t", index=False)
            print(f"Wrote {args.out}: {len(network)} edges of {network['source'].nunique()} regulators")
            if args.plot:
                shown = network
                if args.groupby:
                    shown = network[network["group"] == args.plot_group]
                    if shown.empty:
                        raise ValueError(f"--plot-group {args.plot_group!r} is not a group of --groupby "
                                         f"{args.groupby}: {sorted(network['group'].unique())[:20]}")
                regulation_heatmap(shown, args.plot, regulators=args.plot_regulators or None)
                print(f"Saved the heatmap to {args.plot}")
    except USER_ERRORS as error:
        print(user_error_message("regulation", error, FLAGS), file=sys.stderr)
        return 1
    return 0
