"""`scgene build-prior`: the whole prior recipe of seed 000 from one command.

    scgene build-prior --adata IN.h5ad [IN2.h5ad ...] [--layer L | --use-raw] [--knowledge TABLE] [--tokenizer PATH] --out DIR

1. read each AnnData with X sparse (a dense on-disk X chunk by chunk), preprocess it (normalize_total + log1p,
   as the tokenizer does) and compute its co-expression edges blockwise; the files' edges are pooled, with genes
   named by the vocabulary when there are several files -> `DIR/coexpression_edges.tsv`;
2. skip-gram gene2vec on the edges (or node2vec walks with `--node2vec`) -> `DIR/gene2vec.txt`;
3. knowledge table -> binary linear embedding + sentence-transformer text embedding -> PCA to hidden size;
4. fuse both, aligned to the tokenizer vocabulary -> `DIR/gene_prior.safetensors` (key `gene_prior`);
5. `DIR/prior_record.json`: sources, parameters, coverage, timings and output checksums.

With `--model CKPT` the prior is also put into that checkpoint's frozen buffer and saved to `DIR/model`.
With `--gene2vec FILE` (e.g. the published Gene2vec vectors) steps 1-2 are replaced by that file.
Options and input files are checked, and the knowledge table read, before the long steps; input problems end
with a one-line message naming the fix. Every output is written atomically; the record lists (with checksums)
only the files written by this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scgene.commands import USER_ERRORS, load_tokenizer, user_error_message
from scgene.fileio import atomic_directory, claimed_output, sha256_file, write_json, write_output_marker
from scgene.prior.coexpression import SIGNS
from scgene.prior.knowledge import DEFAULT_TABLE, DEFAULT_TEXT_MODEL, ORTHOLOG_TABLES, ortholog_table

logger = logging.getLogger(__name__)

DEFAULT_TEXT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scgene" / "text_embeddings"


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show `(default: ...)` only for options that have a real default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsFormatter
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--adata", type=Path, nargs="+",
                    help="raw-count (or log-normalised) .h5ad file(s) for the co-expression network; with several, "
                         "each file's edges are computed on its own cells and pooled")
    io.add_argument("--out", type=Path, required=True, help="output directory (written whole, or not at all)")
    io.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    io.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: the shipped human vocabulary)")
    io.add_argument("--knowledge", type=Path, default=DEFAULT_TABLE, help="knowledge table (.xlsx, .csv, .tsv)")
    io.add_argument("--no-knowledge", action="store_true", help="fuse gene2vec only")
    io.add_argument("--no-gene2vec", action="store_true",
                    help="fuse the knowledge embedding only (no co-expression step; --adata then only picks the genes "
                         "with --knowledge-genes adata)")
    io.add_argument("--gene2vec", type=Path, help="use these word2vec-text gene vectors instead of training them")
    io.add_argument("--model", help="checkpoint to receive the prior; saved with it to DIR/model")
    io.add_argument("--gene-column", help="adata.var column with the gene names (default: var_names)")
    io.add_argument("--layer", help="read each --adata file's counts from adata.layers[LAYER] instead of X")
    io.add_argument("--use-raw", action="store_true", help="read each --adata file's counts (and genes) from adata.raw")
    io.add_argument("--hidden-size", type=int, help="prior width (default: --model's, else ScGeneConfig's)")
    io.add_argument("--seed", type=int, default=0, help="seed of cell subsampling, gene2vec and knowledge embedding")
    io.add_argument("--no-progress", action="store_true", help="hide progress bars")

    coexpression = parser.add_argument_group("co-expression network")
    coexpression.add_argument("--threshold", type=float, default=0.7, help="keep gene pairs with |r| >= threshold")
    coexpression.add_argument("--sign", choices=SIGNS, default="both", help="which signs of r to keep (seed: positive)")
    coexpression.add_argument("--max-cells", type=int, help="use a seeded random subset of this many cells")
    coexpression.add_argument("--block-size", type=int, default=1024, help="genes per correlation tile")

    embedding = parser.add_argument_group("gene2vec / node2vec")
    embedding.add_argument("--gene2vec-dim", type=int, default=200, help="skip-gram vector size")
    embedding.add_argument("--epochs", type=int, default=30, help="skip-gram epochs")
    embedding.add_argument("--node2vec", action="store_true", help="train on random walks instead of edge pairs")
    embedding.add_argument("--walk-length", type=int, default=20, help="node2vec: genes per walk")
    embedding.add_argument("--walks-per-node", type=int, default=10, help="node2vec: walks started at each gene")
    embedding.add_argument("--window", type=int, default=5, help="node2vec: skip-gram window")

    knowledge = parser.add_argument_group("knowledge embedding")
    knowledge.add_argument("--knowledge-gene-column", default="gene", help="gene column of the knowledge table")
    knowledge.add_argument("--text-columns", nargs="+", help="text columns (default: all non-numeric columns)")
    knowledge.add_argument("--text-model", default=DEFAULT_TEXT_MODEL, help="sentence-transformer path or Hub id")
    knowledge.add_argument("--text-max-tokens", type=int, default=128, help="truncate texts to this many word pieces")
    knowledge.add_argument("--text-cache", type=Path, default=DEFAULT_TEXT_CACHE, help="text embedding cache")
    knowledge.add_argument("--no-text-cache", action="store_true", help="always recompute the text embeddings")
    knowledge.add_argument(
        "--knowledge-genes",
        choices=("vocabulary", "adata"),
        default="vocabulary",
        help="embed the knowledge of every vocabulary gene (26k texts with the human vocabulary: minutes on a CPU the "
        "first time, then cached), or only of the genes in --adata (other genes keep a zero knowledge part)",
    )
    knowledge.add_argument(
        "--orthologs",
        help="carry the knowledge table over to another species through one-to-one orthologs: 'mouse' (the shipped "
        "Ensembl 105 human -> mouse table) or a two-column CSV (table's gene, data's gene); use with a vocabulary of "
        "that species' genes (--tokenizer)",
    )
    knowledge.add_argument("--binary-dim", type=int, default=512, help="width of the 0/1 columns' linear embedding")


def _load_model(path: str):
    """Load a ScGene checkpoint with the class it was saved as (base model or a head); a mistyped path, a damaged
    weights file or a config that disagrees with the weights is a one-line error naming the fix."""
    import scgene
    from scgene.fileio import local_or_hub
    from scgene.inference import load_checkpoint, load_weights

    path = local_or_hub(path, "a checkpoint is a folder with config.json and model.safetensors")
    config = load_checkpoint(scgene.ScGeneConfig, path)
    architecture = (getattr(config, "architectures", None) or ["ScGeneModel"])[0]
    model_class = getattr(scgene, architecture, None)
    if model_class is None:
        raise ValueError(f"{path} holds a {architecture}, which is not a ScGene model class; pass a ScGene checkpoint.")
    return load_weights(model_class, path)


def _check_shapes(args, tokenizer, model) -> None:
    """Fail before any computation when the prior could not fit the model or the hidden size."""
    if model is not None and (model.config.vocab_size, model.config.hidden_size) != (
        tokenizer.vocab_size,
        args.hidden_size,
    ):
        raise SystemExit(
            f"--model {args.model} has vocab_size x hidden_size = {model.config.vocab_size} x "
            f"{model.config.hidden_size}, but the prior would be {tokenizer.vocab_size} x {args.hidden_size}: "
            "pass the tokenizer saved with that model (--tokenizer) and leave --hidden-size unset."
        )
    if args.gene2vec is None and not args.no_gene2vec and args.gene2vec_dim > args.hidden_size:
        raise SystemExit(f"--gene2vec-dim {args.gene2vec_dim} exceeds the hidden size {args.hidden_size}.")


def _vocabulary_rows(table, tokenizer, allowed_ids: set[int] | None = None):
    """The knowledge-table rows whose gene (symbol, alias or Ensembl id) is in the tokenizer's vocabulary (and, with
    `allowed_ids`, has one of those ids)."""

    def known(name) -> bool:
        try:
            token_id = tokenizer.convert_genes_to_ids([name])[0]
        except KeyError:
            return False
        return allowed_ids is None or token_id in allowed_ids

    ensembl_ids = table.ensembl_ids or [""] * len(table.genes)
    keep = np.array([known(gene) or (bool(e) and known(e)) for gene, e in zip(table.genes, ensembl_ids)])
    if not keep.any():
        raise SystemExit("No gene of the knowledge table is in the tokenizer's vocabulary: check the gene column "
                         "(--knowledge-gene-column), or for data of another species carry the table over with "
                         "--orthologs (e.g. --orthologs mouse for the human table).")
    return table.subset(keep)


def _provenance(value) -> dict | str:
    """A file's `uns['provenance']` for the record: a mapping as strings, anything else (e.g. a sentence) as text."""
    if hasattr(value, "items"):
        return {str(key): str(item) for key, item in value.items()}
    return str(value)


def _adata_gene_ids(paths: list[Path], tokenizer, gene_column: str | None, use_raw: bool = False) -> set[int]:
    """Vocabulary ids of the genes of the .h5ad files (read backed: only var; `.raw`'s genes with `use_raw`)."""
    import anndata

    from scgene.tokenization_scgene import expression_source

    ids: set[int] = set()
    for path in paths:
        adata = anndata.read_h5ad(path, backed="r")
        try:
            ids |= {int(i) for i in tokenizer.map_genes(expression_source(adata, None, use_raw), gene_column).vocab_ids}
        finally:
            adata.file.close()
    return ids


DENSE_CHUNK_VALUES = 1 << 24  # cells x genes values read at a time from a dense on-disk X (64 MB of float32)


def _read_sparse_adata(path: Path, dense_chunk_values: int = DENSE_CHUNK_VALUES, layer: str | None = None,
                       use_raw: bool = False) -> tuple:
    """The AnnData at `path` in memory with X as CSR (X, or `layers[layer]`, or `.raw` with its genes), without layers
    or obsm, and where else raw counts sit when X looks log-normalised ("" if nowhere, or not asked). The file is opened backed, so a dense on-disk matrix is read a chunk of cells at a time and made sparse
    chunk by chunk: the dense cells x genes matrix never exists in memory. When X looks log-normalised and counts sit
    in a layer or `.raw`, the warning names the flag that reads them."""
    import anndata
    import h5py
    import scipy.sparse as sp

    from scgene.encoding_scgene import is_log_normalized, to_csr
    from scgene.tokenization_scgene import counts_hint, expression_source

    backed = anndata.read_h5ad(path, backed="r")
    try:
        source = expression_source(backed, layer, use_raw)
        stored = source.X
        if stored is None:
            raise ValueError(f"{path} has no expression matrix X; store the (raw or log-normalised) counts in X.")
        hint = ""
        if source is backed and backed.n_obs and is_log_normalized(to_csr(stored[: min(64, backed.n_obs)]).data):
            hint = counts_hint(backed)
        if isinstance(stored, h5py.Dataset):
            rows = max(1, dense_chunk_values // max(backed.n_vars, 1))
            parts = [sp.csr_matrix(stored[s : s + rows]) for s in range(0, backed.n_obs, rows)]
            matrix = sp.vstack(parts, format="csr") if parts else sp.csr_matrix(stored.shape, dtype=stored.dtype)
        else:
            matrix = sp.csr_matrix(stored[:])  # a backed sparse dataset reads as scipy sparse
        return anndata.AnnData(X=matrix, obs=backed.obs.copy(), var=source.var.copy(), uns=dict(backed.uns)), hint
    finally:
        backed.file.close()


def _dataset_edges(path: Path, args, tokenizer, canonical: bool, progress: bool) -> tuple:
    """One file's co-expression edges and its record. With `canonical`, genes are named by the vocabulary's symbol
    (as in `convert_ids_to_genes`), so files that name genes differently (symbols, Ensembl ids, aliases) share words."""
    from scgene.preprocessing import preprocess
    from scgene.prior.coexpression import coexpression_edges

    adata, counts_elsewhere = _read_sparse_adata(path, layer=args.layer, use_raw=args.use_raw)
    if adata.n_obs < 2:
        raise ValueError(f"{path} has {adata.n_obs} cells, and a co-expression network needs at least 2; pass a file "
                         "with more cells, or precomputed vectors with --gene2vec.")
    if args.gene_column is not None and args.gene_column not in adata.var.columns:
        raise ValueError(
            f"--gene-column {args.gene_column!r} is not a column of {path}'s var; its columns are "
            f"{list(adata.var.columns)[:10]}. Leave --gene-column unset to use var_names."
        )
    adata = preprocess(adata, gene_column=args.gene_column, log_hint=f"{path}: {counts_elsewhere}" if counts_elsewhere else "")
    names = adata.var_names if args.gene_column is None else adata.var[args.gene_column]
    genes = [str(g) for g in names]
    if canonical:
        mapping = tokenizer.map_genes(adata, args.gene_column)
        symbols = tokenizer.convert_ids_to_genes(mapping.vocab_ids)
        # column_to_matched: per column, its index into vocab_ids (-1: not in the vocabulary, the name is kept)
        renamed = [symbols[index] if index >= 0 else gene for gene, index in zip(genes, mapping.column_to_matched)]
        repeated = pd.Index(renamed).duplicated(keep=False)  # e.g. two versions of one Ensembl id keep their names
        genes = [gene if twice else new for new, twice, gene in zip(renamed, repeated, genes)]
    source = {
        "path": str(path),
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "provenance": _provenance(adata.uns.get("provenance", {})),
        "preprocessing": dict(adata.uns["scgene_preprocessing"]),
    }
    edges, info = coexpression_edges(
        adata.X,
        genes,
        threshold=args.threshold,
        sign=args.sign,
        block_size=args.block_size,
        max_cells=args.max_cells,
        seed=args.seed,
        progress=progress,
    )
    return edges, info, source


def _coexpression_and_gene2vec(args, tokenizer, progress: bool, record: dict, written: list[str]) -> tuple[list[str], np.ndarray]:
    """Co-expression edges of every --adata file, concatenated (a pair co-expressed in k files gives k sentences,
    as gene2vec pooled its datasets), then skip-gram (or node2vec) vectors."""
    from scgene.prior.coexpression import write_edges
    from scgene.prior.gene2vec import corpus_repeats, gene2vec, node2vec, save_word2vec_text

    start = time.perf_counter()
    parts, infos, record["sources"]["adata"] = [], [], []
    for path in args.adata:
        edges, info, source = _dataset_edges(path, args, tokenizer, canonical=len(args.adata) > 1, progress=progress)
        parts.append(edges)
        infos.append(info.to_dict())
        record["sources"]["adata"].append(source)
    edges = pd.concat(parts, ignore_index=True)
    write_edges(args.out / "coexpression_edges.tsv", edges)
    written.append("coexpression_edges.tsv")
    record["coexpression"] = infos[0] if len(infos) == 1 else {
        "n_edges": len(edges), "n_positive_edges": int((edges["r"] > 0).sum()),
        "n_negative_edges": int((edges["r"] < 0).sum()), "threshold": args.threshold, "sign": args.sign,
        "datasets": infos,
    }
    record["timings_seconds"]["coexpression"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    if args.node2vec:
        trained = node2vec(
            edges,
            dim=args.gene2vec_dim,
            walk_length=args.walk_length,
            walks_per_node=args.walks_per_node,
            window=args.window,
            epochs=args.epochs,
            seed=args.seed,
            progress=progress,
        )
        method = {"method": "node2vec", "walk_length": args.walk_length, "walks_per_node": args.walks_per_node}
        method |= {"window": args.window, "words": len(trained[0]) * args.walks_per_node * args.walk_length}
    else:
        trained = gene2vec(edges, dim=args.gene2vec_dim, epochs=args.epochs, seed=args.seed, progress=progress)
        method = {"method": "gene2vec (two-gene sentences)", "window": 1, "words": 2 * len(edges)}
    save_word2vec_text(args.out / "gene2vec.txt", *trained)
    written.append("gene2vec.txt")
    epochs = {"epochs": args.epochs, "corpus_repeats": corpus_repeats(method["words"], args.epochs)}
    record["gene2vec"] = method | epochs | {"dim": args.gene2vec_dim, "genes": len(trained[0])}
    record["timings_seconds"]["gene2vec"] = round(time.perf_counter() - start, 2)
    return trained


def _check_arguments(args: argparse.Namespace) -> None:
    """Reject contradictory or out-of-range options and missing input files before any computation."""
    from scgene.prior.coexpression import check_threshold

    if args.no_gene2vec and args.no_knowledge:
        raise SystemExit("--no-gene2vec with --no-knowledge leaves nothing to fuse; drop one of them.")
    if args.no_knowledge and args.orthologs is not None:
        raise SystemExit("--orthologs translates the knowledge table, which --no-knowledge leaves out; drop one of them.")
    if args.orthologs is not None and not ortholog_table(args.orthologs).is_file():
        raise SystemExit(f"--orthologs {args.orthologs}: no such file; give a two-column CSV or one of "
                         f"{sorted(ORTHOLOG_TABLES)}.")
    if args.no_gene2vec and args.gene2vec is not None:
        raise SystemExit("--no-gene2vec contradicts --gene2vec FILE; drop one of them.")
    if args.adata is None and args.gene2vec is None and not args.no_gene2vec:
        raise SystemExit("build-prior needs --adata IN.h5ad (or precomputed vectors with --gene2vec FILE).")
    if args.adata is not None and args.gene2vec is not None:
        raise SystemExit(
            "--adata and --gene2vec are alternatives: --adata trains gene2vec on its co-expression network, "
            "--gene2vec uses precomputed vectors. Give one of them."
        )
    knowledge = None if args.no_knowledge else args.knowledge
    inputs = [("--adata", path) for path in args.adata or []] + [("--gene2vec", args.gene2vec), ("--knowledge", knowledge)]
    for flag, path in inputs:
        if path is not None and not path.is_file():
            raise SystemExit(f"{flag} {path}: no such file. Check the path.")
    if args.adata and len(set(args.adata)) < len(args.adata):
        raise SystemExit("--adata names a file twice; give each file once.")
    try:
        check_threshold(args.threshold, args.sign)
    except ValueError as error:
        raise SystemExit(f"--threshold/--sign: {error}") from None
    minimums = {
        "--hidden-size": (args.hidden_size, 1),
        "--block-size": (args.block_size, 1),
        "--max-cells": (args.max_cells, 2),
        "--gene2vec-dim": (args.gene2vec_dim, 1),
        "--epochs": (args.epochs, 1),
        "--walk-length": (args.walk_length, 2),
        "--walks-per-node": (args.walks_per_node, 1),
        "--window": (args.window, 1),
        "--binary-dim": (args.binary_dim, 1),
        "--text-max-tokens": (args.text_max_tokens, 1),
    }
    for flag, (value, minimum) in minimums.items():
        if value is not None and value < minimum:
            raise SystemExit(f"{flag} must be at least {minimum}, got {value}.")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then run the recipe; input problems end with a one-line message naming the fix."""
    final = args.out
    try:
        _check_arguments(args)
        inputs = [path for path in (*(args.adata or []), args.gene2vec, args.knowledge, args.model, args.tokenizer)
                  if path is not None and os.path.exists(path)]
        # every output goes into a staging folder that replaces --out only when the run succeeds: a failed or killed
        # run leaves the previous prior (if any) as it was, and never a mix of old and new files
        with claimed_output(final, inputs, command="build-prior", folder=True, overwrite=args.overwrite), \
                atomic_directory(final) as staged:
            args.out = staged
            code = _run(args, final)
            write_output_marker(staged, "build-prior")
        return code
    except USER_ERRORS as error:
        raise SystemExit(user_error_message("build-prior", error, {"(gene_column=)": "(--knowledge-gene-column)"})
                         ) from None
    except SystemExit as stop:  # the checks' own messages, in the same one-line form (an exit status passes through)
        if isinstance(stop.code, str) and not stop.code.startswith("scgene "):
            raise SystemExit(f"scgene build-prior: error: {stop.code}") from None
        raise


def _run(args: argparse.Namespace, final: Path) -> int:
    from scgene.prior.fusion import fuse_prior, save_prior
    from scgene.prior.gene2vec import load_word2vec_text
    from scgene.prior.knowledge import knowledge_embedding, read_knowledge_table, read_orthologs

    progress = not args.no_progress
    tokenizer = load_tokenizer(args.tokenizer)
    model = _load_model(args.model) if args.model else None
    if args.hidden_size is None:
        from scgene import ScGeneConfig

        args.hidden_size = model.config.hidden_size if model is not None else ScGeneConfig().hidden_size
    _check_shapes(args, tokenizer, model)
    table = None
    if not args.no_knowledge:  # read and check the table before the long co-expression step
        table = read_knowledge_table(
            args.knowledge, gene_column=args.knowledge_gene_column, text_columns=args.text_columns
        )
        if args.orthologs is not None:
            table = table.translated(read_orthologs(args.orthologs))
        allowed = None
        if args.knowledge_genes == "adata":
            if args.adata is None:
                raise SystemExit("--knowledge-genes adata needs --adata.")
            allowed = _adata_gene_ids(args.adata, tokenizer, args.gene_column, args.use_raw)
        # embed only what the prior can hold (and, with --knowledge-genes adata, what the data measures): text is slow
        table = _vocabulary_rows(table, tokenizer, allowed)
    record: dict = {
        "recipe": "seed 000: zero_pad(gene2vec, hidden_size) + PCA(binary linear embedding ++ text embedding)",
        "parameters": {k: [str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                       for k, v in (vars(args) | {"out": final}).items() if k[0] != "_"},
        "sources": {"tokenizer": args.tokenizer or "default human vocabulary", "vocab_size": tokenizer.vocab_size},
        "timings_seconds": {},
    }
    written: list[str] = []  # outputs of this run (older files in DIR are not vouched for by the record)

    if args.no_gene2vec:
        vectors = None
    elif args.gene2vec is not None:
        vectors = load_word2vec_text(args.gene2vec)
        record["sources"]["gene2vec"] = {"path": str(args.gene2vec), "sha256": sha256_file(args.gene2vec)}
    else:
        vectors = _coexpression_and_gene2vec(args, tokenizer, progress, record, written)

    knowledge = None
    if table is not None:
        start = time.perf_counter()
        embedded, info = knowledge_embedding(
            table,
            hidden_size=args.hidden_size,
            binary_dim=args.binary_dim,
            text_model=args.text_model,
            seed=args.seed,
            progress=progress,
            cache_dir=None if args.no_text_cache else args.text_cache,
            max_tokens=args.text_max_tokens,
        )
        knowledge = (table.genes, embedded, table.ensembl_ids)
        record["sources"]["knowledge"] = {"path": str(args.knowledge), "sha256": sha256_file(args.knowledge)}
        if args.orthologs is not None:
            orthologs = ortholog_table(args.orthologs)
            record["sources"]["orthologs"] = {"path": str(orthologs), "sha256": sha256_file(orthologs)}
        record["knowledge"] = info
        record["timings_seconds"]["knowledge"] = round(time.perf_counter() - start, 2)

    prior, coverage = fuse_prior(tokenizer, args.hidden_size, gene2vec=vectors, knowledge=knowledge)
    if coverage["vocab_genes_with_any_prior"] == 0:
        raise ValueError(
            f"None of the {coverage['vocab_size'] - 3} vocabulary genes got a prior: the data's and the knowledge "
            "table's genes do not match the tokenizer's vocabulary (another species? mouse data needs a mouse "
            "vocabulary: --tokenizer with one made by ScGeneTokenizer.from_anndata, and --orthologs mouse to carry "
            "the human knowledge table over)."
        )
    save_prior(args.out / "gene_prior.safetensors", prior)
    written.append("gene_prior.safetensors")
    record["coverage"] = coverage
    if model is not None:
        model.set_gene_prior(prior)
        with atomic_directory(args.out / "model") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        record["sources"]["model"] = args.model
    record["outputs"] = {name: sha256_file(args.out / name) for name in written}
    write_json(args.out / "prior_record.json", record)
    print(
        f"Prior {prior.shape[0]} x {prior.shape[1]} written to {final}: "
        f"{coverage['vocab_genes_with_any_prior']} of {coverage['vocab_size'] - 3} vocabulary genes have a prior "
        f"({coverage['vocab_genes_all_zero']} all zero)."
    )
    return 0
