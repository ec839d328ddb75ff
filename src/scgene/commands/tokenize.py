"""`scgene tokenize IN [IN ...] OUT_DIR`: tokenize .h5ad files (read backed, chunk by chunk) into a Hugging Face
`datasets` folder with the tokenizer saved alongside. Several inputs (files, folders of .h5ad files, quoted globs)
become one corpus: one vocabulary, shards over all cells, and a `source` column naming each cell's file."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from . import USER_ERRORS, coverage_report_shown, load_tokenizer, user_error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="input",
                        help=".h5ad files (raw counts or log1p-normalised in X), folders of them, or quoted globs; "
                             "several make one corpus with a `source` column")
    parser.add_argument("output", help="the dataset folder to create")
    parser.add_argument("--tokenizer", help="a saved tokenizer folder or Hub id (default: the human vocabulary)")
    parser.add_argument("--gene-selection", choices=("all", "nonzero", "top_k"), help="default: the tokenizer's")
    parser.add_argument("--max-length", type=int, help="tokens per cell including <cls> (default: the tokenizer's)")
    parser.add_argument("--top-k", type=int, help="genes kept per cell with --gene-selection top_k")
    parser.add_argument("--no-truncation", action="store_true", help="ignore max-length (e.g. 'all' on a large panel)")
    parser.add_argument("--obs-columns", nargs="*", default=[], metavar="COL", help="obs columns to keep")
    parser.add_argument("--gene-column", help="var column with gene names (default: detect)")
    parser.add_argument("--layer", help="read the counts from adata.layers[LAYER] instead of X")
    parser.add_argument("--use-raw", action="store_true", help="read the counts (and genes) from adata.raw")
    parser.add_argument("--seed", type=int, help="sample genes beyond max-length with this seed (training data)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--format", choices=("arrow", "parquet"), default="arrow")
    parser.add_argument("--chunk-size", type=int, default=512, help="cells read and encoded at a time")
    parser.add_argument("--min-coverage", type=float,
                        help="fewest share of the counts that vocabulary genes must carry (default: the tokenizer's, 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


# the library's argument names, as this command's flags, in its error messages
FLAGS = {
    "pass overwrite=True (--overwrite)": "pass --overwrite",
    "`gene_column=`": "--gene-column",
    "layer=": "--layer ",
    "use_raw=True": "--use-raw",
    "lower `min_coverage`": "lower --min-coverage",
    "min_coverage=": "--min-coverage ",
    "num_shards": "--num-shards",
    "chunk_size": "--chunk-size",
    "gene_selection": "--gene-selection",
    "max_length": "--max-length",
    "top_k": "--top-k",
    "`ScGeneTokenizer.from_anndata`": "a tokenizer saved from `ScGeneTokenizer.from_anndata` (--tokenizer)",
}


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..data.export import export_dataset
    from ..tokenization_scgene import read_h5ad_backed

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        if args.min_coverage is not None:
            tokenizer = tokenizer.with_settings(min_coverage=args.min_coverage)
        files = input_files(args.inputs)
        if len(files) == 1:
            cells = read_h5ad_backed(files[0])
            print(f"{cells.n_obs} cells x {cells.n_vars} genes")
        else:
            cells = source_names(files)
            print(f"{len(files)} files, tokenized into one dataset with a `source` column")
        output = export_dataset(
            cells,
            args.output,
            tokenizer,
            obs_columns=args.obs_columns,
            num_shards=args.num_shards,
            file_format=args.format,
            overwrite=args.overwrite,
            gene_selection=args.gene_selection,
            max_length=args.max_length,
            top_k=args.top_k,
            truncation=not args.no_truncation,
            gene_column=args.gene_column,
            layer=args.layer,
            use_raw=args.use_raw,
            seed=args.seed,
            chunk_size=args.chunk_size,
            progress=True,
        )
    except USER_ERRORS as error:  # the message says what to do
        print(user_error_message("tokenize", error, FLAGS), file=sys.stderr)
        return 1
    print(f"Wrote {output} (load with datasets.load_from_disk or load_dataset(..., streaming=True)).")
    return 0


def input_files(inputs: list[str]) -> list[str]:
    """The .h5ad files named by `inputs`: files as given, the .h5ad files of a folder (sorted), glob matches (sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(str(path) for path in Path(item).glob("*.h5ad"))
            if not found:
                raise FileNotFoundError(f"{item} is a folder without .h5ad files; pass .h5ad files or their folder.")
            files += found
        elif glob.has_magic(item) and not os.path.exists(item):
            found = sorted(glob.glob(item))
            if not found:
                raise FileNotFoundError(f"{item} matches no file; check the pattern (quoted globs are expanded here).")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is not a file; pass the path of an .h5ad file.")
    duplicates = sorted({f for f in files if files.count(f) > 1})
    if duplicates:
        raise ValueError(f"{duplicates} given more than once; name each input once.")
    return files


def source_names(files: list[str]) -> dict[str, str]:
    """{source name: path}: the file name without `.h5ad`, or the whole path where two files share a name."""
    stems = [Path(f).name.removesuffix(".h5ad") for f in files]
    return {stem if stems.count(stem) == 1 else f: f for stem, f in zip(stems, files)}
