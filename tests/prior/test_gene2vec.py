import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scgene.prior.coexpression import coexpression_edges
from scgene.prior.gene2vec import (
    gene2vec,
    load_word2vec_text,
    node2vec,
    random_walks,
    save_word2vec_text,
)

TOY = pd.DataFrame({"gene_a": ["A", "A", "B", "D", "E"], "gene_b": ["B", "C", "C", "E", "F"], "r": [0.9] * 5})


@pytest.fixture(scope="module")
def pbmc_edges(pbmc):
    edges, _ = coexpression_edges(pbmc.X, pbmc.var_names, threshold=0.3, sign="positive", progress=False)
    return edges


def cosine(vectors, index, a, b):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return (unit[[index[g] for g in a]] * unit[[index[g] for g in b]]).sum(axis=1)


def test_gene2vec_is_reproducible_with_a_seed():
    genes, first = gene2vec(TOY, dim=16, epochs=5, seed=3, progress=False)
    genes_again, again = gene2vec(TOY, dim=16, epochs=5, seed=3, progress=False)
    _, other = gene2vec(TOY, dim=16, epochs=5, seed=4, progress=False)
    assert genes == genes_again and sorted(genes) == list("ABCDEF")
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.shape == (6, 16) and first.dtype == np.float32


def test_gene2vec_is_reproducible_across_hash_seeds(tmp_path):
    """gensim seeds each word's vector from a hash of the word; a fixed hash keeps runs identical across processes."""
    script = (
        "import sys, pandas as pd; from scgene.prior.gene2vec import gene2vec, save_word2vec_text; "
        "e = pd.DataFrame({'gene_a': list('AABDE'), 'gene_b': list('BCCEF'), 'r': [0.9] * 5}); "
        "save_word2vec_text(sys.argv[1], *gene2vec(e, dim=8, epochs=3, seed=0, progress=False))"
    )
    child = tmp_path / "child.txt"
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = os.environ | {"PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", script, str(child)], check=True, env=env)
    here = tmp_path / "here.txt"
    save_word2vec_text(here, *gene2vec(TOY, dim=8, epochs=3, seed=0, progress=False))
    assert child.read_text() == here.read_text()


def test_coexpressed_genes_are_closer_than_random_pairs(pbmc_edges):
    genes, vectors = gene2vec(pbmc_edges, dim=64, seed=0, progress=False)
    index = {g: i for i, g in enumerate(genes)}
    edge_cos = cosine(vectors, index, pbmc_edges.gene_a, pbmc_edges.gene_b).mean()
    rng = np.random.default_rng(0)
    a, b = rng.choice(genes, 3000), rng.choice(genes, 3000)
    keep = a != b
    random_cos = cosine(vectors, index, a[keep], b[keep]).mean()
    assert edge_cos > random_cos + 0.1, (edge_cos, random_cos)


def test_node2vec_walks_stay_on_graph_edges():
    walks = random_walks(TOY, walk_length=7, walks_per_node=4, seed=0)
    neighbours = {}
    for a, b in zip(TOY.gene_a, TOY.gene_b):
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    assert len(walks) == 6 * 4 and all(len(w) == 7 for w in walks)
    assert sorted(w[0] for w in walks) == sorted(list("ABCDEF") * 4)
    for walk in walks:
        for here, there in zip(walk, walk[1:]):
            assert there in neighbours[here]
    # the two components {A, B, C} and {D, E, F} are never crossed; uniform choice reaches every neighbour
    assert all(set(w) <= set("ABC") or set(w) <= set("DEF") for w in walks)
    steps_from_e = {there for w in walks for here, there in zip(w, w[1:]) if here == "E"}
    assert steps_from_e == {"D", "F"}
    assert walks == random_walks(TOY, walk_length=7, walks_per_node=4, seed=0)


def test_node2vec_embeds_real_network(pbmc_edges):
    genes, vectors = node2vec(pbmc_edges, dim=32, walk_length=10, walks_per_node=5, epochs=5, seed=0, progress=False)
    assert set(genes) == set(pbmc_edges.gene_a) | set(pbmc_edges.gene_b)
    index = {g: i for i, g in enumerate(genes)}
    rng = np.random.default_rng(0)
    edge_cos = cosine(vectors, index, pbmc_edges.gene_a, pbmc_edges.gene_b).mean()
    random_cos = cosine(vectors, index, rng.choice(genes, 2000), rng.choice(genes, 2000)).mean()
    assert edge_cos > random_cos + 0.1


def test_empty_network_error_names_the_fix():
    empty = TOY.iloc[:0]
    with pytest.raises(ValueError, match="Lower --threshold"):
        gene2vec(empty, progress=False)
    with pytest.raises(ValueError, match="Lower --threshold"):
        node2vec(empty, progress=False)


def test_word2vec_text_round_trip_and_published_variants(tmp_path):
    genes, vectors = ["TP53", "MYC"], np.array([[0.5, -1.25, 3e-5], [1.0, 2.0, 3.0]], dtype=np.float32)
    path = tmp_path / "gene2vec.txt"
    save_word2vec_text(path, genes, vectors)
    assert path.read_text().splitlines()[0] == "2 3"
    back_genes, back = load_word2vec_text(path)
    assert back_genes == genes
    np.testing.assert_allclose(back, vectors, rtol=1e-6)
    from gensim.models import KeyedVectors  # the standard reader of the format accepts the file as is

    standard = KeyedVectors.load_word2vec_format(str(path), binary=False)
    assert list(standard.index_to_key) == genes
    np.testing.assert_allclose(standard["MYC"], vectors[1], rtol=1e-6)
    headerless = tmp_path / "gene2vec_dim_3.txt"  # published Gene2vec: no header, tab-separated
    headerless.write_text("TP53\t0.5 -1.25 3e-05\nMYC\t1 2 3\n")
    np.testing.assert_allclose(load_word2vec_text(headerless)[1], vectors, rtol=1e-6)
    with pytest.raises(ValueError, match="whitespace"):
        save_word2vec_text(tmp_path / "bad.txt", ["BAD GENE"], vectors[:1])


def test_malformed_vector_files_name_the_line(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("2 3\nTP53 0.5 -1.25 3e-05\nMYC 1 two 3\n")
    with pytest.raises(ValueError, match=r"line 3 is not 'GENE v1 ... vD'.*'MYC 1 two 3'"):
        load_word2vec_text(path)
    path.write_text("TP53 0.5 1\nMYC\n")
    with pytest.raises(ValueError, match="line 2 has a gene name but no vector"):
        load_word2vec_text(path)
    path.write_text("TP53 0.5 1\nMYC 1 2 3\n")
    with pytest.raises(ValueError, match=r"vectors of different lengths \[2, 3\]"):
        load_word2vec_text(path)
