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


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..fileio import claimed_output
    from .annotated_copy import read_input, write_annotated_copy
    from .processes import launched

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
        if launched():
            return annotate_distributed(args, options, inputs, flags)
        with claimed_output(args.out, inputs, command="annotate", folder=False, overwrite=args.overwrite):
            with read_input(args.input) as adata:
                result, obsm, uns = label_cells(args, adata, options)
            write_annotated_copy(args.input, args.out, obs=result, obsm=obsm, uns=uns)
    except USER_ERRORS as error:
        print(user_error_message("annotate", error, flags), file=sys.stderr)
        return 1
    return show_counts(args, result)


def label_cells(args: argparse.Namespace, adata, options: dict):
    """The labels of `adata`'s cells by the classifier or the reference: (obs columns, obsm, uns) to write."""
    from ..inference import annotate
    from ..label_transfer import transfer_labels
    from .annotated_copy import read_input

    obsm = {}
    if args.reference is None:
        result = annotate(adata, args.model, key_added=args.key, min_confidence=args.min_confidence, **options)
        obsm = {f"{args.key}_probabilities": adata.obsm[f"{args.key}_probabilities"]}
    else:
        with read_input(args.reference) as reference:
            result = transfer_labels(adata, reference, label_key=args.label_key, model=args.model, key_added=args.key,
                                     unknown_quantile=args.unknown_quantile, min_confidence=args.min_confidence,
                                     **options)
        adata.uns[args.key]["reference"] = os.path.abspath(args.reference)
    return result, obsm, {args.key: adata.uns[args.key] | {"labels": list(adata.uns[args.key]["labels"])}}


def annotate_distributed(args: argparse.Namespace, options: dict, inputs: list, flags: dict) -> int:
    """Under torchrun / accelerate launch: each process labels its share of the cells (with --reference, each fits the
    same annotator on the whole reference), rank 0 gathers the labels in input order and writes `--out`."""
    import contextlib

    import numpy as np
    import pandas as pd
    import torch.distributed as dist

    from ..fileio import claimed_output
    from ..sharding import shard_range
    from .annotated_copy import read_input, write_annotated_copy
    from .processes import claimed_by_rank_zero, process_group

    def claim():
        return claimed_output(args.out, inputs, command="annotate", folder=False, overwrite=args.overwrite)

    with process_group(options, args.device) as (rank, world, device), contextlib.ExitStack() as claims:
        if not claimed_by_rank_zero(claims, rank, device, claim, "annotate", flags):
            return 1
        with read_input(args.input) as adata:
            rows = shard_range(f"{rank}/{world}", adata.n_obs)
            mine = label_cells(args, adata[rows.start : rows.stop].to_memory(), options)
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)  # a share's labels, confidences and probabilities: small
        if rank != 0:
            return 0
        result = pd.concat([part[0] for part in parts])
        obsm = {key: np.concatenate([part[1][key] for part in parts]) for key in parts[0][1]}
        uns = {args.key: parts[0][2][args.key] | {"processes": world}}
        write_annotated_copy(args.input, args.out, obs=result, obsm=obsm, uns=uns)
    return show_counts(args, result)


def show_counts(args: argparse.Namespace, result) -> int:
    """Print the cells and mean confidence per label, and the output written."""
    labels = result[args.key]
    confidence = result[f"{args.key}_confidence"]
    print(f"{'label':<32} {'cells':>7} {'mean confidence':>16}")
    for label, cells in labels.value_counts(sort=True).items():
        if cells:
            print(f"{label:<32} {cells:>7} {confidence[labels == label].mean():>16.3f}")
    print(f"Wrote {args.out}")
    return 0
