"""Precompute the sentence-transformer embeddings of the shipped knowledge table's descriptions.

Embedding the ~26,000 gene descriptions with all-MiniLM-L6-v2 takes about 15 minutes on 2 CPU cores, which made a
cold `scgene build-prior` slow. This script does it once: the 384-d unit-norm embeddings (first 128 word pieces of
each text, as build-prior reads them) are reduced to their leading principal components and stored in float16 with
an 8-byte key per text, so that `knowledge_embedding` finds any of these texts whichever table rows a run uses.

    python scripts/build_text_embedding.py [--components 128] [--output src/scgene/resources/knowledge/...]

After the table gains genes, `--extend` keeps the shipped rows and their principal components and adds only the new
texts, encoded the same way and projected onto those components (seconds, not a quarter of an hour; the metadata
records how many rows were added this way).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from scgene.commands.build_prior import DEFAULT_TEXT_CACHE  # noqa: E402
from scgene.fileio import atomic_path  # noqa: E402
from scgene.prior.knowledge import (  # noqa: E402
    DEFAULT_TABLE,
    DEFAULT_TEXT_MODEL,
    PRECOMPUTED_MAX_TOKENS,
    PRECOMPUTED_TEXT,
    read_knowledge_table,
    resolve_text_model,
    text_embedding,
    text_key,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--components", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=DEFAULT_TEXT_CACHE, help="text embedding cache (build-prior's)")
    parser.add_argument("--output", type=Path, default=PRECOMPUTED_TEXT)
    parser.add_argument("--extend", action="store_true",
                        help="keep OUTPUT's rows and components; encode and project only the table's new texts")
    args = parser.parse_args()
    if args.extend:
        extend(args)
        return
    from safetensors.numpy import save_file
    from sklearn.decomposition import PCA

    start = time.perf_counter()
    table = read_knowledge_table(args.table)
    rows: dict[str, np.ndarray] = {}
    for column in table.texts.values():  # embedded as build-prior embeds the column, so its cache is shared
        vectors = text_embedding(column, DEFAULT_TEXT_MODEL, cache_dir=args.cache, max_tokens=PRECOMPUTED_MAX_TOKENS)
        rows.update((text, vector) for text, vector in zip(column, vectors) if text)
    texts = list(rows)
    embedded = np.stack([rows[text] for text in texts])
    pca = PCA(n_components=args.components, svd_solver="full", random_state=0)
    reduced = pca.fit_transform(embedded.astype(np.float64))
    keys = np.stack([np.frombuffer(text_key(text), np.uint8) for text in texts])
    if len({key.tobytes() for key in keys}) != len(keys):
        raise SystemExit("Two texts share an 8-byte key; lengthen text_key.")
    model_files = sorted(Path(resolve_text_model(DEFAULT_TEXT_MODEL)).rglob("*.safetensors"))
    metadata = {
        "model": DEFAULT_TEXT_MODEL,
        "model_weights_sha256": hashlib.sha256(model_files[0].read_bytes()).hexdigest() if model_files else "",
        "max_tokens": str(PRECOMPUTED_MAX_TOKENS),
        "texts": str(len(texts)),
        "components": str(args.components),
        "explained_variance": f"{pca.explained_variance_ratio_.sum():.4f}",
        "table": args.table.name,
        "table_sha256": hashlib.sha256(args.table.read_bytes()).hexdigest(),
    }
    with atomic_path(args.output) as staged:
        # the projection travels with the rows, so that a fresh encoding of any text can be checked against them
        arrays = {"embedding": reduced.astype(np.float16), "text_keys": keys, "pca_mean": pca.mean_.astype(np.float32),
                  "pca_components": pca.components_.astype(np.float32)}
        # C order: safetensors writes an array's buffer as it lies, and PCA's output is Fortran-ordered
        save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, str(staged), metadata=metadata)
    print(f"{len(texts)} texts -> {args.components} PCs ({metadata['explained_variance']} of the variance) in "
          f"{args.output} ({args.output.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)")


def extend(args) -> None:
    """Add the texts of the table that OUTPUT lacks, projected onto OUTPUT's principal components."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    arrays = load_file(args.output)
    with safe_open(args.output, "np") as handle:
        metadata = dict(handle.metadata())
    known = {key.tobytes() for key in arrays["text_keys"]}
    table = read_knowledge_table(args.table)
    new_texts = list(dict.fromkeys(text for column in table.texts.values() for text in column
                                   if text and text_key(text) not in known))
    if not new_texts:
        print(f"{args.output} already holds every text of {args.table.name}")
        return
    vectors = text_embedding(new_texts, DEFAULT_TEXT_MODEL, cache_dir=args.cache, max_tokens=PRECOMPUTED_MAX_TOKENS)
    projected = (vectors.astype(np.float64) - arrays["pca_mean"]) @ arrays["pca_components"].T.astype(np.float64)
    arrays["embedding"] = np.concatenate([arrays["embedding"], projected.astype(np.float16)])
    arrays["text_keys"] = np.concatenate([arrays["text_keys"],
                                          np.stack([np.frombuffer(text_key(text), np.uint8) for text in new_texts])])
    added = int(metadata.get("projected_texts", 0)) + len(new_texts)
    metadata |= {"texts": str(len(arrays["text_keys"])), "projected_texts": str(added), "table": args.table.name,
                 "table_sha256": hashlib.sha256(args.table.read_bytes()).hexdigest()}
    with atomic_path(args.output) as staged:
        save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, str(staged), metadata=metadata)
    print(f"{len(new_texts)} new texts projected onto the {metadata['components']} components of {args.output} "
          f"({metadata['texts']} texts)")


if __name__ == "__main__":
    main()
