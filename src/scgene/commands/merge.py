"""`scgene merge FOLDER --input IN.h5ad --out OUT.h5ad`: join the shards of `scgene embed --shard I/N`.

Checks that every shard is there and that their cells are the input's cells in order, then writes the input plus
the embedding in `obsm` (and the run's record in `uns`), atomically. See `scgene.sharding`.
"""

from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS, user_error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="the folder the shards were written to (--out of `scgene embed --shard`)")
    parser.add_argument("--input", required=True, help="the .h5ad the shards embed (read, never modified)")
    parser.add_argument("--out", required=True, help="the .h5ad to write: the input plus the embedding")
    parser.add_argument("--key", default="X_scgene", help="obsm key of the embedding (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..fileio import claimed_output
    from ..sharding import read_shards
    from .annotated_copy import read_input, write_annotated_copy

    try:
        with claimed_output(args.out, [args.input, args.shards], command="merge", folder=False,
                            overwrite=args.overwrite):
            names, embeddings, record = read_shards(args.shards)
            with read_input(args.input) as adata:
                expected = np.asarray(adata.obs_names, dtype=str)
            if len(names) != len(expected) or not (names == expected).all():
                raise ValueError(f"The shards hold {len(names)} cells that are not the {len(expected)} cells of "
                                 f"{args.input} in order: were they embedded from another file?")
            write_annotated_copy(args.input, args.out, obsm={args.key: embeddings}, uns={args.key: record})
    except USER_ERRORS as error:
        print(user_error_message("merge", error), file=sys.stderr)
        return 1
    print(f"Wrote {args.out}: {len(names)} cells -> {embeddings.shape[1]}-d embeddings in obsm[{args.key!r}], from "
          f"{record['shards']} shards")
    return 0
