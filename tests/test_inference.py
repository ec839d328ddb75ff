"""`scgene.embed` / `annotate` / `embed_genes` / `gene_prior` and the `scgene embed` / `scgene annotate` commands."""

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scgene
import scgene.inference
from modeling_helpers import tiny_pretrained
from scgene import ScGeneForCellClassification, ScGeneForMaskedExpression, ScGeneModel, ScGeneTokenizer
from scgene.cli import main

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
LABELS = ["B", "Mono", "T"]


def tiny(vocab_size: int, model_class=ScGeneForCellClassification, **overrides):
    labels = dict(expression_encoding="binned", num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                  label2id={name: i for i, name in enumerate(LABELS)})
    return tiny_pretrained(vocab_size, model_class, **(labels | overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny cell-type classifier on the default human vocabulary, its tokenizer saved with max_length 256."""
    folder = tmp_path_factory.mktemp("inference") / "classifier"
    tokenizer = ScGeneTokenizer(max_length=256)
    tiny(tokenizer.vocab_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PBMC)[:160].copy()


def reference_embeddings(folder, adata, max_length=256):
    """The plain way: tokenize everything padded, one forward."""
    encoder = ScGeneModel.from_pretrained(folder).eval()
    batch = ScGeneTokenizer.from_pretrained(folder)(adata, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder(**batch).pooler_output.numpy()


def test_embed_writes_obsm_and_matches_plain_forward(checkpoint, cells):
    adata = cells.copy()
    embeddings = scgene.embed(adata, checkpoint, progress=False)
    assert embeddings.dtype == np.float32 and embeddings.shape == (adata.n_obs, 32)
    assert adata.obsm["X_scgene"] is embeddings
    np.testing.assert_allclose(embeddings, reference_embeddings(checkpoint, cells), atol=1e-5)


def test_embedding_does_not_depend_on_batching_or_order(checkpoint, cells):
    baseline = scgene.embed(cells, checkpoint, batch_size=128, progress=False, key_added=None)
    for options in ({"batch_size": 1}, {"batch_size": 7}, {"max_tokens_per_batch": 300}):
        other = scgene.embed(cells, checkpoint, progress=False, key_added=None, **options)
        np.testing.assert_allclose(other, baseline, atol=1e-5, err_msg=str(options))
    order = np.random.default_rng(0).permutation(cells.n_obs)
    shuffled = scgene.embed(cells[order].copy(), checkpoint, progress=False, key_added=None)
    np.testing.assert_allclose(shuffled, baseline[order], atol=1e-5)
    assert np.abs(baseline - baseline.mean(0)).max() > 1e-3  # cells differ: the comparison means something


def test_backed_and_path_inputs_are_read_not_written(checkpoint, cells, tmp_path):
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from_path = scgene.embed(path, checkpoint, progress=False)
    backed = ad.read_h5ad(path, backed="r")
    from_backed = scgene.embed(backed, checkpoint, progress=False)
    backed.file.close()
    np.testing.assert_allclose(from_path, from_backed, atol=1e-6)
    np.testing.assert_allclose(from_path, scgene.embed(cells, checkpoint, progress=False, key_added=None), atol=1e-5)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_any_head_gives_its_encoder(checkpoint, cells):
    classifier = ScGeneForCellClassification.from_pretrained(checkpoint)
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    from_object = scgene.embed(cells[:20], classifier, tokenizer=tokenizer, progress=False, key_added=None)
    np.testing.assert_allclose(from_object, scgene.embed(cells[:20], checkpoint, progress=False, key_added=None), atol=1e-6)
    with pytest.raises(ValueError, match="no saved tokenizer|pass tokenizer="):
        scgene.embed(cells[:5], tiny(tokenizer.vocab_size), progress=False)


def test_tokenizer_must_match_the_vocabulary(checkpoint, cells):
    small = ScGeneTokenizer.from_anndata(cells)
    with pytest.raises(ValueError, match="vocab_size"):
        scgene.embed(cells[:5], checkpoint, tokenizer=small, progress=False)
    with pytest.raises(ValueError, match="gene sampling"):
        scgene.embed(cells[:5], checkpoint, seed=0, progress=False)


def test_annotate_columns_and_rejection(checkpoint, cells):
    adata = cells.copy()
    result = scgene.annotate(adata, checkpoint, progress=False)
    probabilities = adata.obsm["scgene_label_probabilities"]
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert list(adata.obs["scgene_label"].cat.categories) == LABELS
    assert (np.asarray(adata.obs["scgene_label"]) == np.array(LABELS)[probabilities.argmax(1)]).all()
    np.testing.assert_allclose(adata.obs["scgene_label_confidence"], probabilities.max(1))
    assert adata.uns["scgene_label"]["labels"] == LABELS and result.index.equals(adata.obs_names)
    # the same logits as the model's own forward on a plain padded batch
    model = ScGeneForCellClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        logits = model(**ScGeneTokenizer.from_pretrained(checkpoint)(cells[:30], return_tensors="pt")).logits
    np.testing.assert_allclose(probabilities[:30], torch.softmax(logits, -1).numpy(), atol=1e-5)

    threshold = float(np.median(probabilities.max(1)))
    scgene.annotate(adata, checkpoint, min_confidence=threshold, key_added="strict", progress=False)
    unknown = np.asarray(adata.obs["strict"]) == "Unknown"
    assert unknown.any() and (unknown == (adata.obs["strict_confidence"] < threshold)).all()
    assert "Unknown" in adata.obs["strict"].cat.categories


def test_annotate_needs_a_classifier(tmp_path, cells):
    tokenizer = ScGeneTokenizer()
    tiny(tokenizer.vocab_size, ScGeneForMaskedExpression).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="classifier"):
        scgene.annotate(cells[:5], tmp_path, progress=False)


def test_embed_genes_averages_over_expressing_cells(checkpoint, cells):
    adata = cells[:12].copy()
    table = scgene.embed_genes(adata, checkpoint, progress=False)
    per_gene, n_cells = adata.varm["X_scgene_genes"], adata.var["X_scgene_genes_n_cells"].to_numpy()
    counts = np.asarray((adata.X > 0).sum(0)).ravel()
    expressed = n_cells > 0
    assert np.isnan(per_gene[~expressed]).all() and np.isfinite(per_gene[expressed]).all()
    assert (n_cells <= counts).all() and len(table) == expressed.sum()
    # one gene by hand: its last-layer state in every cell that keeps it, averaged
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    gene = adata.var_names[np.argmax(n_cells)]
    gene_id = tokenizer.convert_genes_to_ids([gene])[0]
    encoder = ScGeneModel.from_pretrained(checkpoint).eval()
    batch = tokenizer(adata, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
    expected = states[batch["input_ids"] == gene_id].mean(0).numpy()
    np.testing.assert_allclose(per_gene[adata.var_names.get_loc(gene)], expected, atol=1e-5)


def test_gene_prior_export(checkpoint, cells):
    adata = cells[:5].copy()
    table = scgene.gene_prior(checkpoint, adata=adata)
    prior = ScGeneModel.from_pretrained(checkpoint).get_gene_prior().numpy()
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    gene_id = tokenizer.convert_genes_to_ids(["LYZ"])[0]
    np.testing.assert_allclose(table.loc["LYZ"].to_numpy()[1:].astype(np.float32), prior[gene_id])
    np.testing.assert_allclose(adata.varm["X_scgene_prior"][adata.var_names.get_loc("LYZ")], prior[gene_id])
    assert table["ensembl_id"].loc["LYZ"].startswith("ENSG")


def test_embed_command_writes_a_copy_and_a_plot(checkpoint, cells, tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    cells.write_h5ad(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out, png = tmp_path / "out.h5ad", tmp_path / "umap.png"
    code = main(["embed", str(source), "--model", str(checkpoint), "--out", str(out), "--plot", str(png),
                 "--color", "cell_type", "--batch-size", "16"])
    printed = capsys.readouterr().out
    assert code == 0 and png.stat().st_size > 1000 and "ARI" in printed and "NMI" in printed
    written = ad.read_h5ad(out)
    np.testing.assert_allclose(written.obsm["X_scgene"], scgene.embed(cells, checkpoint, progress=False, key_added=None), atol=1e-5)
    assert written.obsm["X_scgene_umap"].shape == (cells.n_obs, 2) and "scgene_leiden" in written.obs
    record = written.uns["X_scgene"]  # what made the result: model, tokenizer settings, both coverages
    assert record["model"] == str(checkpoint) and record["tokenizer"]["max_length"] > 0
    assert "genes matched the vocabulary" in record["gene_coverage"]
    assert 0 <= record["prior_coverage"]["share_without_prior"] <= 1 and record["prior_coverage"]["gene_tokens"] > 0
    pd.testing.assert_frame_equal(written.obs[cells.obs.columns], cells.obs)
    assert (written.X != cells.X).nnz == 0
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    # errors in command-line terms, one line
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "x.h5ad"), "--batch-size", "0"]) == 1
    assert "--batch-size" in capsys.readouterr().err
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(source), "--overwrite"]) == 1
    assert "is the input" in capsys.readouterr().err
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "y.h5ad"), "--color", "nope"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("scgene embed: error:") and "nope" in error and error.count("\n") == 1


def test_annotate_command(checkpoint, cells, tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    cells.write_h5ad(source)
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(source), "--model", str(checkpoint), "--out", str(out), "--min-confidence", "0.2"]) == 0
    printed = capsys.readouterr().out
    written = ad.read_h5ad(out)
    expected = scgene.annotate(cells.copy(), checkpoint, min_confidence=0.2, progress=False)
    assert (written.obs["scgene_label"].astype(str) == expected["scgene_label"].astype(str)).all()
    assert list(written.uns["scgene_label"]["labels"]) == LABELS
    for label, count in expected["scgene_label"].value_counts().items():
        if count:
            assert f"{label}" in printed and str(count) in printed
    assert main(["annotate", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "b.h5ad"),
                 "--min-confidence", "2"]) == 1
    assert "--min-confidence" in capsys.readouterr().err


def test_no_cells_give_empty_outputs_not_errors(checkpoint, cells, tmp_path):
    """An AnnData with zero cells (e.g. a filter that removed everything): embed and annotate write a valid empty
    result."""
    empty = cells[:0].copy()
    assert scgene.embed(empty, checkpoint, progress=False).shape == (0, 32)
    assert scgene.annotate(empty, checkpoint, progress=False)["scgene_label"].shape == (0,)
    source = tmp_path / "empty.h5ad"
    empty.write_h5ad(source)
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "e.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_scgene"].shape == (0, 32)
    assert main(["annotate", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "a.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "a.h5ad").n_obs == 0


def test_a_mistyped_path_is_named_not_taken_for_a_hub_id(checkpoint, cells, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"nope: no such folder \(a checkpoint is a folder with config.json"):
        scgene.embed(cells.copy(), tmp_path / "nope", progress=False)
    with pytest.raises(FileNotFoundError, match=r"^/no/tokenizer: no such folder \(a saved tokenizer is a folder"):
        scgene.embed(cells.copy(), checkpoint, tokenizer="/no/tokenizer", progress=False)
    source = tmp_path / "in.h5ad"
    cells.write_h5ad(source)
    capsys.readouterr()
    assert main(["embed", str(source), "--model", "./nope", "--out", str(tmp_path / "out.h5ad")]) == 1
    assert capsys.readouterr().err == "scgene embed: error: ./nope: no such folder (a checkpoint is a folder with " \
                                      "config.json and model.safetensors); check the path.\n"


def test_pooling_layer_reads_another_layer_in_the_api_and_the_command(checkpoint, cells, tmp_path, capsys):
    earlier = scgene.embed(cells, checkpoint, pooling_layer=-2, progress=False, key_added=None)
    encoder = ScGeneModel.from_pretrained(checkpoint, pooling_layer=-2).eval()
    batch = ScGeneTokenizer.from_pretrained(checkpoint)(cells, max_length=256, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(earlier, encoder(**batch).pooler_output.numpy(), atol=1e-5)
    assert not np.allclose(earlier, reference_embeddings(checkpoint, cells), atol=1e-3)
    with pytest.raises(ValueError, match="model.config.pooling_layer"):
        scgene.embed(cells, encoder, pooling_layer=-1, progress=False)  # a loaded model is not changed behind one's back
    source, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    cells.write_h5ad(source)
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(out), "--pooling-layer", "-2"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scgene"], earlier, atol=1e-5)
    capsys.readouterr()
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "x.h5ad"),
                 "--pooling-layer", "1"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("scgene embed: error: --pooling-layer must be an integer from -2") and error.count("\n") == 1


def test_tokens_without_a_prior_row_are_reported_and_warned_about(checkpoint, cells, caplog):
    """The share of gene tokens whose prior row is zero is measured on the tokens the model saw: all of them once the
    prior is zeroed (a warning naming the fix), none with a prior row for every gene."""
    model = scgene.inference.load_model(checkpoint)
    tokenizer = scgene.inference.load_tokenizer(None, model)
    with torch.no_grad():
        model.set_gene_prior(torch.ones_like(model.get_gene_prior()))
    adata = cells.copy()
    scgene.embed(adata, model, tokenizer=tokenizer, progress=False)
    assert adata.uns["X_scgene"]["prior_coverage"]["share_without_prior"] == 0
    with torch.no_grad():
        prior = model.get_gene_prior().clone()
        prior[3:] = 0
        model.set_gene_prior(prior)
    with caplog.at_level("WARNING"):
        scgene.embed(adata, model, tokenizer=tokenizer, progress=False)
    assert adata.uns["X_scgene"]["prior_coverage"]["share_without_prior"] == 1
    assert "100.0% of the" in caplog.text and "--knowledge-genes vocabulary" in caplog.text


# ---------------------------------------------------------------- damaged checkpoints and inputs: one line, the fix
@pytest.fixture()
def damaged_checkpoints(checkpoint, tmp_path):
    """Copies of the checkpoint: a config with one layer more, a config with another hidden size, half a weights file."""
    import json
    import shutil

    config = json.loads((checkpoint / "config.json").read_text())
    edits = {"layers": {"num_hidden_layers": config["num_hidden_layers"] + 1},
             "hidden": {"hidden_size": config["hidden_size"] * 2}, "truncated": {}}
    folders = {}
    for name, edit in edits.items():
        folders[name] = shutil.copytree(checkpoint, tmp_path / name)
        (folders[name] / "config.json").write_text(json.dumps(config | edit))
    weights = (checkpoint / "model.safetensors").read_bytes()
    (folders["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return folders


@pytest.mark.parametrize("command", ["embed", "annotate"])
def test_damaged_checkpoints_and_mistyped_paths_are_one_line_errors(damaged_checkpoints, cells, tmp_path, capsys,
                                                                     command, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "in.h5ad"
    cells[:20].write_h5ad(source)
    expected = {
        str(damaged_checkpoints["layers"]): "config.json describes",
        str(damaged_checkpoints["hidden"]): "do not match the weights",
        str(damaged_checkpoints["truncated"]): "model.safetensors is damaged",
        str(tmp_path / "no" / "such" / "model"): "no such folder",
        f"{tmp_path.name}/typo": "no such folder",  # relative, under an existing folder
        "a-model-nobody-has": "neither a local checkpoint folder nor a Hub model",
    }
    monkeypatch.chdir(tmp_path.parent)
    for model, message in expected.items():
        assert main([command, str(source), "--model", model, "--out", str(tmp_path / "out.h5ad")]) == 1, model
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith(f"scgene {command}: error:") and message in error[-1], (model, error)
    assert not (tmp_path / "out.h5ad").exists()


def test_cells_without_counts_are_labelled_unknown(checkpoint, cells, caplog):
    adata = cells[:40].copy()
    counts = adata.X.toarray()
    counts[:5] = 0
    adata.X = sp.csr_matrix(counts)
    with caplog.at_level("WARNING"):
        result = scgene.annotate(adata, checkpoint, progress=False)
    assert (result["scgene_label"].iloc[:5] == "Unknown").all() and (result["scgene_label_confidence"].iloc[:5] == 0).all()
    assert (result["scgene_label"].iloc[5:] != "Unknown").all() and "5 cells have no counts" in caplog.text


def test_plot_format_follows_the_suffix_and_is_checked_first(checkpoint, cells, tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    cells[:60].write_h5ad(source)
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "a.h5ad"), "--plot",
                 str(tmp_path / "umap.pdf")]) == 0
    assert (tmp_path / "umap.pdf").read_bytes()[:4] == b"%PDF"
    assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "b.h5ad"), "--plot",
                 str(tmp_path / "umap.pnj")]) == 1
    assert "suffix names no image format" in capsys.readouterr().err and not (tmp_path / "b.h5ad").exists()


def test_tokens_of_genes_pretraining_never_saw_are_reported(checkpoint, cells, tmp_path, caplog):
    """A checkpoint's training_genes.json lists the genes its corpus held: a query made mostly of other genes warns."""
    import json
    import shutil

    folder = shutil.copytree(checkpoint, tmp_path / "model")
    tokenizer = ScGeneTokenizer.from_pretrained(folder)
    query = cells[:30].copy()
    ids = tokenizer.map_genes(query).vocab_ids
    (folder / "training_genes.json").write_text(json.dumps({"gene_ids": ids[: len(ids) // 10].tolist()}))
    with caplog.at_level("WARNING"):
        scgene.embed(query, folder, progress=False)
    share = query.uns["X_scgene"]["prior_coverage"]["share_unseen_in_training"]
    assert share > 0.5 and "never held" in caplog.text
    (folder / "training_genes.json").write_text(json.dumps({"gene_ids": ids.tolist()}))
    scgene.embed(query, folder, progress=False)
    assert query.uns["X_scgene"]["prior_coverage"]["share_unseen_in_training"] == 0



def test_embed_command_reads_only_the_genes_asked_for(checkpoint, tmp_path, capsys):
    """--genes hvg: the file's 2,000 most variable genes (those `scgene evaluate`'s PCA reads); --genes FILE: the
    names listed; both the same as `scgene.embed(genes=...)`, and not the same as reading every gene."""
    from scgene.evaluation import EvaluationSettings, highly_variable_genes

    cells = ad.read_h5ad(Path(__file__).parent / "data" / "cellbench_120cells_ensembl_subset.h5ad")
    source = tmp_path / "in.h5ad"
    cells.write_h5ad(source)
    hvg = highly_variable_genes(cells, EvaluationSettings())
    listed = tmp_path / "genes.txt"
    listed.write_text("\n".join(cells.var_names[:300]) + "\n")
    for option, genes in (("hvg", hvg), (str(listed), list(cells.var_names[:300]))):
        out = tmp_path / f"out_{len(genes)}.h5ad"
        assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(out), "--genes", option]) == 0
        expected = scgene.embed(cells, checkpoint, genes=genes, progress=False, key_added=None)
        np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_scgene"], expected, atol=1e-5)
    every_gene = scgene.embed(cells, checkpoint, progress=False, key_added=None)
    assert len(hvg) == 2000 and not np.allclose(ad.read_h5ad(tmp_path / "out_2000.h5ad").obsm["X_scgene"], every_gene)
    capsys.readouterr()
    (tmp_path / "empty.txt").write_text("\n")
    for option in ("highly_variable", str(tmp_path / "empty.txt")):
        assert main(["embed", str(source), "--model", str(checkpoint), "--out", str(tmp_path / "x.h5ad"),
                     "--genes", option]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"scgene embed: error: --genes {option}:") and error.count("\n") == 1, error
    assert not (tmp_path / "x.h5ad").exists()


def test_fitted_prior_readout_weight_balances_the_two_parts(tmp_path, cells):
    """fit_prior_readout_weight: the ratio of the spreads of the transformer's and the prior's pooled parts; a model
    that already reads the prior out gets the same weight (its transformer part is what is measured), and embedding
    with it adds weight x the prior's part."""
    tokenizer = ScGeneTokenizer(max_length=64)
    encoder = tiny(tokenizer.vocab_size, ScGeneModel, pooling="weighted_mean")
    weight = scgene.fit_prior_readout_weight(cells, encoder, tokenizer=tokenizer, max_cells=100, progress=False)
    plain = scgene.embed(cells, encoder, tokenizer=tokenizer, key_added=None, progress=False)
    sample = np.sort(np.random.default_rng(0).choice(cells.n_obs, 100, replace=False))
    centred = plain[sample] - plain[sample].mean(axis=0)
    assert weight > 0 and np.isfinite(weight)
    encoder.config.prior_readout_weight = weight
    assert scgene.fit_prior_readout_weight(cells, encoder, tokenizer=tokenizer, max_cells=100,
                                           progress=False) == pytest.approx(weight, rel=1e-4)
    read_out = scgene.embed(cells, encoder, tokenizer=tokenizer, key_added=None, progress=False)
    prior_part = (read_out - plain)[sample] / weight
    prior_part -= prior_part.mean(axis=0)
    spreads = [np.sqrt((part**2).sum(axis=1).mean()) for part in (centred, prior_part)]
    assert spreads[0] == pytest.approx(weight * spreads[1], rel=1e-3)
    # a list of files pools their cells
    halves = [cells[:80].copy(), str(_written(cells[80:], tmp_path / "half.h5ad"))]
    assert scgene.fit_prior_readout_weight(halves, encoder, tokenizer=tokenizer, progress=False) > 0
    encoder.set_gene_prior(torch.zeros_like(encoder.get_gene_prior()))
    with pytest.raises(ValueError, match="does not vary"):
        scgene.fit_prior_readout_weight(cells, encoder, tokenizer=tokenizer, progress=False)


def _written(adata, path):
    adata.write_h5ad(path)
    return path
