"""Fusion of the prior sources into the frozen `(vocab_size, hidden_size)` gene embedding of seed 000.

    prior[id] = zero_pad(gene2vec[gene], hidden_size) + knowledge_pca[gene]

Rows follow the tokenizer's ids; the special-token rows, and every gene a source does not cover, are zero in
that source's term. Source genes are matched to the vocabulary by Ensembl id (versioned or not; a source's own
Ensembl id column first) or symbol, then by the tokenizer's aliases for what is left; the coverage summary
counts what matched and what is zero.
"""

from __future__ import annotations

import re

import numpy as np
from safetensors.numpy import load_file, save_file

from ..fileio import atomic_path

PRIOR_KEY = "gene_prior"
_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


def _unversioned(gene: str) -> str:
    match = _VERSION.match(gene)
    return match.group(1) if match else gene


def _mean_norm(rows: np.ndarray) -> float:
    """Mean L2 norm of the covered rows, so the record shows how the two summed terms compare in scale."""
    return float(np.linalg.norm(rows, axis=1).mean()) if len(rows) else 0.0


def _special_ids(tokenizer) -> set[int]:
    return {tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id}


def align_to_vocab(
    tokenizer, genes: list[str], vectors: np.ndarray, ensembl_ids: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Place `vectors` (one row per source gene) at the tokenizer ids of `genes`; other rows stay zero.

    A symbol shared by several vocabulary genes fills all of them. Exact Ensembl-id or symbol matches win over
    alias matches, and the first source gene to claim an id keeps it. Returns the `(vocab_size, d)` float32
    matrix, the boolean mask of filled ids, and a coverage summary.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(genes):
        raise ValueError(f"Expected one vector per gene, got {len(genes)} genes and vectors of shape {vectors.shape}.")
    special = _special_ids(tokenizer)
    by_key: dict[str, list[int]] = {}
    for table in (tokenizer.ensembl_ids, tokenizer.symbols):
        for token_id, key in enumerate(table):
            if key and token_id not in special:
                by_key.setdefault(_unversioned(key), []).append(token_id)

    out = np.zeros((tokenizer.vocab_size, vectors.shape[1]), dtype=np.float32)
    filled = np.zeros(tokenizer.vocab_size, dtype=bool)
    unmatched: list[int] = []
    for row, gene in enumerate(genes):
        keys = ([_unversioned(ensembl_ids[row])] if ensembl_ids and ensembl_ids[row] else []) + [_unversioned(gene)]
        ids = next((by_key[k] for k in keys if k in by_key), None)
        if ids is None:
            unmatched.append(row)
            continue
        ids = [i for i in dict.fromkeys(ids) if not filled[i]]
        out[ids] = vectors[row]
        filled[ids] = True

    by_alias = 0
    still_unmatched = []
    for row in unmatched:
        try:
            (token_id,) = tokenizer.convert_genes_to_ids([genes[row]])
        except KeyError:
            still_unmatched.append(genes[row])
            continue
        if token_id in special or filled[token_id]:
            continue
        out[token_id] = vectors[row]
        filled[token_id] = True
        by_alias += 1

    vocab_genes = tokenizer.vocab_size - len(special)
    coverage = {
        "source_genes": len(genes),
        "source_genes_not_in_vocab": len(still_unmatched),
        "examples_not_in_vocab": still_unmatched[:10],
        "matched_by_alias": by_alias,
        "vocab_genes": vocab_genes,
        "vocab_genes_covered": int(filled.sum()),
        "vocab_genes_zero": int(vocab_genes - filled.sum()),
    }
    return out, filled, coverage


def fuse_prior(
    tokenizer,
    hidden_size: int,
    gene2vec: tuple[list[str], np.ndarray] | None = None,
    knowledge: tuple[list[str], np.ndarray, list[str] | None] | None = None,
) -> tuple[np.ndarray, dict]:
    """The fused prior: zero-padded gene2vec plus the `hidden_size` knowledge embedding, aligned to `tokenizer`.

    `gene2vec` is `(genes, vectors)` with at most `hidden_size` dimensions; `knowledge` is `(genes, vectors,
    ensembl_ids or None)` with exactly `hidden_size` dimensions. Either may be None (its term is zero).
    Returns the float32 matrix and a JSON-ready coverage report.
    """
    if gene2vec is None and knowledge is None:
        raise ValueError("Nothing to fuse: give gene2vec vectors, a knowledge embedding, or both.")
    prior = np.zeros((tokenizer.vocab_size, hidden_size), dtype=np.float32)
    covered = np.zeros(tokenizer.vocab_size, dtype=bool)
    report: dict = {"vocab_size": tokenizer.vocab_size, "hidden_size": hidden_size}
    if gene2vec is not None:
        genes, vectors = gene2vec
        if vectors.shape[1] > hidden_size:
            raise ValueError(
                f"gene2vec vectors have {vectors.shape[1]} dimensions, more than hidden_size={hidden_size}; "
                "train them with --gene2vec-dim at most the hidden size."
            )
        aligned, filled, coverage = align_to_vocab(tokenizer, genes, vectors)
        prior[:, : vectors.shape[1]] += aligned
        covered |= filled
        report["gene2vec"] = coverage | {"dim": int(vectors.shape[1]), "zero_padded_to": hidden_size}
        report["gene2vec"]["mean_row_norm"] = _mean_norm(aligned[filled])
    if knowledge is not None:
        genes, vectors, ensembl_ids = knowledge
        if vectors.shape[1] != hidden_size:
            raise ValueError(f"The knowledge embedding has {vectors.shape[1]} dimensions; expected {hidden_size}.")
        aligned, filled, coverage = align_to_vocab(tokenizer, genes, vectors, ensembl_ids)
        prior += aligned
        covered |= filled
        report["knowledge"] = coverage | {"mean_row_norm": _mean_norm(aligned[filled])}
    special = len(_special_ids(tokenizer))
    report["vocab_genes_with_any_prior"] = int(covered.sum())
    report["vocab_genes_all_zero"] = int(tokenizer.vocab_size - special - covered.sum())
    return prior, report


def save_prior(path, prior: np.ndarray) -> None:
    """Write the prior to safetensors under the key `gene_prior`, atomically."""
    with atomic_path(path) as tmp:
        save_file({PRIOR_KEY: np.ascontiguousarray(prior, dtype=np.float32)}, str(tmp))


def load_prior(path) -> np.ndarray:
    """Read the `gene_prior` matrix written by `save_prior` (or `scgene build-prior`)."""
    tensors = load_file(str(path))
    if PRIOR_KEY not in tensors:
        raise KeyError(f"{path} has no {PRIOR_KEY!r} tensor (found {sorted(tensors)}).")
    return tensors[PRIOR_KEY]
