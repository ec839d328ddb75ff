"""`scgene predict-from-screen SCREEN.h5ad --screen knockout --targets STAT1,IRF1 --out changes.tsv`: predict
perturbations nobody screened from the screened perturbations that act alike.

Writes each asked perturbation's predicted change of every gene of the screen (long table `perturbation, gene, change,
rank`, rank by |change|) as tab-separated text; `--weights` which screened targets each prediction borrows from
(`perturbation, screened_target, weight, rank`), `--plot` bars of the largest changes. See
`scgene.screen_prediction` for the method.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import USER_ERRORS, claimed_files, coverage_report_shown, existing_paths, user_error_message
from .evaluate_perturbation import SCREEN_FLAGS, add_screen_arguments
from .perturb import targets_option

FLAGS = SCREEN_FLAGS | {"genes=": "--targets ", "similarity must": "--similarity must"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..screen_prediction import SIMILARITIES

    add_screen_arguments(parser, "what the screen did; the predicted perturbations are of the same kind",
                         "for --similarity annotations")
    parser.add_argument("--targets", required=True, help="perturbations to predict: 'STAT1,JAK2+IRF1' (A+B: "
                                                         "together) or a text file, one per line")
    parser.add_argument("--out", required=True, help="the predicted changes as a .tsv, written atomically")
    parser.add_argument("--similarity", choices=SIMILARITIES, default="scgene",
                        help="how alike two perturbations are: ScGene's predicted changes, or shared GO and hallmark "
                             "annotations (default %(default)s)")
    parser.add_argument("--weights", metavar="TSV", help="save the screened targets each prediction borrows from here")
    parser.add_argument("--plot", metavar="IMAGE", help="save bars of the largest predicted changes here")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    import anndata

    from ..fileio import atomic_path
    from ..inference import DEFAULT_CHECKPOINT
    from ..plotting import image_format, perturbation_changes
    from ..screen_prediction import predict_from_screen

    try:
        if args.plot:
            image_format(args.plot)
        if args.max_control_cells < 1:
            raise ValueError(f"--max-control-cells must be a positive integer, got {args.max_control_cells}.")
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"{args.input} is not a file; pass the path of an .h5ad screen.")
        inputs = [args.input, *existing_paths(args.model or DEFAULT_CHECKPOINT, args.tokenizer, args.knowledge)]
        with claimed_files((args.out, args.weights, args.plot), inputs, "predict-from-screen", args.overwrite):
            prediction = predict_from_screen(anndata.read_h5ad(args.input), targets_option(args.targets), args.model,
                                             screen=args.screen, similarity=args.similarity,
                                             perturbation_key=args.perturbation_key, control=args.control,
                                             max_control_cells=args.max_control_cells, seed=args.seed,
                                             tokenizer=args.tokenizer, knowledge=args.knowledge)
            with atomic_path(args.out) as staged:
                prediction.top_changes(None).to_csv(staged, sep="\t", index=False)
            print(f"Wrote {args.out}: {len(prediction.changes)} perturbations x {prediction.changes.shape[1]} genes, "
                  f"borrowed from {prediction.settings['screened_targets']} screened targets")
            if args.weights:
                with atomic_path(args.weights) as staged:
                    prediction.nearest(None).to_csv(staged, sep="\t", index=False)
                print(f"Wrote {args.weights}")
            if args.plot:
                perturbation_changes(prediction.top_changes(15), args.plot, n_genes=15)
                print(f"Saved the plot to {args.plot}")
    except USER_ERRORS as error:
        print(user_error_message("predict-from-screen", error, FLAGS), file=sys.stderr)
        return 1
    return 0
