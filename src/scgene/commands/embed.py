"""`scgene embed IN.h5ad --model DIR --out OUT.h5ad`: cell embeddings into `obsm`, optionally a UMAP plot.

With `--plot umap.png --color COL ...`: scanpy neighbours, UMAP and Leiden clusters on the embedding, a PNG coloured
by the given obs columns and the clusters, and the ARI / NMI of the clusters against each categorical column.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import USER_ERRORS, coverage_report_shown, user_error_message

FLAGS = {
    "tokenizer=": "--tokenizer",
    "batch_size": "--batch-size",
    "max_tokens_per_batch": "--max-tokens-per-batch",
    "gene_column=": "--gene-column",
    "layer=": "--layer ",
    "use_raw=True": "--use-raw",
    "max_length": "--max-length",
    "ScGeneConfig.pooling_layer": "--pooling-layer",
}


POOLING_LAYER_HELP = "read the cell embedding from this layer: -1 the last, -2 the second-to-last (default: the checkpoint's)"
GENES_HELP = ("read only these genes, normalised over them: 'hvg' (the file's 2,000 most variable genes, those the PCA "
              "baseline of `scgene evaluate` reads) or a text file with one gene name per line (default: every gene)")


def genes_option(value: str | None, adata=None):
    """`--genes`: None (every gene), the names listed in a text file, or with 'hvg' the highly variable genes of
    `adata` (or "hvg" itself when no `adata` is given: `scgene.evaluate` resolves it)."""
    if value is None:
        return None
    if value == "hvg":
        if adata is None:
            return "hvg"
        from ..evaluation import EvaluationSettings, highly_variable_genes

        return highly_variable_genes(adata, EvaluationSettings())
    if not os.path.isfile(value):
        raise ValueError(f"--genes {value}: pass 'hvg' or a text file with one gene name per line; no such file.")
    with open(value) as handle:
        genes = [line.strip() for line in handle if line.strip()]
    if not genes:
        raise ValueError(f"--genes {value}: the file lists no gene; put one gene name per line.")
    return genes


def with_genes(options: dict, value: str | None, adata) -> dict:
    """`options` plus `genes=` when `--genes` names some (resolved against `adata`)."""
    genes = genes_option(value, adata)
    return options if genes is None else options | {"genes": genes}


def add_tokenizing_arguments(parser: argparse.ArgumentParser) -> None:
    """How a file is read into tokens: --tokenizer, --gene-column, --layer, --use-raw, --max-length."""
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the one saved with the model)")
    parser.add_argument("--gene-column", help="var column with gene names (default: the tokenizer's, else detect)")
    parser.add_argument("--layer", help="read the counts from adata.layers[LAYER] instead of X")
    parser.add_argument("--use-raw", action="store_true", help="read the counts (and genes) from adata.raw")
    parser.add_argument("--max-length", type=int, help="tokens per cell (default: the tokenizer's saved setting)")


def add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that read a file through the tokenizer without `add_common_arguments` (regulation,
    perturb): which genes and counts are read, the token budget, the device, --overwrite."""
    parser.add_argument("--genes", help=GENES_HELP)
    add_tokenizing_arguments(parser)
    parser.add_argument("--max-tokens-per-batch", type=int, help="token budget per batch (default 16384)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs if they exist")


def reading_options(args: argparse.Namespace, adata) -> dict:
    """The tokenizing keyword arguments that `add_reading_arguments`' flags set (`--genes` resolved on `adata`)."""
    options = {key: getattr(args, key) for key in ("gene_column", "max_length", "layer", "max_tokens_per_batch")
               if getattr(args, key) is not None} | ({"use_raw": True} if args.use_raw else {})
    return with_genes(options, args.genes, adata)


def add_common_arguments(parser: argparse.ArgumentParser, model_help: str, model_required: bool = True) -> None:
    """Input, model, output and batching flags shared by `scgene embed` and `scgene annotate`."""
    parser.add_argument("input", help="the .h5ad file (raw counts or log1p-normalised in X; read backed, never modified)")
    parser.add_argument("--model", required=model_required, help=model_help)
    parser.add_argument("--out", required=True, help="the .h5ad to write: the input plus the new columns (atomically)")
    add_tokenizing_arguments(parser)
    parser.add_argument("--batch-size", type=int, help="at most this many cells per batch")
    parser.add_argument("--max-tokens-per-batch", type=int, help="token budget per batch (default 16384): lower it if memory runs out")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def inference_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `scgene.embed` / `scgene.annotate` that the common flags set."""
    for flag, value in (("--batch-size", args.batch_size), ("--max-tokens-per-batch", args.max_tokens_per_batch),
                        ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    options = {"tokenizer": args.tokenizer, "batch_size": args.batch_size,
               "max_tokens_per_batch": args.max_tokens_per_batch, "device": args.device}
    options.update({key: getattr(args, key) for key in ("gene_column", "max_length", "layer") if getattr(args, key) is not None})
    if args.use_raw:
        options["use_raw"] = True
    return options


def command_inputs(args: argparse.Namespace) -> list[str]:
    """What a command reads, which its outputs may never replace: the input file, and the model and tokenizer when
    they are local folders (the shipped checkpoint when no model is given)."""
    from ..inference import DEFAULT_CHECKPOINT

    models = (args.model or DEFAULT_CHECKPOINT, args.tokenizer)
    return [args.input] + [str(path) for path in models if path and os.path.exists(path)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "ScGene checkpoint folder or Hub id (any head: its encoder is used; default: the "
                                 "checkpoint shipped with scgene)", model_required=False)
    parser.add_argument("--key", default="X_scgene", help="obsm key of the embedding (default %(default)s)")
    parser.add_argument("--pooling-layer", type=int, help=POOLING_LAYER_HELP)
    parser.add_argument("--genes", help=GENES_HELP)
    parser.add_argument("--plot", metavar="IMAGE", help="save a UMAP of the embedding here (png, pdf, svg, ...)")
    parser.add_argument("--color", nargs="*", default=[], metavar="COL", help="obs columns to colour the UMAP by")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="precision of the forward "
                        "(autocast; default float32): bfloat16 / float16 are faster on GPUs and agree with float32 at "
                        "cosine >= 0.999 per cell")
    parser.add_argument("--torch-compile", action="store_true", help="compile the forward with torch.compile (dynamic "
                        "shapes; a one-off cost that pays on large files, mostly on GPUs)")
    parser.add_argument("--shard", metavar="I/N", help="embed only the I-th of N equal runs of cells (0 <= I < N) and "
                                                      "write it to the folder --out, keyed by cell name; a shard "
                                                      "already there is skipped; `scgene merge` joins them")


@coverage_report_shown()  # a fresh context per call
def run(args: argparse.Namespace) -> int:
    from ..fileio import claimed_output
    from ..inference import embed, load_model
    from ..plotting import image_format
    from .annotated_copy import annotated_copy, element_group, read_input, write_elements
    from .processes import launched

    try:
        options = inference_options(args) | ({"dtype": args.dtype} if args.dtype else {}) \
            | ({"torch_compile": True} if args.torch_compile else {})
        if args.shard:
            return embed_shard(args, options)
        if launched():
            return embed_distributed(args, options)
        if args.plot:
            image_format(args.plot)
        with claimed_output(args.out, command_inputs(args), command="embed", folder=False, overwrite=args.overwrite):
            with read_input(args.input) as adata:
                missing = [column for column in args.color if column not in adata.obs.columns]
                if missing:
                    raise KeyError(f"--color columns not in obs: {missing}; available: {list(adata.obs.columns)}")
                options = with_genes(options, args.genes, adata)
                encoder = load_model(args.model, device=options["device"], pooling_layer=args.pooling_layer)
                # the backed input is only read; the embeddings go batch by batch into the copy's obsm (on disk)
                with annotated_copy(args.input, args.out) as handle:
                    obsm = element_group(handle, "obsm")
                    if args.key in obsm:
                        del obsm[args.key]
                    shape = (adata.n_obs, encoder.config.hidden_size)
                    stored = obsm.create_dataset(args.key, shape=shape, dtype="float32",
                                                 chunks=(min(shape[0], 1024), shape[1]) if shape[0] else None)
                    stored.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                    embed(adata, encoder, key_added=args.key, out=stored, **options)
                    print(f"{shape[0]} cells -> {shape[1]}-d embeddings in obsm[{args.key!r}]")
                    record = adata.uns[args.key] | ({} if args.pooling_layer is None else
                                                    {"pooling_layer": args.pooling_layer})
                    uns, obs, extra = {args.key: record}, None, {}
                    if args.plot:
                        obs, extra[f"{args.key}_umap"] = plot_embedding(adata.obs, stored[:], args.plot, args.color)
                    write_elements(handle, obs=obs, obsm=extra, uns=uns)
    except USER_ERRORS as error:
        print(user_error_message("embed", error, FLAGS), file=sys.stderr)
        return 1
    print(f"Wrote {args.out}")
    return 0


def embed_shard(args: argparse.Namespace, options: dict) -> int:
    """`--shard I/N`: the I-th of N contiguous runs of cells into `--out/shard-I-of-N.npz` (cell names, embeddings and
    the run's record), written atomically; an existing shard is a finished one and is skipped."""
    import json

    import numpy as np

    from ..fileio import atomic_path, claimed_output
    from ..inference import embed
    from ..sharding import shard_path, shard_range
    from .annotated_copy import read_input

    if args.plot:
        raise ValueError("--plot needs every cell: embed the shards, `scgene merge` them, then plot the merged file.")
    path = shard_path(args.out, args.shard)
    if path.exists() and not args.overwrite:
        print(f"{path} exists: this shard finished in an earlier run and is skipped (--overwrite recomputes it).")
        return 0
    with claimed_output(path, command_inputs(args), command="embed", folder=False, overwrite=args.overwrite):
        with read_input(args.input) as adata:
            rows = shard_range(args.shard, adata.n_obs)
            cells = adata[rows.start : rows.stop]
            options = with_genes(options, args.genes, adata)
            embeddings = embed(cells, args.model, key_added=None, pooling_layer=args.pooling_layer, **options)
            names, n_obs = np.asarray(cells.obs_names, dtype=str), adata.n_obs
        record = {"input": os.path.abspath(args.input), "cells": [rows.start, rows.stop], "n_obs": n_obs,
                  "model": str(args.model or "scgene default checkpoint"), "pooling_layer": args.pooling_layer}
        with atomic_path(path) as staged, open(staged, "wb") as handle:
            np.savez(handle, names=names, embeddings=embeddings, record=np.asarray(json.dumps(record)))
    print(f"Wrote {path}: cells {rows.start}-{rows.stop - 1} of {n_obs}")
    return 0


def embed_distributed(args: argparse.Namespace, options: dict) -> int:
    """Under torchrun / accelerate launch: each process embeds its share of the cells, rank 0 gathers them in input
    order and writes `--out` as one process would."""
    import contextlib

    import numpy as np
    import torch
    import torch.distributed as dist

    from ..fileio import claimed_output
    from ..inference import embed
    from ..plotting import image_format
    from ..sharding import shard_range
    from .annotated_copy import read_input, write_annotated_copy
    from .processes import claimed_by_rank_zero, process_group

    def claim():
        if args.plot:
            image_format(args.plot)
        return claimed_output(args.out, command_inputs(args), command="embed", folder=False, overwrite=args.overwrite)

    with process_group(options, args.device) as (rank, world, device), contextlib.ExitStack() as claims:
        if not claimed_by_rank_zero(claims, rank, device, claim, "embed", FLAGS):
            return 1
        with read_input(args.input) as adata:
            n_obs = adata.n_obs
            rows = shard_range(f"{rank}/{world}", n_obs)
            options = with_genes(options, args.genes, adata)
            mine = embed(adata[rows.start : rows.stop], args.model, key_added=None,
                         pooling_layer=args.pooling_layer, progress=rank == 0, **options)
            obs_frame = adata.obs if rank == 0 and args.plot else None
        sizes = [len(shard_range(f"{r}/{world}", n_obs)) for r in range(world)]
        padded = torch.zeros((max(sizes), mine.shape[1]), device=device)
        padded[: len(mine)] = torch.from_numpy(mine).to(device)
        parts = [torch.zeros_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if rank != 0:
            return 0
        embeddings = np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes)])
        print(f"{n_obs} cells -> {embeddings.shape[1]}-d embeddings in obsm[{args.key!r}] ({world} processes)")
        record = {"model": str(args.model or "scgene default checkpoint"), "processes": world}
        obsm, obs = {args.key: embeddings}, None
        if args.plot:
            obs, obsm[f"{args.key}_umap"] = plot_embedding(obs_frame, embeddings, args.plot, args.color)
        write_annotated_copy(args.input, args.out, obs=obs, obsm=obsm, uns={args.key: record})
    print(f"Wrote {args.out}")
    return 0


def plot_embedding(obs, embeddings, png: str, color: list[str]):
    """Neighbours, UMAP and Leiden on the embedding; an image (format from the suffix) coloured by `color` + clusters;
    ARI/NMI printed.
    Returns the Leiden clusters (obs column `scgene_leiden`) and the UMAP coordinates."""
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ..fileio import atomic_path
    from ..plotting import image_format

    view = anndata.AnnData(obs=obs[color].copy(), obsm={"X_scgene": embeddings})
    sc.pp.neighbors(view, use_rep="X_scgene", random_state=0)
    sc.tl.umap(view, random_state=0)
    sc.tl.leiden(view, key_added="scgene_leiden", flavor="igraph", n_iterations=2, directed=False, random_state=0)
    clusters = view.obs["scgene_leiden"]
    for column in color:
        labels = view.obs[column]
        if isinstance(labels.dtype, pd.CategoricalDtype) or labels.dtype == object:
            keep = labels.notna().to_numpy()
            ari = adjusted_rand_score(labels[keep].astype(str), clusters[keep])
            nmi = normalized_mutual_info_score(labels[keep].astype(str), clusters[keep])
            print(f"Leiden clusters ({clusters.nunique()}) vs {column} ({labels.nunique()}): ARI {ari:.3f}  NMI {nmi:.3f}")
    figure = sc.pl.umap(view, color=[*color, "scgene_leiden"], show=False, return_fig=True, wspace=0.5)
    with atomic_path(png) as staged:
        figure.savefig(staged, dpi=120, bbox_inches="tight", format=image_format(png))
    plt.close(figure)
    print(f"Saved the UMAP to {png}")
    return pd.DataFrame({"scgene_leiden": clusters.values}, index=obs.index), view.obsm["X_umap"].astype("float32")
