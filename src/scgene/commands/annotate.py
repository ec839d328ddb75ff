"""`scgene annotate IN.h5ad --out OUT.h5ad` with `--model CLS_DIR` (a fine-tuned classifier) or `--reference REF.h5ad
--label-key COL` (label transfer from a labelled file, on the genes both measure, with "Unknown" for cells far from it).

Writes `obs['scgene_label']`, `obs['scgene_label_confidence']` and `uns['scgene_label']` (the label order and what
produced them); a classifier adds `obsm['scgene_label_probabilities']`, a reference `obs['scgene_label_distance']`.
Prints a count per label.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import USER_ERRORS, coverage_report_shown, user_error_message
from .embed import FLAGS, add_common_arguments, command_inputs, inference_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "a cell-type classifier checkpoint (examples/finetune_cell_type.py) or Hub id; with "
                                 "--reference, the model that embeds both files (default: the shipped checkpoint)",
                         model_required=False)
    parser.add_argument("--reference", help="a labelled .h5ad whose labels are transferred (instead of a classifier)")
    parser.add_argument("--label-key", help="with --reference: the reference's obs column of labels")
    parser.add_argument("--unknown-quantile", type=float, default=0.95,
                        help="with --reference: cells farther from the reference than this quantile of held-out "
                             "reference cells are 'Unknown' (default %(default)s)")
    parser.add_argument("--key", default="scgene_label", help="obs column of the labels (default %(default)s)")
    parser.add_argument("--min-confidence", type=float, help="label cells below this probability 'Unknown'")


def run(args: argparse.Namespace) -> int:
    with coverage_report_shown():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..fileio import claimed_output
    from ..inference import annotate
    from ..label_transfer import transfer_labels
    from .annotated_copy import read_input, write_annotated_copy

    flags = FLAGS | {"min_confidence": "--min-confidence", "label_key": "--label-key",
                     "unknown_quantile": "--unknown-quantile"}
    try:
        options = inference_options(args)
        if args.reference is None and (args.model is None or args.label_key is not None):
            raise ValueError("annotate needs a classifier (--model CLS_DIR) or a labelled reference (--reference "
                             "REF.h5ad --label-key COLUMN).")
        if args.reference is not None and args.label_key is None:
            raise ValueError("--reference needs --label-key: the reference's obs column of labels.")
        if args.reference is not None and not os.path.isfile(args.reference):
            raise FileNotFoundError(f"--reference {args.reference} is not a file; pass the path of a labelled .h5ad.")
        inputs = command_inputs(args) + ([args.reference] if args.reference else [])
        with claimed_output(args.out, inputs, command="annotate", folder=False, overwrite=args.overwrite):
            with read_input(args.input) as adata:
                obsm = {}
                if args.reference is None:
                    result = annotate(adata, args.model, key_added=args.key, min_confidence=args.min_confidence,
                                      **options)
                    obsm = {f"{args.key}_probabilities": adata.obsm[f"{args.key}_probabilities"]}
                else:
                    with read_input(args.reference) as reference:
                        result = transfer_labels(adata, reference, label_key=args.label_key, model=args.model,
                                                 key_added=args.key, unknown_quantile=args.unknown_quantile,
                                                 min_confidence=args.min_confidence, **options)
                    adata.uns[args.key]["reference"] = os.path.abspath(args.reference)
                uns = {args.key: adata.uns[args.key] | {"labels": list(adata.uns[args.key]["labels"])}}
            write_annotated_copy(args.input, args.out, obs=result, obsm=obsm, uns=uns)
    except USER_ERRORS as error:
        print(user_error_message("annotate", error, flags), file=sys.stderr)
        return 1
    labels = result[args.key]
    confidence = result[f"{args.key}_confidence"]
    print(f"{'label':<32} {'cells':>7} {'mean confidence':>16}")
    for label, cells in labels.value_counts(sort=True).items():
        if cells:
            print(f"{label:<32} {cells:>7} {confidence[labels == label].mean():>16.3f}")
    print(f"Wrote {args.out}")
    return 0
