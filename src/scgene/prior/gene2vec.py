"""gene2vec: skip-gram word2vec over co-expression edges, and the node2vec random-walk variant.

Seed 000 turns every co-expression edge into a two-gene "sentence" `[gene_a, gene_b]` and trains skip-gram on
them, so genes that share co-expression partners end up close. The node2vec variant of the seed note instead
feeds uniform random walks on the co-expression graph to the same skip-gram, which also reaches genes two or
more hops apart. Vectors are saved in the word2vec text format of the published Gene2vec embeddings
(`N D` header, then `GENE v1 ... vD` per line), which `load_word2vec_text` also reads.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
from gensim.models import Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from tqdm.auto import tqdm

from ..fileio import atomic_path

MIN_TRAINING_WORDS = 200_000


def stable_hash(text: str) -> int:
    """Hash independent of PYTHONHASHSEED, so gensim's per-word seeding is reproducible across processes."""
    return zlib.crc32(text.encode("utf-8"))


def corpus_repeats(n_words: int, epochs: int) -> int:
    """How many copies of a corpus of `n_words` words to train on, so that `epochs` passes see at least
    MIN_TRAINING_WORDS words: on a network of a few hundred edges, 30 plain epochs leave every vector near one
    shared direction (co-expressed and random pairs alike at cosine ~0.99); a few hundred thousand word updates
    separate them. Repeating the corpus, rather than adding epochs, keeps gensim's per-epoch overhead small."""
    return max(1, math.ceil(MIN_TRAINING_WORDS / max(n_words * epochs, 1)))


class _EpochProgress(CallbackAny2Vec):
    """A tqdm bar that advances once per word2vec epoch."""

    def __init__(self, epochs: int, enabled: bool):
        self.bar = tqdm(total=epochs, desc="skip-gram epochs", disable=not enabled)

    def on_epoch_end(self, model):
        self.bar.update(1)

    def on_train_end(self, model):
        self.bar.close()


def train_skipgram(
    sentences: list[list[str]],
    dim: int = 200,
    window: int = 1,
    epochs: int = 30,
    negative: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Train skip-gram word2vec on `sentences` (repeated `corpus_repeats` times) for `epochs`; return genes
    (most frequent first) and their float32 vectors.

    One worker thread and a fixed hash make the result a function of the inputs and `seed` only. Frequent-word
    downsampling is off (`sample=0`): every sentence is a measured co-expression, and in a corpus of a few
    thousand edges the default threshold would discard most updates of well-connected genes.
    """
    if not sentences:
        raise ValueError("No sentences to train on: the co-expression network has no edges. Lower --threshold.")
    model = Word2Vec(
        vector_size=dim,
        window=window,
        min_count=1,
        sg=1,
        negative=negative,
        sample=0,
        seed=seed,
        workers=1,
        hashfxn=stable_hash,
    )
    corpus = sentences * corpus_repeats(sum(len(s) for s in sentences), epochs)
    model.build_vocab(sentences)
    model.train(
        corpus,
        total_examples=len(corpus),
        epochs=epochs,
        callbacks=[_EpochProgress(epochs, progress)],
    )
    genes = list(model.wv.index_to_key)
    return genes, np.asarray(model.wv.vectors, dtype=np.float32)


def edge_sentences(edges: pd.DataFrame, seed: int = 0) -> list[list[str]]:
    """The seed's two-gene sentences, one per edge, in a seeded random order (so learning-rate decay does
    not follow the gene order of the correlation tiles)."""
    order = np.random.default_rng(seed).permutation(len(edges))
    a = edges["gene_a"].to_numpy(dtype=object)[order]
    b = edges["gene_b"].to_numpy(dtype=object)[order]
    return [[str(x), str(y)] for x, y in zip(a, b)]


def gene2vec(
    edges: pd.DataFrame, dim: int = 200, epochs: int = 30, seed: int = 0, progress: bool = True
) -> tuple[list[str], np.ndarray]:
    """Seed 000's gene2vec: skip-gram (window 1) on the two-gene sentences of the edge list."""
    return train_skipgram(edge_sentences(edges, seed), dim=dim, window=1, epochs=epochs, seed=seed, progress=progress)


def random_walks(
    edges: pd.DataFrame, walk_length: int = 20, walks_per_node: int = 10, seed: int = 0
) -> list[list[str]]:
    """Uniform random walks on the undirected co-expression graph: `walks_per_node` walks of `walk_length`
    genes start at every gene; each step moves to a neighbour chosen with equal probability."""
    if walk_length < 2 or walks_per_node < 1:
        raise ValueError(f"Need walk_length >= 2 and walks_per_node >= 1, got {walk_length} and {walks_per_node}.")
    genes, codes = np.unique(edges[["gene_a", "gene_b"]].to_numpy(dtype=str), return_inverse=True)
    codes = codes.reshape(-1, 2)
    sources = np.concatenate([codes[:, 0], codes[:, 1]])
    targets = np.concatenate([codes[:, 1], codes[:, 0]])
    order = np.lexsort((targets, sources))
    sources, neighbours = sources[order], targets[order]
    indptr = np.searchsorted(sources, np.arange(len(genes) + 1))
    degree = np.diff(indptr)

    rng = np.random.default_rng(seed)
    starts = np.concatenate([rng.permutation(len(genes)) for _ in range(walks_per_node)])
    walks = np.empty((len(starts), walk_length), dtype=np.int64)
    walks[:, 0] = starts
    for step in range(1, walk_length):
        current = walks[:, step - 1]
        offset = (rng.random(len(current)) * degree[current]).astype(np.int64)
        walks[:, step] = neighbours[indptr[current] + offset]
    names = genes.astype(object)
    return [list(names[walk]) for walk in walks]


def node2vec(
    edges: pd.DataFrame,
    dim: int = 200,
    walk_length: int = 20,
    walks_per_node: int = 10,
    window: int = 5,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """The seed note's node2vec variant: uniform random walks fed to the same skip-gram."""
    if len(edges) == 0:
        raise ValueError("No edges to walk on: the co-expression network is empty. Lower --threshold.")
    walks = random_walks(edges, walk_length=walk_length, walks_per_node=walks_per_node, seed=seed)
    return train_skipgram(walks, dim=dim, window=window, epochs=epochs, seed=seed, progress=progress)


def save_word2vec_text(path, genes: list[str], vectors: np.ndarray) -> None:
    """Write `N D` then one `GENE v1 ... vD` line per gene (word2vec text format), atomically."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(genes):
        raise ValueError(f"Expected one vector per gene, got {len(genes)} genes and vectors of shape {vectors.shape}.")
    bad = [g for g in genes if not g or any(c.isspace() for c in g)]
    if bad:
        raise ValueError(f"Gene names must be non-empty and without whitespace for the text format: {bad[:5]}")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(f"{len(genes)} {vectors.shape[1]}\n")
        for gene, vector in zip(genes, vectors):
            handle.write(gene + " " + " ".join(f"{v:.7g}" for v in vector) + "\n")


def load_word2vec_text(path) -> tuple[list[str], np.ndarray]:
    """Read word2vec text vectors, with or without the `N D` header line, space- or tab-separated (the
    published Gene2vec files use both variants)."""
    genes, rows = [], []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if line_number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                continue
            try:
                vector = np.asarray(fields[1:], dtype=np.float32)
            except ValueError:
                raise ValueError(
                    f"{path} line {line_number} is not 'GENE v1 ... vD' with numbers after the gene name: "
                    f"{line[:80].rstrip()!r}. Pass a word2vec text file (the published Gene2vec format)."
                ) from None
            if not len(vector):
                raise ValueError(f"{path} line {line_number} has a gene name but no vector: {line[:80].rstrip()!r}.")
            genes.append(fields[0])
            rows.append(vector)
    if not rows:
        raise ValueError(f"{path} holds no vectors.")
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"{path} has vectors of different lengths {sorted(sizes)}; is it a word2vec text file?")
    return genes, np.stack(rows)
