import numpy as np
import pytest
import scipy.sparse as sp

from scgene.prior.coexpression import BlockwisePearson, coexpression_edges, read_edges, write_edges


def full_from_tiles(pearson: BlockwisePearson) -> np.ndarray:
    """The kept genes' correlation matrix, in input order, assembled from the tiles."""
    full = np.full((pearson.n_genes, pearson.n_genes), np.nan)
    for a, b in pearson.block_pairs:
        tile = pearson.tile(a, b)
        full[np.ix_(pearson.blocks[a], pearson.blocks[b])] = tile
        full[np.ix_(pearson.blocks[b], pearson.blocks[a])] = tile.T
    return full[np.ix_(pearson.kept, pearson.kept)]


def mixed_density_counts(n_cells=300, seed=1) -> sp.csr_matrix:
    """30 rarely detected genes (2%) and 30 often detected ones (60%), shuffled, so both tile kernels run."""
    rng = np.random.default_rng(seed)
    density = rng.permutation(np.r_[np.full(30, 0.02), np.full(30, 0.6)])
    counts = (rng.random((n_cells, 60)) < density) * rng.poisson(3, (n_cells, 60)) + 0.0
    counts[:, density == 0.6] += (rng.random((n_cells, 1)) < 0.3) * 4.0  # shared signal: real correlations
    return sp.csr_matrix(np.log1p(counts))


def correlated_matrix(n_cells=400, seed=0) -> np.ndarray:
    """g0 base; g1 = g0 + small noise (r ~ 0.99); g2 = 10 - g0 (r = -1); g3 independent; g4 constant; g5 all 0."""
    rng = np.random.default_rng(seed)
    base = rng.poisson(2.0, n_cells).astype(float)
    return np.column_stack(
        [base, base + rng.normal(0, 0.1, n_cells), 10 - base, rng.poisson(2.0, n_cells), np.full(n_cells, 3.0),
         np.zeros(n_cells)]
    )


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_blockwise_equals_numpy_corrcoef(block_size):
    X = mixed_density_counts()
    pearson = BlockwisePearson(X, block_size=block_size)
    kept = pearson.kept
    np.testing.assert_allclose(full_from_tiles(pearson), np.corrcoef(X.toarray()[:, kept].T), atol=1e-5)
    if block_size == 7:
        kernels = {pearson.uses_sparse_product(a, b) for a, b in pearson.block_pairs}
        assert kernels == {True, False}


def test_blockwise_equals_corrcoef_on_real_pbmc(pbmc):
    pearson = BlockwisePearson(pbmc.X, block_size=64)
    assert len({pearson.uses_sparse_product(a, b) for a, b in pearson.block_pairs}) == 2
    dense = pbmc.X.toarray()[:, pearson.kept]
    np.testing.assert_allclose(full_from_tiles(pearson), np.corrcoef(dense.T), atol=1e-5)


def test_threshold_and_sign():
    genes = [f"g{i}" for i in range(6)]
    X = sp.csr_matrix(correlated_matrix())
    pairs = lambda edges: {(a, b) for a, b in zip(edges.gene_a, edges.gene_b)}  # noqa: E731
    both, info = coexpression_edges(X, genes, threshold=0.7, sign="both", block_size=2, progress=False)
    assert pairs(both) == {("g0", "g1"), ("g0", "g2"), ("g1", "g2")}
    assert info.n_positive_edges == 1 and info.n_negative_edges == 2
    assert both.set_index(["gene_a", "gene_b"]).loc[("g0", "g2"), "r"] == pytest.approx(-1.0)
    positive, _ = coexpression_edges(X, genes, threshold=0.7, sign="positive", progress=False)
    assert pairs(positive) == {("g0", "g1")}
    negative, _ = coexpression_edges(X, genes, threshold=0.7, sign="negative", progress=False)
    assert pairs(negative) == {("g0", "g2"), ("g1", "g2")} and (negative.r < 0).all()
    strict, _ = coexpression_edges(X, genes, threshold=0.999999, sign="both", progress=False)
    assert pairs(strict) == {("g0", "g2")}


def test_zero_variance_genes_are_skipped_and_reported():
    genes = [f"g{i}" for i in range(6)]
    edges, info = coexpression_edges(sp.csr_matrix(correlated_matrix()), genes, threshold=0.01, progress=False)
    assert info.zero_variance_genes == ["g4", "g5"] and info.n_genes_used == 4
    assert not set(edges.gene_a) & {"g4", "g5"} and not set(edges.gene_b) & {"g4", "g5"}
    assert np.isfinite(edges.r).all()


def test_cell_subsampling_is_seeded(pbmc):
    def run(seed):
        return coexpression_edges(pbmc.X, pbmc.var_names, 0.3, max_cells=500, seed=seed, progress=False)

    (first, info), (again, _), (other, _) = run(0), run(0), run(1)
    assert info.n_cells_used == 500 and info.n_cells == pbmc.n_obs
    assert first.equals(again) and not first.equals(other)


def test_real_pbmc_network_links_known_marker_genes(pbmc):
    edges, info = coexpression_edges(pbmc.X, pbmc.var_names, threshold=0.5, sign="positive", progress=False)
    linked = {frozenset(pair) for pair in zip(edges.gene_a, edges.gene_b)}
    assert frozenset({"PPBP", "PF4"}) in linked  # platelet markers
    assert info.n_edges == len(edges) > 10 and (edges.r >= 0.5).all()


def test_edges_tsv_round_trip_and_atomic(tmp_path):
    edges, _ = coexpression_edges(sp.csr_matrix(correlated_matrix()), list("abcdef"), 0.7, progress=False)
    path = tmp_path / "out" / "edges.tsv"
    write_edges(path, edges)
    assert [p.name for p in path.parent.iterdir()] == ["edges.tsv"]
    assert path.read_text().splitlines()[0] == "gene_a\tgene_b\tr"
    back = read_edges(path)
    assert list(back.gene_a) == list(edges.gene_a)
    np.testing.assert_allclose(back.r, edges.r, atol=1e-6)


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def __getitem__(self, key):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_edges(tmp_path / "edges.tsv", Broken())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0}, "threshold must be in"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"sign": "up"}, "sign must be one of"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        coexpression_edges(sp.csr_matrix(correlated_matrix()), list("abcdef"), **kwargs, progress=False)


def test_gene_count_mismatch_and_nan_are_rejected():
    with pytest.raises(ValueError, match="6 gene columns but 2 gene names"):
        coexpression_edges(sp.csr_matrix(correlated_matrix()), ["a", "b"], progress=False)
    bad = correlated_matrix()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        coexpression_edges(sp.csr_matrix(bad), list("abcdef"), progress=False)



def test_duplicate_gene_names_and_no_variable_genes_are_clear_errors():
    with pytest.raises(ValueError, match=r"must be unique .* e.g. \['a'\].*Ensembl ids"):
        coexpression_edges(sp.csr_matrix(correlated_matrix()), list("abcdea"), progress=False)
    constant = sp.csr_matrix(np.column_stack([np.full(50, 2.0), np.zeros(50), np.r_[1.0, np.zeros(49)]]))
    with pytest.raises(ValueError, match="Only 1 of 3 genes vary across the 50 cells"):
        coexpression_edges(constant, list("abc"), progress=False)


def test_memory_stays_blockwise():
    """Peak traced memory of the whole computation (numpy and scipy arrays are traced) stays far below one dense
    cells x genes float32 matrix or one genes x genes float64 matrix: only the sparse input's float32 copy and
    a few cells x block / block x block arrays per thread are alive at once."""
    import tracemalloc

    n_cells, n_genes, block = 3000, 4000, 100
    rare = sp.random(n_cells, n_genes // 2, density=0.01, format="csc", random_state=1, dtype=np.float32)
    common = sp.random(n_cells, n_genes // 2, density=0.1, format="csc", random_state=2, dtype=np.float32)
    X = sp.hstack([rare, common], format="csr")
    X.data = np.log1p(100 * X.data)
    sparse_copy = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
    dense_cells_by_genes, dense_genes_by_genes = n_cells * n_genes * 4, n_genes * n_genes * 8
    genes = [f"g{i}" for i in range(n_genes)]

    tracemalloc.start()
    try:
        edges, info = coexpression_edges(X, genes, threshold=0.7, block_size=block, progress=False, n_jobs=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.n_genes_used == n_genes
    working = peak - sparse_copy
    assert peak < dense_cells_by_genes / 2 and peak < dense_genes_by_genes / 4, peak
    assert working < dense_cells_by_genes / 4, (working, dense_cells_by_genes)
    pearson = BlockwisePearson(X, block_size=block)
    assert {pearson.uses_sparse_product(a, b) for a, b in pearson.block_pairs} == {True, False}


def test_no_block_spans_the_whole_panel(pbmc):
    """With the default block size (1024) a 200-gene panel is still split, so neither a dense cells x genes block
    nor a full genes x genes tile is ever formed."""
    pearson = BlockwisePearson(pbmc.X)
    assert pearson.tile_genes == -(-len(pearson.kept) // 2) and len(pearson.blocks) == 2
    assert all(pearson.tile(a, b).shape[0] < len(pearson.kept) for a, b in pearson.block_pairs)
    _, info = coexpression_edges(pbmc.X, pbmc.var_names, block_size=64, progress=False)
    assert (info.block_size, info.tile_genes) == (64, 64)
