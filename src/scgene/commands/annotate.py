"""`scgene annotate IN.h5ad --model CLS_DIR --out OUT.h5ad`: cell-type labels from a fine-tuned classifier.

Writes `obs['scgene_label']`, `obs['scgene_label_confidence']`, `obsm['scgene_label_probabilities']` and
`uns['scgene_label']` (the label order), and prints a count per label.
"""

from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS, coverage_report_shown, user_error_message
from .embed import FLAGS, add_common_arguments, command_inputs, inference_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "a cell-type classifier checkpoint (examples/finetune_cell_type.py) or Hub id")
    parser.add_argument("--key", default="scgene_label", help="obs column of the labels (default %(default)s)")
    parser.add_argument("--min-confidence", type=float, help="label cells below this probability 'Unknown'")


def run(args: argparse.Namespace) -> int:
    with coverage_report_shown():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..fileio import claimed_output
    from ..inference import annotate
    from .annotated_copy import read_input, write_annotated_copy

    try:
        options = inference_options(args)
        with claimed_output(args.out, command_inputs(args), command="annotate", folder=False, overwrite=args.overwrite):
            with read_input(args.input) as adata:
                result = annotate(adata, args.model, key_added=args.key, min_confidence=args.min_confidence, **options)
                obsm = {f"{args.key}_probabilities": adata.obsm[f"{args.key}_probabilities"]}
                uns = {args.key: adata.uns[args.key] | {"labels": list(adata.uns[args.key]["labels"])}}
            write_annotated_copy(args.input, args.out, obs=result, obsm=obsm, uns=uns)
    except USER_ERRORS as error:
        print(user_error_message("annotate", error, FLAGS | {"min_confidence": "--min-confidence"}), file=sys.stderr)
        return 1
    labels = result[args.key]
    confidence = result[f"{args.key}_confidence"]
    print(f"{'label':<32} {'cells':>7} {'mean confidence':>16}")
    for label, cells in labels.value_counts(sort=True).items():
        if cells:
            print(f"{label:<32} {cells:>7} {confidence[labels == label].mean():>16.3f}")
    print(f"Wrote {args.out}")
    return 0
