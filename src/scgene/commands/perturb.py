"""`scgene perturb IN.h5ad --targets GENES --out shifts.tsv`: knock genes out or up in the cells of a file.

Writes the per-perturbation table (cells, cosine shift, and with a goal state the move toward it, with p-values and
FDR) as tab-separated text; `--changes` the largest predicted expression changes per perturbation (long table
`perturbation, gene, change, cells, rank`), `--plot` their bars. See `scgene.perturbation` for the method.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import USER_ERRORS, claimed_files, coverage_report_shown, existing_paths, user_error_message
from .embed import add_reading_arguments, reading_options

FLAGS = {"read_genes=": "--genes ", "genes=": "--targets ", "value=": "--value ", "groupby=": "--groupby ",
         "groups=": "--groups ", "state_key": "--state-key", "start_state": "--start-state", "goal_state": "--goal-state",
         "expression=False": "--no-expression", "masking_rounds": "--masking-rounds",
         "max_memory_gb": "--max-memory-gb", "gene_column=": "--gene-column", "tokenizer=": "--tokenizer",
         "max_tokens_per_batch": "--max-tokens-per-batch"}


def targets_option(value: str):
    """`--targets`: 'all', a comma-separated list (A+B perturbs two together), or a text file with one per line."""
    if value == "all":
        return "all"
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return [item.strip() for item in value.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..perturbation import MODES

    parser.add_argument("input", help="the .h5ad file (raw counts or log1p-normalised in X; read backed, never modified)")
    parser.add_argument("--targets", required=True, help="genes to perturb: 'all' (each measured gene alone), "
                                                         "'KLF1,SET+KLF1' (A+B: together), or a text file, one per line")
    parser.add_argument("--out", required=True, help="the per-perturbation shifts as a .tsv, written atomically")
    parser.add_argument("--mode", choices=MODES, default="delete",
                        help="delete: remove the gene where a cell expresses it; knockout: that, and where a cell "
                             "lacks it (or the file does not measure it), the cell with it against the cell without "
                             "(default %(default)s)")
    parser.add_argument("--value", type=float, help="--mode set: the value (log1p counts per 10,000); --mode scale: "
                                                    "the factor; --mode knockout: the level a lacking cell is given "
                                                    "(default: the model's prediction)")
    parser.add_argument("--model", help="a pretrained ScGene checkpoint with its masked-expression head (default: the "
                                        "one shipped with scgene)")
    parser.add_argument("--groupby", help="obs column whose --groups cells are perturbed (default: every cell)")
    parser.add_argument("--groups", nargs="*", help="the groups of --groupby to perturb")
    parser.add_argument("--state-key", help="obs column of cell states: perturb --start-state cells and measure their "
                                            "move toward --goal-state cells")
    parser.add_argument("--start-state")
    parser.add_argument("--goal-state")
    parser.add_argument("--changes", metavar="TSV", help="save each perturbation's largest predicted changes here")
    parser.add_argument("--top-genes", type=int, default=20, help="changes kept per perturbation (default %(default)s)")
    parser.add_argument("--plot", metavar="IMAGE", help="save bars of the largest predicted changes here")
    parser.add_argument("--no-expression", action="store_true", help="embedding shifts only (about 8x faster)")
    parser.add_argument("--masking-rounds", type=int, default=7, help="default %(default)s (see scgene.perturbation)")
    parser.add_argument("--seed", type=int, default=0, help="the masking groups and adaptation batches (default 0)")
    parser.add_argument("--adapt-steps", type=int, default=0,
                        help="first train a copy of the model this many masked-expression steps on the file's cells "
                             "(self-supervised; recommended before reading expression changes, e.g. 1500; default "
                             "%(default)s)")
    parser.add_argument("--adapt-learning-rate", type=float, default=3e-4, help="(default %(default)s)")
    parser.add_argument("--max-memory-gb", type=float, default=4.0,
                        help="refuse change tables that need more (default %(default)s)")
    add_reading_arguments(parser)


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..fileio import atomic_path
    from ..inference import DEFAULT_CHECKPOINT
    from ..perturbation import adapt_to_cells, perturb
    from ..plotting import image_format, perturbation_changes
    from .annotated_copy import read_input

    try:
        if args.plot:
            image_format(args.plot)
        if args.no_expression and (args.changes or args.plot):
            raise ValueError("--changes and --plot show predicted expression changes, which --no-expression skips.")
        if args.top_genes < 1:
            raise ValueError(f"--top-genes must be a positive integer, got {args.top_genes}.")
        if args.adapt_steps < 0 or args.adapt_learning_rate <= 0:
            raise ValueError("--adapt-steps must be 0 or more and --adapt-learning-rate positive, got "
                             f"{args.adapt_steps} and {args.adapt_learning_rate}.")
        inputs = [args.input, *existing_paths(args.model or DEFAULT_CHECKPOINT, args.tokenizer)]
        with claimed_files((args.out, args.changes, args.plot), inputs, "perturb", args.overwrite):
            with read_input(args.input) as adata:
                options = reading_options(args, adata)
                model = args.model
                if args.adapt_steps:
                    model = adapt_to_cells(adata, model, steps=args.adapt_steps, learning_rate=args.adapt_learning_rate,
                                           seed=args.seed, tokenizer=args.tokenizer,
                                           **{key: value for key, value in options.items()
                                              if key != "max_tokens_per_batch"})
                if "genes" in options:  # perturb's genes= are the perturbed ones
                    options["read_genes"] = options.pop("genes")
                result = perturb(adata, model, targets_option(args.targets), mode=args.mode, value=args.value,
                                 groupby=args.groupby, groups=args.groups, state_key=args.state_key,
                                 start_state=args.start_state, goal_state=args.goal_state,
                                 expression=not args.no_expression, masking_rounds=args.masking_rounds, seed=args.seed,
                                 tokenizer=args.tokenizer, device=args.device, max_memory_gb=args.max_memory_gb,
                                 key_added=None, **options)
            with atomic_path(args.out) as staged:
                result.shifts.to_csv(staged, sep="\t")
            print(f"Wrote {args.out}: {len(result.shifts)} perturbations, "
                  f"{result.record['cells_perturbed']} cells perturbed")
            if args.changes or args.plot:
                top = result.top_changes(args.top_genes)
                if args.changes:
                    with atomic_path(args.changes) as staged:
                        top.to_csv(staged, sep="\t", index=False)
                    print(f"Wrote {args.changes}")
                if args.plot:
                    perturbation_changes(top, args.plot, n_genes=min(args.top_genes, 15))
                    print(f"Saved the plot to {args.plot}")
    except USER_ERRORS as error:
        print(user_error_message("perturb", error, FLAGS), file=sys.stderr)
        return 1
    return 0
