"""`scgene convert`: turn an original ScGene checkpoint into a Hugging Face checkpoint, with a parity check.

The logic is in `scgene.conversion`; this module only parses arguments and prints the parity report.
"""

from __future__ import annotations

import argparse
import sys

from . import user_error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Original checkpoint of any of the three models.")
    parser.add_argument(
        "--gene-embedding",
        required=True,
        help="The original's gene embedding, input_dim x feature_dim (.npy, .pt or .safetensors).",
    )
    parser.add_argument(
        "--genes", help="The panel's genes, one per line in the original's column order; writes a tokenizer."
    )
    parser.add_argument("--out", required=True, help="Output directory (written atomically).")
    parser.add_argument(
        "--num-heads",
        type=int,
        help="Attention heads; needed unless the checkpoint stores a config with it (the weights do not tell).",
    )
    parser.add_argument(
        "--parity-cells",
        type=int,
        default=None,
        help="Fixed cells the parity check runs over the whole panel (default 8, scgene.conversion.PARITY_CELLS); "
        "its time grows with the square of the panel size, its memory linearly.",
    )
    parser.add_argument(
        "--target-sum",
        type=float,
        default=1e4,
        help="Counts per cell the panel tokenizer normalises to before log1p, as the original's "
        "sc.pp.normalize_total did (default %(default)g).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output directory.")


def run(args: argparse.Namespace) -> int:
    from scgene.conversion import PARITY_CELLS, ConversionError, convert

    try:
        result = convert(
            args.checkpoint,
            args.gene_embedding,
            args.out,
            genes=args.genes,
            num_heads=args.num_heads,
            overwrite=args.overwrite,
            parity_cells=PARITY_CELLS if args.parity_cells is None else args.parity_cells,
            target_sum=args.target_sum,
        )
    except ConversionError as error:
        print(user_error_message("convert", error), file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} ({result.kind}) to {result.out_dir}")
    print(result.parity_report())
    return 0
