"""`scgene.perturb`, `scgene perturb`, the screen benchmark (`scgene.perturbation_benchmark`) and
`scgene evaluate-perturbation`."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scgene
from modeling_helpers import tiny_pretrained
from scgene import ScGeneForMaskedExpression, ScGeneTokenizer
from scgene.cli import main
from scgene.perturbation_benchmark import (
    METHODS,
    additive_changes,
    annotation_similarity,
    borrowing_weights,
    clipped_cosine,
    direction_accuracy,
    effect_pvalue,
    evaluate_perturbation,
    linear_changes,
    pearson_delta,
)
from scgene.prior.knowledge import knowledge_from_frame
from scgene.screen_prediction import predict_from_screen

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny masked-expression checkpoint on the default vocabulary, its tokenizer saved with short cells."""
    folder = tmp_path_factory.mktemp("perturbation") / "model"
    tokenizer = ScGeneTokenizer(max_length=MAX_LENGTH)
    tiny_pretrained(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PBMC)[:40].copy()


def expressed_gene(adata, rank: int = 0) -> str:
    """The gene expressed in the most cells (or the rank-th most)."""
    detected = np.asarray((adata.X > 0).sum(0)).ravel()
    return str(adata.var_names[np.argsort(-detected, kind="stable")[rank]])


def test_scaling_by_one_changes_nothing_and_deleting_changes_something(checkpoint, cells):
    """The perturbed copy and its reference share masks and context: a no-op perturbation predicts exactly no change."""
    gene = expressed_gene(cells)
    same = scgene.perturb(cells, checkpoint, gene, mode="scale", value=1.0, key_added=None, progress=False)
    assert same.shifts.loc[gene, "cells"] > 0
    assert np.nanmax(np.abs(same.changes.to_numpy())) < 1e-7
    assert same.shifts.loc[gene, "cosine_shift"] < 1e-7
    deleted = scgene.perturb(cells, checkpoint, gene, key_added=None, progress=False)
    assert np.nanmax(np.abs(deleted.changes.to_numpy())) > 1e-5  # an untrained head moves little, but it moves
    assert deleted.shifts.loc[gene, "cosine_shift"] > 1e-5
    assert np.isnan(deleted.changes.loc[gene, gene])  # the deleted gene itself has no prediction


def test_deleting_a_gene_the_model_ignores_changes_nothing(checkpoint, cells):
    """With the attention values zeroed no token sees another: deleting a gene moves no other gene's prediction."""
    model = ScGeneForMaskedExpression.from_pretrained(checkpoint)
    with torch.no_grad():
        for layer in model.scgene.encoder.layers:
            layer.attention.v_proj.weight.zero_()
            layer.attention.v_proj.bias.zero_()
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    result = scgene.perturb(cells, model, expressed_gene(cells), tokenizer=tokenizer, key_added=None, progress=False)
    assert np.nanmax(np.abs(result.changes.to_numpy())) < 1e-7


def test_perturbed_cells_are_those_expressing_the_gene_and_results_do_not_depend_on_batching(checkpoint, cells):
    gene, other = expressed_gene(cells, 20), expressed_gene(cells, 5)
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    holding = int((tokenizer(cells, return_tensors="pt")["input_ids"] == tokenizer._lookup(gene)).any(1).sum())
    first = scgene.perturb(cells, checkpoint, [gene, f"{gene}+{other}"], key_added=None, progress=False)
    assert 0 < first.shifts.loc[gene, "cells"] == holding < cells.n_obs  # the cells holding its token
    second = scgene.perturb(cells, checkpoint, [gene, f"{gene}+{other}"], key_added=None, progress=False,
                            max_tokens_per_batch=97)
    pd.testing.assert_frame_equal(first.changes, second.changes, atol=1e-5)
    pd.testing.assert_frame_equal(first.shifts, second.shifts, atol=1e-6)
    overexpressed = scgene.perturb(cells, checkpoint, gene, mode="overexpress", key_added=None, progress=False)
    assert overexpressed.shifts.loc[gene, "cells"] == cells.n_obs  # a gene a cell lacks is added


def test_knockout_deletes_where_the_gene_is_expressed_and_elsewhere_reverses_adding_it(checkpoint, cells):
    """Where a cell expresses the gene, knockout is delete. Elsewhere, and for a gene the file does not measure, it is
    the cell with the gene (at value=, or at the level the model predicts for it there) against the cell without it:
    set, with the sign turned."""
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    gene = expressed_gene(cells, 20)
    holding = (tokenizer(cells, return_tensors="pt")["input_ids"] == tokenizer._lookup(gene)).any(1).numpy()
    knocked = scgene.perturb(cells, checkpoint, gene, mode="knockout", key_added=None, progress=False)
    deleted = scgene.perturb(cells, checkpoint, gene, key_added=None, progress=False)
    assert knocked.shifts.loc[gene, "cells"] == cells.n_obs > holding.sum() > 0
    size = np.nanmax(np.abs(deleted.cell_changes))
    np.testing.assert_allclose(knocked.cell_changes[holding], deleted.cell_changes[holding], atol=1e-3 * size)
    np.testing.assert_allclose(knocked.cell_shifts[holding], deleted.cell_shifts[holding], atol=1e-3 * size)
    assert np.nanmax(np.abs(knocked.cell_changes[~holding])) > 1e-3 * size  # where it was added, it still moves

    absent = "TCF7"
    assert absent not in cells.var_names and tokenizer._lookup(absent) is not None
    knocked = scgene.perturb(cells, checkpoint, absent, mode="knockout", value=1.5, key_added=None, progress=False)
    added = scgene.perturb(cells, checkpoint, absent, mode="set", value=1.5, key_added=None, progress=False)
    size = np.nanmax(np.abs(added.cell_changes))
    assert size > 1e-6
    np.testing.assert_allclose(knocked.cell_changes, -added.cell_changes, atol=1e-3 * size)

    # by default the gene is added at the value head's prediction for it in the cell
    model = ScGeneForMaskedExpression.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        model.value_head.bias += 2.0  # a clearly positive prediction, which `set` accepts as a value
    cell = cells[:1]
    inputs = tokenizer(cell, return_tensors="pt")
    appended = {"input_ids": tokenizer._lookup(absent), "expression_values": model.config.mask_value,
                "expression_bins": model.config.n_bins, "attention_mask": 1}
    inputs = {name: torch.cat([tensor, torch.full((1, 1), appended[name], dtype=tensor.dtype)], 1)
              for name, tensor in inputs.items()}
    with torch.no_grad():
        predicted = float(model(**inputs).predicted_values[0, -1])
    knocked = scgene.perturb(cell, model, absent, mode="knockout", tokenizer=tokenizer, key_added=None, progress=False)
    added = scgene.perturb(cell, model, absent, mode="set", value=predicted, tokenizer=tokenizer, key_added=None,
                           progress=False)
    size = np.nanmax(np.abs(added.cell_changes))
    np.testing.assert_allclose(knocked.cell_changes, -added.cell_changes, atol=1e-3 * size)
    other = scgene.perturb(cell, model, absent, mode="set", value=predicted + 1, tokenizer=tokenizer, key_added=None,
                           progress=False)
    assert np.nanmax(np.abs(other.cell_changes - added.cell_changes)) > 1e-2 * size  # the value matters


def test_one_perturbation_writes_layers_obs_and_uns_and_a_goal_gets_tested(checkpoint, cells, tmp_path):
    adata = cells.copy()
    gene = expressed_gene(adata)
    scgene.perturb(adata, checkpoint, gene, progress=False)
    layer = adata.layers["scgene_perturbation"]
    assert layer.shape == adata.shape and np.isfinite(layer).any()
    assert np.isnan(layer[:, list(adata.var_names).index(gene)]).all()
    assert adata.obs["scgene_perturbation_shift"].notna().sum() == adata.uns["scgene_perturbation"]["shifts"]["cells"][0]
    adata.write_h5ad(tmp_path / "perturbed.h5ad")
    assert "scgene_perturbation" in ad.read_h5ad(tmp_path / "perturbed.h5ad").uns
    start, goal = adata.obs["cell_type"].value_counts().index[:2]
    result = scgene.perturb(adata, checkpoint, [expressed_gene(adata, i) for i in range(4)], state_key="cell_type",
                            start_state=start, goal_state=goal, expression=False, key_added=None, progress=False)
    assert result.changes is None and set(result.shifts.columns) >= {"shift_to_goal", "goal_pval", "goal_fdr"}
    assert (result.shifts["cells"] <= (adata.obs["cell_type"] == start).sum()).all()
    assert result.shifts["goal_pval"].between(0, 1).all() and (result.shifts["goal_fdr"] >= result.shifts["goal_pval"]).all()


def test_perturb_refuses_what_it_cannot_do(checkpoint, cells):
    gene = expressed_gene(cells)
    for kwargs, message in (
        ({"genes": gene, "mode": "set"}, "needs value"),
        ({"genes": gene, "mode": "knockout", "value": 0}, "needs value= > 0"),
        ({"genes": gene, "mode": "knockdown"}, "mode must be one of"),
        ({"genes": "NOT_A_GENE_XYZ"}, "not in the model's vocabulary"),
        ({"genes": gene, "groupby": "cell_type", "groups": ["no such type"]}, "are not in obs"),
        ({"genes": gene, "state_key": "cell_type", "start_state": "B"}, "needs state_key, start_state and goal_state"),
        ({"genes": "all", "max_memory_gb": 1e-6}, "need"),
    ):
        with pytest.raises(ValueError, match=message):
            scgene.perturb(cells, checkpoint, key_added=None, progress=False, **kwargs)
    encoder_only = scgene.ScGeneModel.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="masked-expression head"):
        scgene.perturb(cells, encoder_only, gene, tokenizer=ScGeneTokenizer.from_pretrained(checkpoint), progress=False)
    with pytest.raises(ValueError, match="or value= "):  # knockout needs the head to predict the level it adds
        scgene.perturb(cells, encoder_only, gene, mode="knockout", expression=False,
                       tokenizer=ScGeneTokenizer.from_pretrained(checkpoint), progress=False)
    shifts_only = scgene.perturb(cells, encoder_only, gene, mode="knockout", value=1.0, expression=False,
                                 tokenizer=ScGeneTokenizer.from_pretrained(checkpoint), key_added=None, progress=False)
    assert shifts_only.shifts.loc[gene, "cells"] == cells.n_obs


def test_pseudobulk_changes_and_their_specific_part(checkpoint, cells):
    genes = [expressed_gene(cells, rank) for rank in (0, 5, 40)]
    result = scgene.perturb(cells, checkpoint, genes, key_added=None, progress=False)
    bulk = result.pseudobulk_changes()
    perturbed = result.shifts["cells"].to_numpy()[:, None]
    expected = np.nan_to_num(result.changes.to_numpy() * result.counts.to_numpy() / perturbed)
    np.testing.assert_allclose(bulk.to_numpy(), expected)
    assert (perturbed > result.counts.to_numpy()).any()  # genes some perturbed cells do not express are diluted
    specific = result.pseudobulk_changes(specific=True)
    others = bulk.drop(index=genes[0]).mean()
    np.testing.assert_allclose(specific.loc[genes[0]], bulk.loc[genes[0]] - others, atol=1e-12)
    np.testing.assert_allclose(specific.sum(), 0, atol=1e-9)  # what all perturbations share is gone
    with pytest.raises(ValueError, match="two or more"):
        scgene.perturb(cells, checkpoint, genes[0], key_added=None, progress=False).pseudobulk_changes(specific=True)


def test_metrics_and_the_linear_baseline():
    observed = np.array([3.0, -2.0, 1.0, 0.1])
    assert direction_accuracy(np.array([1.0, -1.0, -1.0, 0.0]), observed, 3) == pytest.approx(2 / 3)
    assert direction_accuracy(np.zeros(4), observed, 3) == 0.0  # no change has no direction
    assert np.isnan(pearson_delta(np.zeros(4), observed))
    assert pearson_delta(2 * observed, observed) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 4, 500)
    expression = np.stack([target, 2 * target + rng.normal(0, 0.01, 500), rng.normal(0, 1, 500)], axis=1)
    predicted = linear_changes(expression, np.arange(500), ["T", "T+missing", "missing"], np.array(["T", "A", "B"]),
                               "delete")
    assert predicted[0, 1] == pytest.approx(-2 * target.mean(), rel=0.01)
    assert abs(predicted[0, 2]) < 0.1
    np.testing.assert_allclose(predicted[1], predicted[0])  # an unmeasured gene adds nothing
    assert np.isnan(predicted[2]).all()  # and alone it gives no prediction


def test_the_go_weighted_and_additive_baselines():
    changes = np.array([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [3.0, 3.0]])
    summed = additive_changes(changes, ["A", "B", "A+B", "A+C"])
    np.testing.assert_allclose(summed[2], [1.0, 2.0])  # A's change plus B's
    assert np.isnan(summed[[0, 1, 3]]).all()  # singles, and a pair whose single C the screen lacks
    knowledge = knowledge_from_frame(pd.DataFrame({
        "gene": ["JAK2", "IFNGR1", "TCF7", "CD74"], "ensembl_id": ["ENSG00000096968", "", "", ""],
        "type:protein_coding": [1, 1, 1, 1],
        "GO:0060333 interferon-gamma signaling": [1, 1, 0, 0], "HALLMARK_X": [1, 0, 0, 1]}))
    similarity = annotation_similarity(["JAK2", "IFNGR1", "TCF7", "CD74", "IFNGR1+TCF7", "NOT_A_GENE"],
                                       ScGeneTokenizer(), knowledge)
    assert similarity[0, 1] == pytest.approx(1 / np.sqrt(2)) and similarity[0, 3] == pytest.approx(1 / np.sqrt(2))
    assert similarity[1, 3] == 0  # only the gene type in common, which does not count
    assert (similarity[2] == 0).all() and (similarity[5] == 0).all()  # no GO or hallmark annotation
    assert similarity[4, 1] == pytest.approx(1.0)  # a pair's annotations are its genes' together
    predicted = np.array([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0], [0.0, 0.0]])  # e.g. ScGene's specific predictions
    np.testing.assert_allclose(clipped_cosine(predicted), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    screened = ["A", "B", "C", "A+B"]
    weights = borrowing_weights(np.array([[0.0, 3.0, 1.0, 9.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]]),
                                ["A", "D", "A+C"], screened)
    np.testing.assert_allclose(weights[0], [0, 0.75, 0.25, 0])  # A itself and A+B share a gene with A: not borrowed
    np.testing.assert_allclose(weights[1], [0.25, 0.25, 0.25, 0.25])  # nothing alike: the plain mean
    np.testing.assert_allclose(weights[2], [0, 1, 0, 0])
    assert (borrowing_weights(np.ones((1, 1)), ["A"], ["A"]) == 0).all()  # no other target: no prediction


def test_the_go_weighted_mean_follows_the_target_annotated_alike(checkpoint):
    """Two targets annotated alike raise the same genes, two others other genes: for each target, the GO-weighted mean
    of the other perturbations is its look-alike's change, which the plain mean dilutes."""
    screen = planted_screen()
    targets = ["JAK2", "IFNGR1", "TCF7", "LEF1"]
    knowledge = knowledge_from_frame(pd.DataFrame({"gene": targets, "GO:1 interferon": [1, 1, 0, 0],
                                                   "GO:2 T cell": [0, 0, 1, 1]}))
    report = evaluate_perturbation(screen, checkpoint, screen="knockout", max_control_cells=10,
                                   effect_permutations=9, knowledge=knowledge)
    delta = report.table.pivot(index="target", columns="method", values="pearson_delta")
    assert (delta["mean of other perturbations, GO-weighted"] > 0.7).all()  # the rest is the noise of 80 cells
    assert (delta["mean of other perturbations, GO-weighted"] > delta["mean of other perturbations"] + 0.3).all()
    assert report.summary().loc["additive", "targets_scored"] == 0  # no combination to add up
    assert delta["scgene, nearest perturbations"].notna().all()


def planted_screen() -> ad.AnnData:
    """400 PBMC cells labelled control or one of four targets: JAK2 and IFNGR1 raise genes 0-9, TCF7 and LEF1 genes
    10-19 (20 counts each)."""
    screen = ad.read_h5ad(PBMC)[:400].copy()
    targets = ["JAK2", "IFNGR1", "TCF7", "LEF1"]
    labels = np.random.default_rng(0).permutation(["control"] * 80 + targets * 80)
    screen.obs["perturbation"] = labels
    counts = sp.csr_matrix(screen.X, dtype=np.float32).toarray()
    for pair, genes in ((targets[:2], slice(0, 10)), (targets[2:], slice(10, 20))):
        counts[np.isin(labels, pair), genes] += 20
    screen.X = sp.csr_matrix(counts)
    return screen


def test_predicting_from_a_screen_borrows_from_the_targets_annotated_alike(checkpoint):
    screen = planted_screen()
    before = screen.copy()
    knowledge = knowledge_from_frame(pd.DataFrame({"gene": ["JAK2", "IFNGR1", "TCF7", "LEF1", "STAT1"],
                                                   "GO:1 interferon": [1, 1, 0, 0, 1], "GO:2 T cell": [0, 0, 1, 1, 0]}))
    prediction = predict_from_screen(screen, ["STAT1", "JAK2", "CD3E"], checkpoint, screen="knockout",
                                     similarity="annotations", knowledge=knowledge, progress=False)
    weights = prediction.weights[["JAK2", "IFNGR1", "TCF7", "LEF1"]]
    np.testing.assert_allclose(weights.loc["STAT1"], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(weights.loc["JAK2"], [0, 1, 0, 0])  # itself left out: predicted from the others
    np.testing.assert_allclose(weights.loc["CD3E"], [0.25] * 4)  # annotated like none of them: the plain mean
    assert prediction.settings["plain_mean"] == ["CD3E"]
    planted = prediction.changes.columns.isin(screen.var_names[:10])  # the changes' columns: the measured genes
    other_pair = prediction.changes.columns.isin(screen.var_names[10:20])
    assert np.corrcoef(prediction.changes.loc["STAT1"], planted)[0, 1] > 0.8  # the rest: normalisation and noise
    assert np.corrcoef(prediction.changes.loc["STAT1"], other_pair)[0, 1] < 0
    observed = prediction.observed
    assert (observed.loc[["JAK2", "IFNGR1"], planted] > 1).all().all()  # log1p change of 20 added counts
    np.testing.assert_allclose(prediction.changes.loc["JAK2"], observed.loc["IFNGR1"])
    assert pearson_delta(prediction.changes.loc["JAK2"].to_numpy(), observed.loc["JAK2"].to_numpy()) > 0.9
    nearest = prediction.nearest(1)
    assert nearest.set_index("perturbation").loc["JAK2", "screened_target"] == "IFNGR1" and len(nearest) == 3
    assert (screen.X != before.X).nnz == 0 and screen.obs.equals(before.obs)  # the screen is read, not changed


def test_predicting_from_a_screen_with_scgene_weighs_by_its_specific_predictions(checkpoint):
    screen = planted_screen()[:100].copy()
    control = screen[screen.obs["perturbation"] == "control"].copy()
    prediction = predict_from_screen(screen, ["STAT1", "JAK2+IRF1"], checkpoint, screen="knockout",
                                     max_control_cells=len(control), progress=False)
    weights = prediction.weights
    np.testing.assert_allclose(weights.sum(1), 1)
    assert weights.loc["JAK2+IRF1", "JAK2"] == 0  # shares a gene
    np.testing.assert_allclose(prediction.changes.to_numpy(), weights.to_numpy() @ prediction.observed.to_numpy())
    together = ["STAT1", "JAK2+IRF1", "IFNGR1", "JAK2", "LEF1", "TCF7"]  # the same run, made with the public API
    specific = scgene.perturb(control, checkpoint, together, mode="knockout", key_added=None,
                              progress=False).pseudobulk_changes(specific=True)
    alike = clipped_cosine(specific.to_numpy())[0, 2:]
    np.testing.assert_allclose(weights.loc["STAT1", together[2:]], alike / alike.sum(), atol=1e-6)
    assert prediction.settings["similarity"] == "scgene" and prediction.settings["control_cells"] == len(control)
    with pytest.raises(ValueError, match="screen must be one of"):
        predict_from_screen(screen, "STAT1", checkpoint, screen="rnai")
    with pytest.raises(ValueError, match="similarity must be one of"):
        predict_from_screen(screen, "STAT1", checkpoint, screen="knockout", similarity="go")
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        predict_from_screen(screen, "NOT_A_GENE", checkpoint, screen="knockout")
    with pytest.raises(ValueError, match="only 'control' cells"):
        predict_from_screen(control, "STAT1", checkpoint, screen="knockout")


def small_screen(cells) -> ad.AnnData:
    screen = cells.copy()
    first, second = expressed_gene(cells), expressed_gene(cells, 3)
    screen.obs["perturbation"] = np.array(["control", first, second, f"{first}+{second}"])[np.arange(cells.n_obs) % 4]
    return screen


def test_evaluate_perturbation_scores_every_method_on_every_target(checkpoint, cells):
    screen = small_screen(cells)
    report = evaluate_perturbation(screen, checkpoint, screen="knockout", max_control_cells=10)
    assert set(report.table["method"]) == set(METHODS)
    assert len(report.table) == len(METHODS) * 3 and report.table["target_measured"].all()
    assert report.table.loc[report.table["method"] == "no change", "direction_accuracy"].eq(0).all()
    assert report.settings["control_cells_seen"] == 5  # half of the 10 control cells: the other half is the truth's
    additive = report.table[report.table["method"] == "additive"].set_index("target")["pearson_delta"]
    assert additive.notna().sum() == 1 and np.isfinite(additive[screen.obs["perturbation"].iloc[3]])  # the pair
    assert "| scgene |" in report.to_markdown()
    unmeasured = screen.copy()  # a knockout of a gene the file does not measure: the model can still score it
    unmeasured.obs["perturbation"] = unmeasured.obs["perturbation"].replace({expressed_gene(cells, 3): "TCF7"})
    report = evaluate_perturbation(unmeasured, checkpoint, screen="knockout", max_control_cells=10)
    rows = report.table[report.table["target"] == "TCF7"].set_index("method")
    assert not rows["target_measured"].any() and (rows["model_cells_perturbed"] == 5).all()
    assert np.isfinite(rows.loc["scgene", "pearson_delta"])
    assert rows.loc["linear co-expression", ["pearson_delta", "direction_accuracy"]].isna().all()  # cannot predict it
    summary = report.summary()
    assert summary.loc["linear co-expression", "targets_scored"] == 2 < summary.loc["scgene", "targets_scored"] == 3
    with pytest.raises(ValueError, match="screen must be one of"):
        evaluate_perturbation(screen, checkpoint, screen="rnai")
    with pytest.raises(ValueError, match="to score a screen"):
        evaluate_perturbation(screen, checkpoint, screen="knockout", mode="set")
    with pytest.raises(ValueError, match="No 'nontargeting' cells"):
        evaluate_perturbation(screen, checkpoint, screen="knockout", control="nontargeting")


def test_the_truth_keeps_its_own_control_cells(checkpoint):
    """Targets with no effect (cells labelled at random): scored against control cells it shares with the truth, the
    mean of the other perturbations 'predicts' the noise of their mean; against the seen half, it cannot."""
    screen = ad.read_h5ad(PBMC)[:660].copy()
    targets = [expressed_gene(screen, rank) for rank in range(3)]
    screen.obs["perturbation"] = np.random.default_rng(0).permutation(["control"] * 60 + targets * 200)
    report = evaluate_perturbation(screen, checkpoint, screen="knockout", max_control_cells=10)
    assert report.settings["control_cells_reference"] == 30 and report.settings["control_cells_seen"] == 10
    mean_delta = report.table.groupby("method")["pearson_delta"].mean()
    assert mean_delta["mean of other perturbations, truth's control"] > 0.5
    assert abs(mean_delta["mean of other perturbations"]) < 0.3
    assert report.table["replicate_pearson_delta"].abs().max() < 0.3  # a random label has no reproducible effect
    assert report.table["effect_fdr"].min() > 0.05 and report.summary(measurable=True).empty  # nor a measurable one


def test_the_effect_test_finds_a_real_difference_and_no_invented_one():
    """B cells against monocytes differ (the smallest p-value 999 permutations give); two random halves of the
    monocytes do not; only the scored genes count."""
    adata = ad.read_h5ad(PBMC)
    expression = np.log1p(sp.csr_matrix(adata.X, dtype=np.float64).toarray())
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    b_cells, monocytes = np.flatnonzero(labels == "B")[:100], np.flatnonzero(labels == "CD14+ Mono")[:200]
    every_gene = np.ones(adata.n_vars, bool)
    rng = np.random.default_rng(0)
    assert effect_pvalue(expression, b_cells, monocytes, every_gene, 999, rng) == pytest.approx(1 / 1000)
    halves = [effect_pvalue(expression, half[:100], half[100:], every_gene, 999, rng)
              for half in (rng.permutation(monocytes) for _ in range(5))]
    assert min(halves) > 0.05
    planted = expression.copy()
    planted[monocytes[:100], 0] += 5  # a change in one gene only
    assert effect_pvalue(planted, monocytes[:100], monocytes[100:], every_gene, 999, rng) == pytest.approx(1 / 1000)
    not_the_planted_gene = every_gene.copy()
    not_the_planted_gene[0] = False
    assert effect_pvalue(planted, monocytes[:100], monocytes[100:], not_the_planted_gene, 999, rng) > 0.05


def test_perturb_and_evaluate_commands(checkpoint, cells, tmp_path, capsys):
    source = tmp_path / "cells.h5ad"
    cells.write_h5ad(source)
    gene = expressed_gene(cells)
    out, changes, plot = tmp_path / "shifts.tsv", tmp_path / "changes.tsv", tmp_path / "changes.png"
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", f"{gene},{gene}+CD74",
                 "--out", str(out), "--changes", str(changes), "--plot", str(plot)]) == 0
    shifts = pd.read_csv(out, sep="\t", index_col=0)
    assert list(shifts.index) == [gene, f"{gene}+CD74"] and plot.stat().st_size > 0
    assert set(pd.read_csv(changes, sep="\t")["perturbation"]) == {gene, f"{gene}+CD74"}
    before = out.read_bytes()
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", gene, "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before  # never replaced without --overwrite
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", gene, "--mode", "set",
                 "--out", str(tmp_path / "x.tsv")]) == 1
    assert "needs --value" in capsys.readouterr().err and not (tmp_path / "x.tsv").exists()
    read = tmp_path / "genes.txt"  # --genes: read only these (the tokenizer's genes=), apart from the --targets
    read.write_text("\n".join([gene, "CD74", *cells.var_names[:20]]))
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", "all", "--genes", str(read),
                 "--no-expression", "--adapt-steps", "2", "--out", str(tmp_path / "read.tsv")]) == 0
    perturbed = pd.read_csv(tmp_path / "read.tsv", sep="\t", index_col=0)
    assert gene in perturbed.index and set(perturbed.index) <= {gene, "CD74", *cells.var_names[:20]}
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", gene, "--adapt-learning-rate", "0",
                 "--out", str(tmp_path / "x.tsv")]) == 1
    assert "--adapt-learning-rate positive" in capsys.readouterr().err and not (tmp_path / "x.tsv").exists()
    assert main(["perturb", str(source), "--model", str(checkpoint), "--targets", "TCF7", "--mode", "knockout",
                 "--no-expression", "--out", str(tmp_path / "unmeasured.tsv")]) == 0  # not in the file: still knocked out
    assert pd.read_csv(tmp_path / "unmeasured.tsv", sep="\t", index_col=0).loc["TCF7", "cells"] == cells.n_obs
    screen = tmp_path / "screen.h5ad"
    small_screen(cells).write_h5ad(screen)
    assert main(["evaluate-perturbation", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--max-control-cells", "10", "--adapt-steps", "2", "--json", str(tmp_path / "report.json")]) == 0
    assert "| mean of other perturbations |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["table"]) == len(METHODS) * 3 and saved["settings"]["adapt_steps"] == 2
    assert saved["settings"]["mode"] == "knockout"
    assert main(["evaluate-perturbation", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--mode", "delete", "--max-control-cells", "10", "--json", str(tmp_path / "deleted.json")]) == 0
    assert json.loads((tmp_path / "deleted.json").read_text())["settings"]["mode"] == "delete"
    knowledge = tmp_path / "knowledge.csv"
    pd.DataFrame({"gene": [gene, "CD74"], "GO:1 shared": [1, 1]}).to_csv(knowledge, index=False)
    assert main(["evaluate-perturbation", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--max-control-cells", "10", "--knowledge", str(knowledge)]) == 0
    capsys.readouterr()
    assert main(["evaluate-perturbation", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--knowledge", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv" in capsys.readouterr().err
    assert main(["evaluate-perturbation", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--adapt-learning-rate", "0"]) == 1
    assert "--adapt-learning-rate positive" in capsys.readouterr().err
    changes, weights, plot = tmp_path / "predicted.tsv", tmp_path / "weights.tsv", tmp_path / "predicted.png"
    before = screen.read_bytes()
    assert main(["predict-from-screen", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--targets", "STAT1,JAK2+IRF1", "--max-control-cells", "10", "--out", str(changes),
                 "--weights", str(weights), "--plot", str(plot)]) == 0
    predicted = pd.read_csv(changes, sep="\t")
    assert list(predicted.columns) == ["perturbation", "gene", "change", "rank"] and plot.stat().st_size > 0
    rows = predicted.groupby("perturbation").size()
    assert set(rows.index) == {"STAT1", "JAK2+IRF1"} and rows.nunique() == 1 and predicted["change"].notna().all()
    assert (predicted.groupby("perturbation")["rank"].min() == 1).all()
    borrowed = pd.read_csv(weights, sep="\t").groupby("perturbation")["weight"].sum()
    np.testing.assert_allclose(borrowed, 1)
    assert screen.read_bytes() == before
    assert main(["predict-from-screen", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--targets", "STAT1", "--out", str(changes)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["predict-from-screen", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--targets", "STAT1", "--perturbation-key", "guide", "--out", str(tmp_path / "y.tsv")]) == 1
    assert "'guide' is not an obs column" in capsys.readouterr().err and not (tmp_path / "y.tsv").exists()
    pd.DataFrame({"symbol": ["STAT1"], "GO:1 shared": [1]}).to_csv(knowledge, index=False)
    assert main(["predict-from-screen", str(screen), "--model", str(checkpoint), "--screen", "knockout",
                 "--targets", "STAT1", "--similarity", "annotations", "--knowledge", str(knowledge),
                 "--out", str(tmp_path / "y.tsv")]) == 1
    error = capsys.readouterr().err
    assert "has no gene column 'gene'" in error and error.rstrip().endswith("Rename the gene column to 'gene'.")


def test_adapting_to_cells_trains_a_copy(checkpoint, cells):
    model = ScGeneForMaskedExpression.from_pretrained(checkpoint)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    adapted = scgene.adapt_to_cells(cells, model, steps=3, learning_rate=1e-3, batch_size=8,
                                    tokenizer=ScGeneTokenizer.from_pretrained(checkpoint), progress=False)
    assert not adapted.training and adapted is not model
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # the original stays
    changed = [name for name, tensor in adapted.state_dict().items() if not torch.equal(before[name], tensor)]
    assert changed and not any("gene_prior" in name for name in changed)  # trained, the frozen prior untouched
    result = scgene.perturb(cells, adapted, expressed_gene(cells), key_added=None, progress=False,
                            tokenizer=ScGeneTokenizer.from_pretrained(checkpoint))
    assert np.isfinite(result.changes.to_numpy()).any()
    with pytest.raises(ValueError, match="learning_rate positive"):
        scgene.adapt_to_cells(cells, model, learning_rate=0)


def test_overexpressing_a_types_markers_moves_cells_toward_it_more_than_matched_random_genes():
    """The readable check on the shipped checkpoint: B-cell markers overexpressed in monocytes move them toward the
    B cells' mean embedding more than each of 10 sets of random genes with matched mean expression."""
    adata = ad.read_h5ad(PBMC)
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    expression = np.log1p(np.asarray(sp.diags(1e4 / np.asarray(counts.sum(1)).ravel()) @ counts.toarray()))
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    tokenizer = ScGeneTokenizer()
    names = np.asarray(adata.var_names)
    known = np.array([tokenizer._lookup(name) is not None for name in names])
    difference = expression[labels == "B"].mean(0) - expression[labels != "B"].mean(0)
    markers = np.argsort(-np.where(known, difference, -np.inf))[:5]
    mean = expression.mean(0)
    decile = np.searchsorted(np.quantile(mean, np.linspace(0.1, 0.9, 9)), mean)
    rng = np.random.default_rng(0)
    sets = ["+".join(names[markers])] + [
        "+".join(names[[rng.choice(np.flatnonzero((decile == decile[m]) & known & (difference < 0.1))) for m in markers]])
        for _ in range(10)]
    cells = adata[np.flatnonzero(labels == "CD14+ Mono")[:40].tolist() + np.flatnonzero(labels == "B")[:60].tolist()]
    result = scgene.perturb(cells.copy(), None, sets, mode="overexpress", state_key="cell_type",
                            start_state="CD14+ Mono", goal_state="B", expression=False, key_added=None, progress=False)
    toward = result.shifts["shift_to_goal"]
    assert toward.iloc[0] > 0 and toward.iloc[0] > toward.iloc[1:].max()
