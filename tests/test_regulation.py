"""`scgene.regulation`, `scgene regulation`, the regulation benchmark (`scgene.regulation_benchmark`) and
`scgene evaluate-regulation`."""

import json
from collections import defaultdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scgene
from modeling_helpers import tiny_pretrained
from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneModel, ScGeneTokenizer
from scgene.cli import main
from scgene.regulation_benchmark import (
    EdgeSet,
    early_precision,
    evaluate_regulation,
    score_pairs,
    shuffled_target_edges,
    split_regulators,
)

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
MAX_LENGTH = 48


def tiny_dual_branch(vocab_size: int, **overrides) -> ScGeneForMaskedExpression:
    return tiny_pretrained(vocab_size, **({"encoder_type": "dual_branch", "regulation_init": 1.0} | overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny dual-branch checkpoint on the default vocabulary, its tokenizer saved with short cells."""
    folder = tmp_path_factory.mktemp("regulation") / "dual_branch"
    tokenizer = ScGeneTokenizer(max_length=MAX_LENGTH)
    tiny_dual_branch(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PBMC)[:60].copy()


def regulation_by_hand(folder, adata) -> dict:
    """(regulator id, target id) -> (mean weight, cells): one padded forward, R averaged over layers and heads per cell,
    then over the cells holding both genes, in plain Python."""
    model = ScGeneModel.from_pretrained(folder).eval()
    tokenizer = ScGeneTokenizer.from_pretrained(folder)
    batch = tokenizer(adata, return_tensors="pt")
    with torch.no_grad():
        regulation = torch.stack(model(**batch, output_regulation=True).regulation).mean(dim=(0, 2))  # (B, G, G)
    sums, counts = defaultdict(float), defaultdict(int)
    for cell in range(adata.n_obs):
        ids = batch["input_ids"][cell].tolist()
        real = [i for i, token in enumerate(ids) if token >= 3 and batch["attention_mask"][cell, i]]
        for target in real:
            for source in real:
                if ids[source] != ids[target]:
                    key = (ids[source], ids[target])
                    sums[key] += float(regulation[cell, target, source])
                    counts[key] += 1
    return {pair: (sums[pair] / counts[pair], counts[pair]) for pair in sums}  # keyed by vocabulary ids


def test_regulation_is_the_mean_signed_map_over_layers_heads_and_cells_whatever_the_batching(checkpoint, cells):
    expected = regulation_by_hand(checkpoint, cells)
    everything = 10_000
    network = scgene.regulation(cells.copy(), checkpoint, top_k=everything, min_cells=1, progress=False)
    assert list(network.columns) == ["source", "target", "weight", "abs_weight", "rank", "cells"]
    assert len(network) == len(expected)
    ids = ScGeneTokenizer.from_pretrained(checkpoint).convert_genes_to_ids  # the table names genes as adata does
    got = {(s, t): (w, c) for s, t, w, c in zip(ids(network["source"]), ids(network["target"]), network["weight"],
                                                 network["cells"])}
    for pair, (weight, count) in expected.items():
        assert got[pair][1] == count
        assert got[pair][0] == pytest.approx(weight, rel=1e-4, abs=1e-7)
    assert (network["weight"] > 0).any() and (network["weight"] < 0).any()  # signed
    small_batches = scgene.regulation(cells.copy(), checkpoint, top_k=everything, min_cells=1, progress=False,
                                      max_tokens_per_batch=2 * MAX_LENGTH)
    pd.testing.assert_frame_equal(small_batches, network, rtol=1e-5, atol=1e-8)


def test_top_k_min_cells_and_regulators_shape_the_table(checkpoint, cells):
    regulators = ["CD74", "HLA-DRA", "LYZ", "NOT_A_GENE"]
    network = scgene.regulation(cells.copy(), checkpoint, regulators=regulators, top_k=7, min_cells=4, progress=False)
    assert set(network["source"]) <= {"CD74", "HLA-DRA", "LYZ"} and len(set(network["source"])) == 3
    assert network.groupby("source").size().max() == 7
    assert (network["cells"] >= 4).all()
    for _, edges in network.groupby("source"):
        assert list(edges["rank"]) == list(range(1, len(edges) + 1))
        assert (np.diff(edges["abs_weight"].to_numpy()) <= 0).all()
    assert (network["source"] != network["target"]).all()


def test_regulation_writes_varp_and_per_group_tables_and_the_file_round_trips(checkpoint, cells, tmp_path):
    adata = cells.copy()
    network = scgene.regulation(adata, checkpoint, groupby="cell_type", top_k=5, min_cells=2, progress=False)
    assert network.columns[0] == "group" and set(network["group"]) <= set(adata.obs["cell_type"].astype(str))
    one_group = network["group"].iloc[0]
    alone = scgene.regulation(adata[adata.obs["cell_type"].astype(str) == one_group].copy(), checkpoint, top_k=5,
                              min_cells=2, progress=False)
    pd.testing.assert_frame_equal(network[network["group"] == one_group].drop(columns="group").reset_index(drop=True),
                                  alone, rtol=1e-5, atol=1e-8)
    matrix = adata.varp["scgene_regulation"]
    assert matrix.shape == (adata.n_vars, adata.n_vars) and matrix.nnz > 0
    overall = scgene.regulation(cells.copy(), checkpoint, top_k=5, min_cells=2, progress=False)
    row = list(adata.var_names).index(overall["source"].iloc[0])
    column = list(adata.var_names).index(overall["target"].iloc[0])
    assert matrix[row, column] == pytest.approx(overall["weight"].iloc[0], rel=1e-5)
    assert set(adata.uns["scgene_regulation"]["groups"]) == set(network["group"])
    adata.write_h5ad(tmp_path / "with_network.h5ad")
    back = ad.read_h5ad(tmp_path / "with_network.h5ad")
    assert back.varp["scgene_regulation"].nnz == matrix.nnz


def test_regulation_refuses_what_it_cannot_do(checkpoint, cells, tmp_path):
    standard = tmp_path / "standard"
    tokenizer = ScGeneTokenizer(max_length=MAX_LENGTH)
    tiny_dual_branch(tokenizer.vocab_size, encoder_type="standard").save_pretrained(standard)
    tokenizer.save_pretrained(standard)
    with pytest.raises(ValueError, match="dual_branch"):
        scgene.regulation(cells.copy(), standard, progress=False)
    with pytest.raises(ValueError, match="None of the regulators"):
        scgene.regulation(cells.copy(), checkpoint, regulators=["NOT_A_GENE"], progress=False)
    with pytest.raises(ValueError, match="regulators="):
        scgene.regulation(cells.copy(), checkpoint, max_memory_gb=1e-4, progress=False)
    with pytest.raises(KeyError, match="groupby"):
        scgene.regulation(cells.copy(), checkpoint, groupby="no_such_column", progress=False)


def test_the_shipped_reference_and_transcription_factors():
    reference = scgene.collectri()
    assert list(reference.columns) == ["source", "target", "weight"] and len(reference) == 43178
    assert set(np.unique(reference["weight"])) == {-1, 1}
    tfs = scgene.transcription_factors()
    assert len(tfs) == 1186 and {"STAT1", "SPI1", "MYC"} <= set(tfs)


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    names = [f"TF{i}" for i in range(11)]
    train, test = split_regulators(names, 0.4, seed=3)
    assert set(train) | set(test) == set(names) and not set(train) & set(test) and len(test) == 4
    assert split_regulators(names, 0.4, seed=3) == (train, test) and split_regulators(names, 0.4, seed=4) != (train, test)


def test_early_precision_shares_ties():
    scores = np.array([3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    labels = np.array([1, 0, 1, 1, 0, 0, 1])
    assert early_precision(scores, labels, 2) == 0.5
    assert early_precision(scores, labels, 4) == pytest.approx((1 + 0 + 2 * 0.5) / 4)  # 2 of 4 tied slots, half true


def test_scores_tell_a_perfect_network_from_a_reversed_one():
    signs = np.r_[np.ones(18), -np.ones(6)]  # 24 reference edges, 3 in 4 activating
    pairs = EdgeSet(np.zeros(24, int), np.arange(24), signs, np.ones(48, int), np.arange(24, 72))
    perfect = np.r_[signs * np.linspace(1, 0.5, 24), np.full(48, 0.1)]
    scores = score_pairs(perfect, pairs)
    assert scores["edge_auroc"] == 1 and scores["epr"] == pytest.approx(3.0) and scores["auprc_ratio"] == pytest.approx(3)
    assert scores["sign_balanced_accuracy"] == 1 and scores["sign_auroc"] == 1 and scores["majority_sign_accuracy"] == 0.75
    reversed_ = score_pairs(np.r_[-perfect[:24] * 0.01, np.full(48, 0.5)], pairs)
    assert reversed_["edge_auroc"] == 0 and reversed_["epr"] == 0 and reversed_["sign_balanced_accuracy"] == 0
    too_few = score_pairs(np.r_[perfect[:5], np.zeros(19), np.full(48, 0.1)], pairs)  # 5 edges scored: no sign metric
    assert np.isnan(too_few["sign_balanced_accuracy"]) and too_few["signed_edges_scored"] == pytest.approx(5 / 24)


def test_the_one_sign_per_tf_ceiling_reads_each_tfs_commoner_sign():
    """TF 0 activates 3 targets and represses 1, TF 1 represses 2: one sign per TF gets 5 of 6 edges right, and every
    repressing edge but one."""
    from scgene.regulation_benchmark import EdgeSet, per_regulator_sign_ceiling

    pairs = EdgeSet(np.array([0, 0, 0, 0, 1, 1]), np.arange(6), np.array([1, 1, 1, -1, -1, -1]), np.array([0]),
                    np.array([9]))
    ceiling = per_regulator_sign_ceiling(pairs)
    assert ceiling["sign_accuracy"] == pytest.approx(5 / 6)
    assert ceiling["sign_balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(ceiling["edge_auroc"])


def test_shuffled_target_null_keeps_the_held_out_sources_and_no_real_edge():
    edges = pd.DataFrame({"source": [0, 0, 0, 1, 1, 2, 2, 2], "target": [3, 4, 5, 3, 6, 4, 7, 8],
                          "sign": [1, 1, -1, 1, 1, 1, -1, 1]})
    pairs = shuffled_target_edges(edges, np.array([0, 2]), null_ratio=5, seed=0)
    assert set(pairs.positive_sources) == {0, 2} and len(pairs.signs) == 6
    real = set(zip(edges["source"], edges["target"]))
    negatives = list(zip(pairs.negative_sources, pairs.negative_targets))
    assert negatives and not real & set(negatives) and len(set(negatives)) == len(negatives)
    assert set(pairs.negative_sources) <= {0, 2} and set(pairs.negative_targets) <= {3, 4, 5, 7, 8}


def planted_reference(adata, n_sources=40, per_source=6, seed=0) -> pd.DataFrame:
    """A reference the data itself supports: each source's most correlated genes, signed by the correlation."""
    import scanpy as sc

    view = adata.copy()
    sc.pp.normalize_total(view, target_sum=1e4)
    sc.pp.log1p(view)
    expression = pd.DataFrame(view.X.toarray(), columns=view.var_names)
    expression = expression.loc[:, expression.std() > 0]
    correlation = expression.corr().to_numpy()
    np.fill_diagonal(correlation, 0)
    rng = np.random.default_rng(seed)
    rows = []
    for source in rng.choice(expression.shape[1], n_sources, replace=False):
        for target in np.argsort(-np.abs(correlation[source]))[:per_source]:
            rows.append((expression.columns[source], expression.columns[target], np.sign(correlation[source, target])))
    return pd.DataFrame(rows, columns=["source", "target", "weight"])


def test_the_benchmark_can_say_yes_and_no(checkpoint):
    adata = ad.read_h5ad(PBMC)[:400].copy()
    reference = planted_reference(adata)
    report = evaluate_regulation(adata, checkpoint, reference, baselines=("pearson", "prior"), max_cells=None)
    pearson, prior = report.table.loc["Pearson correlation"], report.table.loc["prior cosine"]
    assert pearson["edge_auroc"] > 0.95 and pearson["epr"] > 5 and pearson["sign_balanced_accuracy"] > 0.95
    assert 0.3 < prior["edge_auroc"] < 0.7  # a random prior knows nothing of these cells
    assert report.info["held_out_regulators"] == 20 and report.info["negative_edges"] > 5 * report.info["positive_edges"]
    floor = report.table.loc["majority sign (floor)"]
    assert floor["sign_balanced_accuracy"] == 0.5 and floor["sign_accuracy"] >= 0.5
    ceiling = report.table.loc["one sign per TF, read from the answers (ceiling)"]
    assert ceiling["sign_accuracy"] >= floor["sign_accuracy"] and ceiling["sign_balanced_accuracy"] >= 0.5
    shuffled = reference.assign(target=np.random.default_rng(1).permutation(reference["target"].to_numpy()))
    null = evaluate_regulation(adata, checkpoint, shuffled, baselines=("pearson",), max_cells=None)
    assert null.table.at["Pearson correlation", "edge_auroc"] < 0.7
    assert {check[0] for check in report.target_checks()} >= {"edge EPR >= 1.5 (shuffled-target null)",
                                                              "sign balanced accuracy > 0.5"}


def prior_planted_reference(adata, checkpoint, n_sources=40, per_source=6, seed=0) -> pd.DataFrame:
    """A reference the checkpoint's prior supports: each source's targets are the measured genes nearest it in the
    prior, and its sign is that of its prior row's first coordinate."""
    from scgene.gene_regulation import GeneIndex

    encoder = ScGeneForMaskedExpression.from_pretrained(checkpoint).scgene
    genes = GeneIndex(adata, ScGeneTokenizer.from_pretrained(checkpoint), None, encoder.config.vocab_size)
    prior = torch.nn.functional.normalize(encoder.get_gene_prior()[torch.from_numpy(genes.vocab_ids)], dim=1).numpy()
    similarity = prior @ prior.T
    np.fill_diagonal(similarity, -np.inf)
    rows = []
    for source in np.random.default_rng(seed).choice(len(genes), n_sources, replace=False):
        for target in np.argsort(-similarity[source])[:per_source]:
            rows.append((genes.names[source], genes.names[target], np.sign(prior[source, 0])))
    return pd.DataFrame(rows, columns=["source", "target", "weight"])


def test_the_prior_probe_learns_from_training_tfs_what_their_prior_rows_hold(checkpoint):
    """The probe, fitted on the training TFs only, recovers the held-out TFs' edges and signs of a reference that the
    prior supports; with that reference's targets shuffled there is nothing to learn, and it scores about chance."""
    adata = ad.read_h5ad(PBMC)[:100].copy()
    reference = prior_planted_reference(adata, checkpoint, n_sources=200)
    probe = evaluate_regulation(adata, checkpoint, reference, baselines=("prior_probe",), max_cells=None).table.loc[
        "prior probe (training TFs)"]
    assert probe["edge_auroc"] > 0.85 and probe["sign_balanced_accuracy"] > 0.8, probe
    shuffled = reference.assign(target=np.random.default_rng(1).permutation(reference["target"].to_numpy()),
                                weight=np.random.default_rng(2).choice([-1, 1], len(reference)))
    null = evaluate_regulation(adata, checkpoint, shuffled, baselines=("prior_probe",), max_cells=None).table.loc[
        "prior probe (training TFs)"]
    assert 0.3 < null["edge_auroc"] < 0.7 and null["sign_balanced_accuracy"] < 0.7, null


def test_prior_regulation_predicts_the_edges_of_regulators_the_reference_lacks(checkpoint):
    """Fitted on 150 planted regulators, the prior's network of 50 others finds their planted targets and signs; the
    curated edges of a reference regulator are marked; the network lands in varp."""
    adata = ad.read_h5ad(PBMC)[:100].copy()
    planted = prior_planted_reference(adata, checkpoint, n_sources=200)
    sources = planted["source"].unique()
    reference, new = planted[planted["source"].isin(sources[:150])], planted[planted["source"].isin(sources[150:])]
    network = scgene.prior_regulation(adata, checkpoint, regulators=list(sources[150:]) + [sources[0]],
                                      reference=reference, top_k=20)
    found = network.merge(new, on=["source", "target"], suffixes=("", "_planted"))
    assert len(found) > 0.8 * len(new)  # chance: 20 of ~1,900 genes per regulator, about 1%
    assert (np.sign(found["weight"]) == found["weight_planted"]).mean() > 0.8
    assert not network.loc[network["source"].isin(sources[150:]), "in_reference"].any()
    curated = network[network["source"] == sources[0]]
    assert curated["in_reference"].sum() == 6 and curated.loc[curated["in_reference"], "rank"].max() <= 10
    assert (network.groupby("source")["rank"].max() == 20).all()
    assert (network.groupby("source")["abs_weight"].apply(lambda w: w.is_monotonic_decreasing)).all()
    assert adata.varp["scgene_prior_regulation"].nnz == len(network)
    with pytest.raises(ValueError, match="None of the regulators"):
        scgene.prior_regulation(adata, checkpoint, regulators=["NOT_A_GENE"], reference=reference)


def test_the_tf_split_has_its_own_seed(checkpoint, cells):
    """Cell and null seeds vary while `split_seed` keeps the held-out TFs: a model pretrained on the other half is
    scored on TFs it never saw at every seed."""
    runs = [evaluate_regulation(cells, checkpoint, baselines=("prior",), seed=seed, split_seed=split_seed).info
            for seed, split_seed in ((0, 0), (1, 0), (1, 1))]
    assert runs[0]["positive_edges"] == runs[1]["positive_edges"] != runs[2]["positive_edges"]
    assert runs[0]["held_out_regulators"] == runs[1]["held_out_regulators"]


def test_benchmark_errors_name_the_fix(checkpoint, cells):
    with pytest.raises(ValueError, match="source, target, weight"):
        evaluate_regulation(cells, checkpoint, pd.DataFrame({"tf": ["A"], "gene": ["B"]}))
    with pytest.raises(ValueError, match="No edge of the reference"):
        evaluate_regulation(cells, checkpoint, pd.DataFrame({"source": ["XX1"], "target": ["XX2"], "weight": [1]}))
    with pytest.raises(ValueError, match="Unknown baselines"):
        evaluate_regulation(cells, checkpoint, baselines=("magic",))


# ----------------------------------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------------------------------


def test_regulation_command_writes_the_table_and_a_heatmap(checkpoint, tmp_path, capsys):
    source = tmp_path / "cells.h5ad"
    ad.read_h5ad(PBMC)[:60].copy().write_h5ad(source)
    before = source.read_bytes()
    out, plot = tmp_path / "edges.tsv", tmp_path / "heatmap.png"
    assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(out), "--regulators", "tfs",
                 "--top-k", "3", "--plot", str(plot)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == ["source", "target", "weight", "abs_weight", "rank", "cells"]
    assert set(table["source"]) <= set(scgene.transcription_factors()) and table["rank"].max() == 3
    assert plot.read_bytes()[:4] == b"\x89PNG" and source.read_bytes() == before
    assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(source), "--overwrite"]) == 1
    assert "input" in capsys.readouterr().err and source.read_bytes() == before
    assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "g.tsv"),
                 "--groupby", "cell_type", "--plot", str(tmp_path / "g.png")]) == 1
    assert "--plot-group" in capsys.readouterr().err and not (tmp_path / "g.tsv").exists()


def test_regulation_command_writes_the_prior_probes_network_and_refuses_what_does_not_apply(checkpoint, tmp_path,
                                                                                             capsys):
    source, reference = tmp_path / "cells.h5ad", tmp_path / "reference.csv"
    adata = ad.read_h5ad(PBMC)[:60].copy()
    adata.write_h5ad(source)
    prior_planted_reference(adata, checkpoint, n_sources=60).to_csv(reference, index=False)
    out = tmp_path / "edges.tsv"
    assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(out), "--method", "prior-probe",
                 "--reference", str(reference), "--top-k", "4"]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == ["source", "target", "weight", "abs_weight", "rank", "in_reference"]
    assert table["source"].nunique() == 60 and table["rank"].max() == 4
    for wrong, message in ((["--method", "prior-probe", "--groupby", "cell_type"], "--groupby"),
                           (["--reference", str(reference)], "--method prior-probe")):
        assert main(["regulation", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "w.tsv"),
                     *wrong]) == 1
        assert message in capsys.readouterr().err and not (tmp_path / "w.tsv").exists()


def test_evaluate_regulation_command_prints_and_saves_the_report(checkpoint, tmp_path, capsys):
    source = tmp_path / "cells.h5ad"
    ad.read_h5ad(PBMC)[:120].copy().write_h5ad(source)
    report = tmp_path / "report.json"
    assert main(["evaluate-regulation", str(source), "--model", str(checkpoint), "--baselines", "pearson",
                 "prior_probe", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| ScGene |" in printed and "Pearson correlation" in printed and "majority sign (floor)" in printed
    assert "Targets, ScGene:" in printed and "Targets, prior probe (training TFs):" in printed
    saved = json.loads(report.read_text())
    assert saved["info"]["positive_edges"] > 0 and "ScGene" in saved["scores"]
    assert [check["target"] for check in saved["prior_probe_targets"]] == [check["target"] for check in saved["targets"]]
    assert main(["evaluate-regulation", str(source), "--model", str(checkpoint), "--max-cells", "0"]) == 1
    assert "--max-cells" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Seed 001's biologically constrained attention
# ----------------------------------------------------------------------------------------------------------------------


def test_known_known_edges_every_known_pair_of_a_cell_and_nothing_else():
    from scgene.data import KnownRegulation

    tokenizer = ScGeneTokenizer()
    table = pd.DataFrame({"source": ["STAT1", "STAT1", "SPI1", "NOT_A_GENE", "CD74"],
                          "target": ["IRF1", "CD74", "LYZ", "LYZ", "CD74"], "weight": [1, -1, 1, 1, 1]})
    known = KnownRegulation(table, tokenizer)
    assert len(known) == 3  # unknown gene and self-edge dropped
    ids = torch.tensor([tokenizer.convert_genes_to_ids(["STAT1", "IRF1", "CD74", "LYZ"]) + [0],
                        tokenizer.convert_genes_to_ids(["SPI1", "LYZ", "STAT1", "ACTB"]) + [0]])
    labels = known.labels(ids)  # [target i, regulator j]
    assert labels.shape == (2, 5, 5) and labels.dtype == torch.int8
    expected = torch.zeros(2, 5, 5, dtype=torch.int8)
    expected[0, 1, 0], expected[0, 2, 0] = 1, -1  # STAT1 -> IRF1 (+), STAT1 -| CD74 (-)
    expected[1, 1, 0] = 1  # SPI1 -> LYZ
    assert torch.equal(labels, expected)


def constrained_model(weight: float) -> ScGeneForMaskedExpression:
    return tiny_dual_branch(60, regulation_loss_weight=weight, expression_encoding="binned", n_bins=5)


def test_regulation_loss_needs_the_dual_branch_encoder_and_counts_only_known_edges():
    with pytest.raises(ValueError, match="dual_branch"):
        ScGeneConfig(regulation_loss_weight=1.0)
    model = constrained_model(1.0)
    ids = torch.randint(3, 60, (2, 7))
    inputs = dict(input_ids=ids, expression_values=torch.rand(2, 7), expression_bins=torch.randint(0, 5, (2, 7)),
                  attention_mask=torch.ones(2, 7, dtype=torch.long), labels=torch.full((2, 7), -100.0))
    inputs["labels"][:, 0] = 0.5
    labels = torch.zeros(2, 7, 7, dtype=torch.int8)
    labels[0, 1, 2], labels[1, 3, 4] = 1, -1
    with torch.no_grad():
        none_known = model(**inputs, known_edges=torch.zeros(2, 7, 7, dtype=torch.int8))
        with_edges = model(**inputs, known_edges=labels)
    assert none_known.regulation_loss == 0 and with_edges.regulation_loss > 0
    assert with_edges.loss.item() == pytest.approx((none_known.loss + with_edges.regulation_loss).item(), rel=1e-5)


def test_the_regulation_loss_moves_the_map_and_signs_toward_known_edges():
    """A few optimiser steps on the regulation loss alone: the known edges gain attention and their signs."""
    model = constrained_model(1.0).train()
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (4, 12))
    labels = torch.zeros(4, 12, 12, dtype=torch.int8)
    labels[:, 1, 2], labels[:, 5, 6] = 1, -1  # target 1 <- regulator 2 (+), target 5 <- regulator 6 (-)
    mask = torch.ones(4, 12, dtype=torch.long)

    def known_edges():
        with torch.no_grad():
            regulation = torch.stack(model.scgene(ids, torch.rand(4, 12), torch.randint(0, 5, (4, 12)), mask,
                                                  output_regulation=True).regulation).mean(dim=(0, 2))
        return regulation[:, 1, 2].mean().item(), regulation[:, 5, 6].mean().item()

    activating_before, repressing_before = known_edges()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        identity = model.scgene.embeddings.gene_identity(ids, model.dtype)
        parts = model.scgene.encoder.regulation_parts(identity, None)
        from scgene.modeling_scgene import regulation_prior_loss

        loss = regulation_prior_loss(parts, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    activating_after, repressing_after = known_edges()
    assert activating_after > max(activating_before, 0) and repressing_after < min(repressing_before, 0)


def test_the_sign_loss_weighs_activating_and_repressing_edges_the_same():
    """9 activating edges and 1 repressing: "always activate" and "always repress" cost the same, and a regulator
    map that gets every sign right costs less than either (with every edge weighing the same, the majority won)."""
    from scgene.modeling_scgene import regulation_prior_loss

    known = torch.zeros(1, 11, 11, dtype=torch.int8)
    known[0, 0, 1:10] = 1
    known[0, 0, 10] = -1
    regulation_map = torch.full((1, 2, 11, 11), 1 / 11)

    def loss(sign_logits):
        return regulation_prior_loss([(regulation_map, sign_logits.expand(1, 2, 11))], known).item()

    always_activate, always_repress = loss(torch.full((11,), 4.0)), loss(torch.full((11,), -4.0))
    right = torch.full((11,), 4.0)
    right[10] = -4.0
    assert always_activate == pytest.approx(always_repress, rel=1e-6)
    assert loss(right) < always_activate - 1.5


def test_the_collator_adds_known_edges():
    from scgene.data import DataCollatorForMaskedExpression, KnownRegulation

    tokenizer = ScGeneTokenizer(max_length=MAX_LENGTH)
    known = KnownRegulation(scgene.collectri(), tokenizer)
    cells = [dict(zip(("input_ids", "expression_values", "expression_bins"), row))
             for row in zip(*[[np.asarray(v) for v in column] for column in tokenizer(ad.read_h5ad(PBMC)[:8]).values()][:3])]
    batch = DataCollatorForMaskedExpression(tokenizer, known_regulation=known, seed=0)(cells)
    assert batch["known_edges"].shape == (8, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert torch.equal(batch["known_edges"], known.labels(batch["input_ids"]))
