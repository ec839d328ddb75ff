"""`scgene.evaluation` / `scgene evaluate`: metrics that separate a good embedding from noise, and the report."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scgene
from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneTokenizer
from scgene.cli import main
from scgene.evaluation import EvaluationSettings, depth_covariates, score_embedding

DATA = Path(__file__).parent / "data"
FAST = EvaluationSettings(n_folds=3)


@pytest.fixture(scope="module")
def pbmc_cells():
    """About 600 real PBMCs of the types with 30+ cells among the first 700 (kNN cannot recover rarer ones)."""
    adata = ad.read_h5ad(DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")[:700]
    counts = adata.obs["cell_type"].value_counts()
    return adata[adata.obs["cell_type"].isin(counts[counts >= 30].index)].copy()


def one_hot_labels(labels, noise, seed=0):
    codes = np.unique(labels, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    return np.eye(codes.max() + 1)[codes] * 3 + noise * rng.normal(size=(len(codes), codes.max() + 1))


def test_random_embedding_scores_near_chance_and_labels_score_near_perfect(pbmc_cells):
    labels = pbmc_cells.obs["cell_type"].astype(str).to_numpy()
    genes, counts = depth_covariates(pbmc_cells)
    random = score_embedding(np.random.default_rng(0).normal(size=(len(labels), 16)), labels,
                             genes_detected=genes, log_counts=counts, settings=FAST)
    informative = score_embedding(one_hot_labels(labels, noise=0.3), labels, genes_detected=genes, log_counts=counts,
                                  settings=FAST)
    assert random["knn_f1"] < 0.25 and abs(random["kmeans_ari"]) < 0.05 and abs(random["leiden_ari"]) < 0.05
    assert random["silhouette"] < 0.05 and random["pc1_corr_genes"] < 0.2
    assert informative["knn_f1"] > 0.95 and informative["logreg_f1"] > 0.95 and informative["knn_accuracy"] > 0.95
    assert informative["kmeans_ari"] > 0.8 and informative["leiden_nmi"] > 0.8 and informative["silhouette"] > 0.5
    assert np.isnan(informative["transfer_f1"])  # no batch column, no batch metrics


def test_depth_collapse_shows_in_pc1(pbmc_cells):
    labels = pbmc_cells.obs["cell_type"].astype(str).to_numpy()
    genes, counts = depth_covariates(pbmc_cells)
    rng = np.random.default_rng(1)
    collapsed = np.outer((genes - genes.mean()) / genes.std(), rng.normal(size=8)) * 5 + rng.normal(size=(len(genes), 8))
    scores = score_embedding(collapsed, labels, genes_detected=genes, log_counts=counts, settings=FAST)
    assert scores["pc1_variance"] > 0.7 and scores["pc1_corr_genes"] > 0.95 and scores["pc1_corr_counts"] > 0.8


def test_depth_inside_labels_is_caught_where_the_global_pc1_misses_it(pbmc_cells):
    """Labels far apart dominate the global PC1; inside each label the main axis is depth. Only the within-label
    metric sees it; an embedding with label structure and noise scores low on both."""
    labels = pbmc_cells.obs["cell_type"].astype(str).to_numpy()
    genes, counts = depth_covariates(pbmc_cells)
    rng = np.random.default_rng(2)
    depth = (genes - genes.mean()) / genes.std()
    structured = one_hot_labels(labels, noise=0.0) * 10 + rng.normal(scale=0.3, size=(len(genes), 1))
    with_depth = np.concatenate([structured, 3 * depth[:, None] + rng.normal(scale=0.1, size=(len(genes), 1))], axis=1)
    without = np.concatenate([structured, rng.normal(size=(len(genes), 1))], axis=1)
    hidden = score_embedding(with_depth, labels, genes_detected=genes, log_counts=counts, settings=FAST)
    clean = score_embedding(without, labels, genes_detected=genes, log_counts=counts, settings=FAST)
    assert hidden["pc1_corr_genes"] < 0.5 and hidden["label_pc1_corr_genes"] > 0.9  # PC1 follows the labels
    assert clean["label_pc1_corr_genes"] < 0.3


def test_batch_metrics_tell_mixed_from_separated_batches(pbmc_cells):
    labels = pbmc_cells.obs["cell_type"].astype(str).to_numpy()
    genes, counts = depth_covariates(pbmc_cells)
    batches = np.where(np.arange(len(labels)) % 2 == 0, "a", "b")
    mixed = one_hot_labels(labels, noise=0.3)
    separated = mixed + 10 * (batches == "a")[:, None]
    mixed_scores = score_embedding(mixed, labels, genes_detected=genes, log_counts=counts, batches=batches, settings=FAST)
    separated_scores = score_embedding(separated, labels, genes_detected=genes, log_counts=counts, batches=batches,
                                       settings=FAST)
    assert mixed_scores["batch_ilisi"] > 0.8 and separated_scores["batch_ilisi"] < 0.05
    assert mixed_scores["batch_knn_accuracy"] < 0.65 and separated_scores["batch_knn_accuracy"] > 0.95
    assert mixed_scores["transfer_f1"] > 0.9  # labels carry over from one batch to the other


def test_score_embedding_refuses_mismatched_or_broken_input(pbmc_cells):
    labels = pbmc_cells.obs["cell_type"].astype(str).to_numpy()
    genes, counts = depth_covariates(pbmc_cells)
    with pytest.raises(ValueError, match="same cells"):
        score_embedding(np.zeros((5, 2)), labels, genes_detected=genes, log_counts=counts)
    broken = np.ones((len(labels), 2))
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        score_embedding(broken, labels, genes_detected=genes, log_counts=counts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained masked-expression model on the default vocabulary, its prior a random matrix."""
    folder = tmp_path_factory.mktemp("evaluation") / "model"
    tokenizer = ScGeneTokenizer(max_length=128)
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, expression_encoding="binned", pooling="mean")
    torch.manual_seed(0)
    model = ScGeneForMaskedExpression(config)
    prior = torch.randn(tokenizer.vocab_size, 32)
    prior[:3] = 0
    model.set_gene_prior(prior)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_scores_model_and_baselines_on_the_same_cells(checkpoint):
    cells = ad.read_h5ad(DATA / "cellbench_120cells_ensembl_subset.h5ad")
    before = cells.copy()
    report = scgene.evaluate(cells, checkpoint, label_key="cell_line", batch_key="batch", settings=FAST, progress=False)
    assert list(report.table.index) == ["ScGene", "ScGene untrained", "prior only", "PCA (50 PCs of log1p HVGs)",
                                        "expression (logistic regression on log1p HVGs)"]
    assert report.info["n_cells"] == 120 and report.info["n_labels"] == 5 and report.info["n_batches"] == 5
    # the checkpoint is untrained, so its row and the freshly initialised copy agree only if the seed matched; both
    # are real embeddings of the same cells, and the five cell lines are easy for PCA
    assert report.table.loc["PCA (50 PCs of log1p HVGs)", "knn_f1"] > 0.9
    assert report.table.loc["ScGene", ["knn_f1", "kmeans_ari", "transfer_f1", "batch_ilisi"]].notna().all()
    assert report.table.loc["expression (logistic regression on log1p HVGs)", "logreg_f1"] > 0.9
    assert {check[0] for check in report.target_checks()} >= {"kNN macro-F1 >= PCA - 0.02", "|corr(PC1, genes detected)| < 0.3"}
    assert "| ScGene |" in report.to_markdown() and "Targets:" in report.to_markdown()
    assert (cells.obs.equals(before.obs) and cells.obsm.keys() == before.obsm.keys()
            and (cells.X != before.X).nnz == 0)  # the input is not modified


def test_evaluate_reads_the_layer_for_the_model_and_every_baseline(checkpoint):
    """Counts in layers['counts'] under a log-normalised X: with layer='counts' every row scores as on the counts."""
    import scanpy as sc

    counts = ad.read_h5ad(DATA / "cellbench_120cells_ensembl_subset.h5ad")
    logged = counts.copy()
    logged.layers["counts"] = counts.X.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    options = {"label_key": "cell_line", "baselines": ("prior", "pca"), "settings": FAST, "progress": False}
    from_layer = scgene.evaluate(logged, checkpoint, layer="counts", **options).table
    pd.testing.assert_frame_equal(from_layer, scgene.evaluate(counts, checkpoint, **options).table)


def test_evaluate_command_writes_json_and_markdown(checkpoint, tmp_path, capsys):
    path = tmp_path / "pbmc.h5ad"
    ad.read_h5ad(DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")[:300].copy().write_h5ad(path)
    code = main(["evaluate", str(path), "--model", str(checkpoint), "--label-key", "cell_type",
                 "--baselines", "pca", "--json", str(tmp_path / "scores.json"), "--markdown", str(tmp_path / "scores.md")])
    assert code == 0
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert set(saved["scores"]) == {"ScGene", "PCA (50 PCs of log1p HVGs)"}
    assert 0 <= saved["scores"]["ScGene"]["knn_f1"] <= 1 and saved["scores"]["ScGene"]["transfer_f1"] is None
    assert saved["info"]["n_cells"] < 300  # labels with fewer than 5 cells are left out
    assert "| PCA (50 PCs of log1p HVGs) |" in (tmp_path / "scores.md").read_text()
    assert "| ScGene |" in capsys.readouterr().out
    # --pooling-layer is passed to the model (the untrained copy follows its config); this one has a single layer
    assert main(["evaluate", str(path), "--model", str(checkpoint), "--label-key", "cell_type", "--baselines",
                 "untrained", "--pooling-layer", "-1", "--json", str(tmp_path / "layer.json")]) == 0
    layer = json.loads((tmp_path / "layer.json").read_text())["scores"]
    assert layer["ScGene"]["knn_f1"] == saved["scores"]["ScGene"]["knn_f1"] and "ScGene untrained" in layer
    capsys.readouterr()
    assert main(["evaluate", str(path), "--model", str(checkpoint), "--label-key", "cell_type", "--pooling-layer", "-2"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the reports (labels left out, coverage)
    assert error.startswith("scgene evaluate: error: --pooling-layer must be an integer from -1")


def test_evaluate_command_names_a_missing_label_column(checkpoint, tmp_path, capsys):
    path = tmp_path / "pbmc.h5ad"
    ad.read_h5ad(DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")[:50].copy().write_h5ad(path)
    assert main(["evaluate", str(path), "--model", str(checkpoint), "--label-key", "celltype"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("scgene evaluate: error:") and "'celltype' is not an obs column" in error and "cell_type" in error


def test_evaluate_can_read_only_the_genes_pca_reads(checkpoint):
    """genes="hvg": the model, the untrained copy and the prior read the HVGs the PCA baseline reads, and nothing
    else; the same as passing those genes by name."""
    from scgene.evaluation import highly_variable_genes

    cells = ad.read_h5ad(DATA / "cellbench_120cells_ensembl_subset.h5ad")
    settings = EvaluationSettings(n_folds=3, n_top_genes=300)
    options = {"label_key": "cell_line", "baselines": ("prior", "pca"), "settings": settings, "progress": False}
    hvg = scgene.evaluate(cells, checkpoint, genes="hvg", **options)
    genes = highly_variable_genes(cells, settings)
    assert len(genes) == 300 and set(genes) <= set(cells.var_names)
    by_name = scgene.evaluate(cells, checkpoint, genes=genes, **options).table
    pd.testing.assert_frame_equal(hvg.table, by_name)
    every_gene = scgene.evaluate(cells, checkpoint, **options).table
    assert not np.allclose(hvg.table.loc["ScGene", "silhouette"], every_gene.loc["ScGene", "silhouette"])
    pd.testing.assert_series_equal(hvg.table.iloc[-1], every_gene.iloc[-1])  # PCA is the same in both
    assert hvg.info["tokenize_kwargs"] == {"genes": "hvg"}
    with pytest.raises(ValueError, match="pass 'hvg'"):
        scgene.evaluate(cells, checkpoint, genes="highly_variable", **options)


def test_evaluate_command_reads_the_genes_asked_for(checkpoint, tmp_path):
    """`scgene evaluate --genes hvg` gives the table of `scgene.evaluate(genes="hvg")`; --genes FILE reads the names."""
    cells = ad.read_h5ad(DATA / "cellbench_120cells_ensembl_subset.h5ad")
    path, listed = tmp_path / "cells.h5ad", tmp_path / "genes.txt"
    cells.write_h5ad(path)
    listed.write_text("\n".join(cells.var_names[:500]))
    for option, genes in (("hvg", "hvg"), (str(listed), list(cells.var_names[:500]))):
        scores = tmp_path / "scores.json"
        assert main(["evaluate", str(path), "--model", str(checkpoint), "--label-key", "cell_line", "--baselines",
                     "prior", "--json", str(scores), "--genes", option]) == 0
        expected = scgene.evaluate(cells, checkpoint, label_key="cell_line", baselines=("prior",), genes=genes,
                                   progress=False).table
        saved = json.loads(scores.read_text())["scores"]
        for row in expected.index:
            assert saved[row]["knn_f1"] == pytest.approx(expected.loc[row, "knn_f1"]), (option, row)
            assert saved[row]["silhouette"] == pytest.approx(expected.loc[row, "silhouette"]), (option, row)


def test_depth_metrics_can_read_the_cells_before_thinning(pbmc_cells):
    """depth_reference: the depth metrics use the genes detected of the cells before thinning, every other metric
    the cells read; a reference of other cells is refused."""
    import scanpy as sc

    from scgene.evaluation import depth_scores, log1p_hvg_expression, pca_embedding, within_label_depth

    cells = pbmc_cells[:300].copy()
    thinned = sc.pp.downsample_counts(cells, counts_per_cell=500, random_state=0, copy=True)
    options = {"label_key": "cell_type", "baselines": ("pca",), "settings": FAST, "progress": False}
    plain = scgene.evaluate(thinned, None, **options).table
    own_depth = scgene.evaluate(thinned, None, depth_reference=cells, **options).table
    depth_columns = ["pc1_corr_genes", "pc1_corr_counts", "label_pc1_corr_genes"]
    pd.testing.assert_frame_equal(own_depth.drop(columns=depth_columns), plain.drop(columns=depth_columns))
    genes_detected, log_counts = depth_covariates(cells)
    pca = pca_embedding(log1p_hvg_expression(thinned, FAST), FAST).astype(np.float64)
    row = own_depth.loc["PCA (50 PCs of log1p HVGs)"]
    assert row["pc1_corr_genes"] == pytest.approx(depth_scores(pca, genes_detected, log_counts)["pc1_corr_genes"])
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    assert row["label_pc1_corr_genes"] == pytest.approx(within_label_depth(pca, labels, genes_detected))
    assert row["label_pc1_corr_genes"] != pytest.approx(plain.loc["PCA (50 PCs of log1p HVGs)", "label_pc1_corr_genes"])
    with pytest.raises(ValueError, match="same cells"):
        scgene.evaluate(thinned, None, depth_reference=cells[::-1], **options)
