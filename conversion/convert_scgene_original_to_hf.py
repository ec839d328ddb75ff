"""Convert an original ScGene (seed 000) checkpoint to a Hugging Face checkpoint and check parity.

Same as `scgene convert`; the implementation is `scgene.conversion` (importable from the installed package):

    python conversion/convert_scgene_original_to_hf.py --checkpoint model.pt --gene-embedding prior.npy \
        --genes genes.txt --out converted/ [--num-heads 8] [--parity-cells 8] [--target-sum 1e4]
"""

from __future__ import annotations

import argparse
import sys

from scgene.commands.convert import add_arguments, run
from scgene.conversion import convert

__all__ = ["convert", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
