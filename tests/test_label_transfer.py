"""Label transfer (`scgene.transfer_labels`, `scgene annotate --reference`) on real PBMC 3k cells with the shipped
checkpoint: a reference and a query with different gene panels, the tokenizer's `genes=`, the distance-based
"Unknown", and the files left as they were."""

import hashlib
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import f1_score

from scgene import DEFAULT_CHECKPOINT, embed, transfer_labels
from scgene.cli import main
from scgene.label_transfer import ReferenceAnnotator

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
TYPES = ["Naive CD4 T", "CD14+ Mono", "B", "NK", "CD8 T"]


@pytest.fixture(scope="module")
def panels():
    """A reference (900 cells) and a query (400 other cells) of five PBMC types, each keeping its own random 1,400 of the
    2,000 genes (about 1,000 shared), as two files with different HVG selections would."""
    cells = ad.read_h5ad(PBMC)
    cells = cells[cells.obs["cell_type"].isin(TYPES)]
    rng = np.random.default_rng(0)
    reference_genes = np.sort(rng.choice(cells.n_vars, 1400, replace=False))
    query_genes = np.sort(rng.choice(cells.n_vars, 1400, replace=False))
    return cells[:900, reference_genes].copy(), cells[900:1300, query_genes].copy()


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_genes_reads_a_panel_as_if_the_file_measured_only_it(panels, tokenizer, caplog):
    reference, _ = panels
    panel = [gene for gene in reference.var_names[::3] if tokenizer._lookup(gene) is not None]
    kept = embed(reference[:64], key_added=None, progress=False, genes=panel)
    subset = embed(reference[:64, panel].copy(), key_added=None, progress=False)
    np.testing.assert_array_equal(kept, subset)  # normalised over the panel, not over the file's genes
    assert not np.allclose(kept, embed(reference[:64], key_added=None, progress=False))
    ids = tokenizer.convert_genes_to_ids(panel)
    np.testing.assert_array_equal(embed(reference[:64], key_added=None, progress=False, genes=ids), kept)
    with caplog.at_level(logging.WARNING):  # a file's own gene list may hold names the vocabulary lacks
        with_unknown = embed(reference[:64], key_added=None, progress=False, genes=[*panel, "NOT_A_GENE"])
    np.testing.assert_array_equal(with_unknown, kept)
    assert "1 of the" in caplog.text and "'NOT_A_GENE'" in caplog.text
    with pytest.raises(ValueError, match="None of the 1 genes passed as genes= is measured"):
        embed(reference[:8, 1:], key_added=None, progress=False, genes=[reference.var_names[0]])


def test_transfer_labels_across_gene_panels_with_unknown_for_a_type_the_reference_lacks(panels, tokenizer):
    reference, query = panels
    truth = query.obs["cell_type"].astype(str).to_numpy()
    result = transfer_labels(query, reference, label_key="cell_type", progress=False)
    best = result["scgene_label"].astype(str).to_numpy()
    assert list(result.index) == list(query.obs_names)
    assert query.obs["scgene_label"].dtype == "category"
    assert (best == "Unknown").mean() < 0.15  # the query's types are all in the reference
    called = best != "Unknown"
    assert f1_score(truth[called], best[called], average="macro") > 0.8  # five well-separated types
    record = query.uns["scgene_label"]
    shared = {tokenizer._lookup(gene) for gene in reference.var_names.intersection(query.var_names)} - {None}
    assert record["genes_shared"] == len(shared) > 800
    assert record["label_key"] == "cell_type" and record["temperature"] > 0 and record["distance_threshold"] > 0
    # without the reference's B cells, the query's B cells are far from every reference cell
    no_b = reference[reference.obs["cell_type"] != "B"].copy()
    calls = transfer_labels(query, no_b, label_key="cell_type", key_added="without_b", progress=False)["without_b"]
    novel = truth == "B"
    unknown = (calls == "Unknown").to_numpy()
    assert unknown[novel].mean() > 0.5 > 0.15 > unknown[~novel].mean()
    assert "B" not in calls.cat.categories[:-1]


def test_cells_without_counts_on_the_shared_genes_are_unknown(panels, caplog):
    reference, query = panels
    query = query[:40].copy()
    counts = query.X.tolil()
    counts[:3] = 0
    query.X = counts.tocsr()
    with caplog.at_level(logging.WARNING):
        result = transfer_labels(query, reference, label_key="cell_type", progress=False)
    assert (result["scgene_label"][:3] == "Unknown").all() and (result["scgene_label_confidence"][:3] == 0).all()
    assert "3 query cells have no counts on the shared genes" in caplog.text


def test_reference_annotator_rejects_what_it_cannot_learn():
    rng = np.random.default_rng(0)
    features = np.r_[rng.normal(0, 1, (60, 4)), rng.normal(6, 1, (60, 4))]
    labels = np.array(["a"] * 60 + ["b"] * 60)
    with pytest.raises(ValueError, match="two or more labels"):
        ReferenceAnnotator().fit(features[:60], labels[:60])
    with pytest.raises(ValueError, match="unknown_quantile"):
        ReferenceAnnotator(unknown_quantile=95)
    with pytest.raises(RuntimeError, match="fit"):
        ReferenceAnnotator().predict(features)
    annotator = ReferenceAnnotator().fit(features, labels)
    far = annotator.predict(rng.normal(30, 1, (10, 4)))
    assert (far.labels == "Unknown").all() and set(far.best) <= {"a", "b"}
    near = annotator.predict(features)
    assert (near.labels == labels).mean() > 0.9
    off = ReferenceAnnotator(unknown_quantile=None).fit(features, labels).predict(rng.normal(30, 1, (10, 4)))
    assert not (off.labels == "Unknown").any()
    # principal components keep their scale: distances are plain Euclidean ones to the 15 nearest reference cells
    from sklearn.neighbors import NearestNeighbors

    scaled = features * [10, 1, 1, 1]
    query = rng.normal(3, 2, (5, 4)) * [10, 1, 1, 1]
    unscaled = ReferenceAnnotator("knn", standardize=False).fit(scaled, labels).predict(query)
    expected = NearestNeighbors(n_neighbors=15).fit(scaled).kneighbors(query)[0].mean(axis=1)
    np.testing.assert_allclose(unscaled.distance, expected, rtol=1e-5)


def test_annotate_command_with_a_reference(panels, tmp_path, capsys):
    reference, query = panels
    reference_path, query_path, out = tmp_path / "reference.h5ad", tmp_path / "query.h5ad", tmp_path / "labelled.h5ad"
    reference.write_h5ad(reference_path)
    query.write_h5ad(query_path)
    before = {path: digest(path) for path in (reference_path, query_path)}
    assert main(["annotate", str(query_path), "--reference", str(reference_path), "--label-key", "cell_type",
                 "--out", str(out)]) == 0
    assert f"Wrote {out}" in capsys.readouterr().out
    written = ad.read_h5ad(out)
    assert {"scgene_label", "scgene_label_confidence", "scgene_label_distance"} <= set(written.obs)
    assert written.uns["scgene_label"]["reference"] == str(reference_path)
    assert written.uns["scgene_label"]["model"] == str(DEFAULT_CHECKPOINT)
    for arguments, message in (
        (["--reference", str(reference_path)], "--reference needs --label-key"),
        (["--reference", str(reference_path), "--label-key", "nope"], "--label-key 'nope' is not a column"),
        (["--reference", str(tmp_path / "missing.h5ad"), "--label-key", "cell_type"], "is not a file"),
        ([], "annotate needs a classifier (--model CLS_DIR) or a labelled reference"),
    ):
        assert main(["annotate", str(query_path), *arguments, "--out", str(tmp_path / "x.h5ad")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.h5ad").exists()
    assert before == {path: digest(path) for path in (reference_path, query_path)}
