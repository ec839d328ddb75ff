"""Publishing (`scgene.hub`, `scgene push`): a model card made from measurements that parses back, one Hub commit that
holds the whole checkpoint and that card (the Hub client's calls recorded, nothing sent), and the pushed files loading
through `AutoModel` / `AutoFeatureExtractor` from an offline cache in a process where scgene cannot be imported. The
card's training record (`build_record.json`) says what it lacks, and its leave-one-dataset-out section is the
protocol's runs.jsonl summarised."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import scgene
from hub_cache import populate_hub_cache
from scgene.cli import main
from scgene.evaluation import METRICS
from scgene.hub import BUILD_RECORD, git_commit, model_card, push, tokenized_corpus, training_record

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
REPO = Path(__file__).resolve().parents[1]
PCA = "PCA (50 PCs of log1p HVGs)"
# (left-out set, seed) -> embedding -> (kNN macro-F1, KMeans ARI): what scripts/leave_one_dataset_out.py measured
TRANSFER_SCORES = {
    ("pbmc_a", 0): {"ScGene": (0.69, 0.40), "ScGene untrained": (0.50, 0.20), "prior only": (0.60, 0.30), PCA: (0.90, 0.70)},
    ("pbmc_a", 1): {"ScGene": (0.71, 0.44), "ScGene untrained": (0.50, 0.22), "prior only": (0.62, 0.34), PCA: (0.92, 0.70)},
    ("pbmc_b", 0): {"ScGene": (0.80, 0.50), "ScGene untrained": (0.70, 0.40), "prior only": (0.82, 0.45), PCA: (0.78, 0.60)},
    ("pbmc_b", 1): {"ScGene": (0.80, 0.52), "ScGene untrained": (0.70, 0.40), "prior only": (0.84, 0.45), PCA: (0.78, 0.62)},
}
EVALUATION = {"scores": {
    "ScGene": {"knn_f1": 0.61, "logreg_f1": 0.7, "kmeans_ari": 0.3, "leiden_ari": 0.5, "label_pc1_corr_genes": 0.4},
    "prior only": {"knn_f1": 0.55, "logreg_f1": 0.72, "kmeans_ari": 0.2, "leiden_ari": 0.45},
    "PCA (50 PCs of log1p HVGs)": {"knn_f1": 0.9, "logreg_f1": 0.95, "kmeans_ari": 0.6, "leiden_ari": 0.4},
}}


class RecordingHubClient(HfApi):
    """HfApi whose repository and commit calls are recorded instead of sent."""

    def __init__(self):
        super().__init__(token="hf_not_a_real_token")
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() if isinstance(op.path_or_fileobj, str)
                 else op.path_or_fileobj for op in operations}
        self.calls.append(("create_commit", repo_id, files))
        return f"https://huggingface.co/{repo_id}/commit/0123"


def test_the_card_reports_the_measurements_and_parses_back(tmp_path):
    card = model_card(scgene.DEFAULT_CHECKPOINT, evaluations={"my_set": EVALUATION["scores"]}, repo_id="org/scgene-x")
    (tmp_path / "README.md").write_text(str(card))
    loaded = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False)
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in loaded.data.eval_results}
    record = json.loads((scgene.DEFAULT_CHECKPOINT / "build_record.json").read_text())
    shipped = record["zero_shot"]["lymph_node"]["ScGene"]["knn_f1"]
    assert results[("lymph_node", "kNN macro-F1 (k=15, 5-fold)")] == pytest.approx(shipped, abs=1e-4)
    assert results[("my_set", "KMeans ARI")] == 0.3
    assert loaded.data.model_name == "scgene-x" and loaded.data.library_name == "transformers"
    text = loaded.text
    assert "- my_set: kNN macro-F1 (k=15, 5-fold) 0.610, below PCA (50 PCs of log1p HVGs) (0.900)." in text
    assert "- my_set: logistic-regression macro-F1 (5-fold) 0.700, below prior only (0.720)." in text
    assert "Leiden ARI 0.500, below" not in text  # ScGene wins there: no limit claimed
    for row in record["corpus"]:
        assert f"| {row['file']} | {row['cells']} | {row['licence']} |" in text
    assert 'AutoModel.from_pretrained("org/scgene-x", trust_remote_code=True)' in text


def test_the_card_shows_the_label_transfer_and_its_limit(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(scgene.DEFAULT_CHECKPOINT, checkpoint)
    record = json.loads((checkpoint / BUILD_RECORD).read_text())
    shipped = record["label_transfer"]["pbmc_3_chemistries"]
    assert shipped["reference"] == "pbmc3k" and shipped["genes_shared"] > 200
    ours = "ScGene embedding of the shared genes + logistic regression"
    record["label_transfer"] = {"query_set": {
        "reference": "ref_set", "cells": 100, "genes_shared": 250,
        ours: {"f1": 0.7, "accuracy": 0.8, "unknown_rate_known_types": 0.05, "unknown_rate_novel_types": 0.9},
        "expression + logistic regression": {"f1": 0.75, "accuracy": 0.85, "unknown_rate_known_types": float("nan")}}}
    (checkpoint / BUILD_RECORD).write_text(json.dumps(record))
    text = str(model_card(checkpoint))
    section = text[text.index("## Label transfer"):text.index("## Limits")]
    assert "**ref_set → query_set** (100 query cells, 250 genes shared)" in section
    assert f"| {ours} | 0.700 | 0.800 | 0.050 | 0.900 |" in section
    assert "| expression + logistic regression | 0.750 | 0.850 | – | – |" in section
    assert ("- Label transfer ref_set → query_set: macro-F1 0.700, below logistic regression on expression "
            "(0.750).") in text
    record["label_transfer"]["query_set"][ours]["f1"] = 0.8
    (checkpoint / BUILD_RECORD).write_text(json.dumps(record))
    assert "- Label transfer" not in str(model_card(checkpoint))


def test_push_is_one_commit_of_the_checkpoint_and_its_card_which_loads_offline_without_scgene(tmp_path):
    client = RecordingHubClient()
    push(scgene.DEFAULT_CHECKPOINT, "org/scgene-x", api=client, evaluations={"my_set": EVALUATION["scores"]})
    assert [call[0] for call in client.calls] == ["create_repo", "create_commit"]  # one commit
    files = client.calls[1][2]
    shipped = {p.name for p in scgene.DEFAULT_CHECKPOINT.iterdir() if p.is_file()}
    assert set(files) == shipped | {"README.md"}
    assert {"modeling_scgene.py", "configuration_scgene.py", "tokenization_scgene.py", "preprocessor_config.json",
            "model.safetensors"} <= set(files)
    card = files["README.md"].decode()
    assert "model-index" in card and "my_set" in card  # scgene's card, not transformers' default one

    populate_hub_cache(tmp_path / "hub", "org/scgene-x", files)
    cells = ad.read_h5ad(PBMC)[:6].copy()
    tokenizer = scgene.ScGeneTokenizer.from_pretrained(scgene.DEFAULT_CHECKPOINT)
    torch.save(dict(tokenizer(cells, return_tensors="pt")), tmp_path / "inputs.pt")
    cells.write_h5ad(tmp_path / "cells.h5ad")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["scgene"] = None  # scgene cannot be imported in this process
        import anndata, torch
        from transformers import AutoFeatureExtractor, AutoModel
        model = AutoModel.from_pretrained("org/scgene-x", trust_remote_code=True).eval()
        tokenizer = AutoFeatureExtractor.from_pretrained("org/scgene-x", trust_remote_code=True)
        inputs = tokenizer(anndata.read_h5ad(r"{tmp_path / 'cells.h5ad'}"), return_tensors="pt")
        expected = torch.load(r"{tmp_path / 'inputs.pt'}", weights_only=True)
        assert all(torch.equal(inputs[key], expected[key]) for key in expected)  # the checkpoint's own vocabulary
        with torch.no_grad():
            torch.save(model(**inputs).pooler_output, r"{tmp_path / 'pooled.pt'}")
        from transformers import pipeline
        embedder = pipeline("cell-embedding", model="org/scgene-x", trust_remote_code=True)
        assert type(embedder).__module__.startswith("transformers_modules"), type(embedder).__module__
        embedder(r"{tmp_path / 'cells.h5ad'}", max_tokens_per_batch=500).to_pickle(r"{tmp_path / 'table.pkl'}")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pooled = torch.load(tmp_path / "pooled.pt", weights_only=True).numpy()
    expected = scgene.embed(cells, progress=False)
    np.testing.assert_allclose(pooled, expected, atol=1e-5)
    table = pd.read_pickle(tmp_path / "table.pkl")  # the pipeline, from the pushed files only
    assert table.index.tolist() == cells.obs_names.tolist()
    np.testing.assert_allclose(table.to_numpy(), expected, atol=1e-5)
    config = json.loads(files["config.json"])
    assert config["custom_pipelines"]["cell-embedding"]["impl"] == "pipeline_scgene.CellEmbeddingPipeline"


def test_the_cell_embedding_pipeline_gives_scgene_embed_numbers(tmp_path):
    from transformers import pipeline

    cells = ad.read_h5ad(PBMC)[:40].copy()
    # a checkpoint saved by save_pretrained names no pipeline: with scgene imported, the registered task serves it
    plain = tmp_path / "plain"
    shutil.copytree(scgene.DEFAULT_CHECKPOINT, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["custom_pipelines"]
    (plain / "config.json").write_text(json.dumps(config))
    embedder = pipeline("cell-embedding", model=str(plain))
    assert isinstance(embedder, scgene.CellEmbeddingPipeline)
    np.testing.assert_array_equal(embedder(cells).to_numpy(), scgene.embed(cells.copy(), progress=False))
    # the shipped checkpoint names its own copy of the pipeline (remote code, as on the Hub)
    embedder = pipeline("cell-embedding", model=str(scgene.DEFAULT_CHECKPOINT), trust_remote_code=True)
    assert type(embedder).__name__ == "CellEmbeddingPipeline"
    table = embedder(cells)
    np.testing.assert_array_equal(table.to_numpy(), scgene.embed(cells.copy(), progress=False))  # same batching
    assert table.index.tolist() == cells.obs_names.tolist() and "X_scgene" not in cells.obsm  # input untouched
    cells.write_h5ad(tmp_path / "cells.h5ad")
    smaller_batches = embedder(str(tmp_path / "cells.h5ad"), max_tokens_per_batch=300, max_length=128)
    np.testing.assert_allclose(smaller_batches.to_numpy(), scgene.embed(cells, max_length=128, progress=False),
                               atol=1e-5)


def test_scgene_push_cli(tmp_path, monkeypatch, capsys):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps(EVALUATION))
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(scgene.DEFAULT_CHECKPOINT, checkpoint)
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    # --dry-run: the card goes to a new file, nothing is uploaded, and an existing file is never replaced
    card = tmp_path / "card.md"
    assert main(["push", str(checkpoint), "org/x", "--evaluation", f"my_set={evaluation}", "--dry-run", str(card)]) == 0
    assert "my_set" in card.read_text() and "Would upload to org/x" in capsys.readouterr().out
    assert main(["push", str(checkpoint), "org/x", "--dry-run", str(card)]) == 1
    assert "exists" in capsys.readouterr().err
    # a real push, through a recording client
    client = RecordingHubClient()
    monkeypatch.setattr("scgene.hub.HfApi", lambda token=None: client)
    assert main(["push", str(checkpoint), "org/x", "--evaluation", f"my_set={evaluation}"]) == 0
    assert "Pushed" in capsys.readouterr().out and client.calls[1][1] == "org/x"
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # the user's folder is untouched
    # --transfer: the leave-one-dataset-out runs on the card
    runs = write_transfer_runs(tmp_path / "runs.jsonl")
    assert main(["push", str(checkpoint), "org/x", "--transfer", str(runs), "--dry-run", str(tmp_path / "t.md")]) == 0
    assert "| ScGene (demo recipe) | 0.700 ± 0.014 (n=2) |" in (tmp_path / "t.md").read_text()
    # bad input: one-line errors that name the fix
    assert main(["push", str(checkpoint), "org/x", "--evaluation", str(evaluation)]) == 1
    assert "NAME=FILE.json" in capsys.readouterr().err
    assert main(["push", str(checkpoint), "org/x", "--transfer", str(tmp_path)]) == 1
    assert f"is a folder: pass the protocol's runs file, {tmp_path / 'runs.jsonl'}" in capsys.readouterr().err
    (checkpoint / "modeling_scgene.py").unlink()
    assert main(["push", str(checkpoint), "org/x"]) == 1
    assert "lacks the remote code" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "org/x"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def write_transfer_runs(path: Path) -> Path:
    """A runs.jsonl as scripts/leave_one_dataset_out.py writes it: the demo recipe on two left-out sets with two seeds
    (the baselines in each fold and seed's run, NaN where a metric was not measured), then a second variant on one."""

    def row(knn_f1, kmeans_ari):
        return dict.fromkeys(METRICS, float("nan")) | {"knn_f1": knn_f1, "kmeans_ari": kmeans_ari}

    def run(held_out, seed, variant, scores):
        return {"held_out": held_out, "seed": seed, "variant": variant, "steps": 300, "train_seconds": 12.5,
                "scores": scores, "info": {"n_cells": 300, "n_labels": 5, "label_key": "cell_type"}}

    runs = [run(held_out, seed, "demo recipe", {name: row(*values) for name, values in rows.items()} | {
                "expression (logistic regression on log1p HVGs)": dict.fromkeys(METRICS, float("nan")) | {"logreg_f1": 0.95}})
            for (held_out, seed), rows in TRANSFER_SCORES.items()]
    runs.append(run("pbmc_b", 0, "+ gene-panel views", {"ScGene": row(0.85, 0.65)}))
    path.write_text("".join(json.dumps(entry, default=float) + "\n" for entry in runs))
    return path


def test_the_card_shows_the_leave_one_dataset_out_runs_and_their_limits(tmp_path):
    runs = write_transfer_runs(tmp_path / "runs.jsonl")
    (tmp_path / "README.md").write_text(str(model_card(scgene.DEFAULT_CHECKPOINT, transfer=runs)))
    text = ModelCard.load(tmp_path / "README.md", ignore_metadata_errors=False).text
    section = text[text.index("## Leave-one-dataset-out transfer"):text.index("## Limits")]
    knn = section[section.index("**kNN macro-F1 (k=15, 5-fold)**"):section.index("**KMeans ARI**")]
    assert knn.splitlines()[2:9] == [
        "| embedding | pbmc_a | pbmc_b |", "|---|---|---|",
        "| ScGene (demo recipe) | 0.700 ± 0.014 (n=2) | 0.800 ± 0.000 (n=2) |",
        "| ScGene untrained | 0.500 ± 0.000 (n=2) | 0.700 ± 0.000 (n=2) |",
        "| prior only | 0.610 ± 0.014 (n=2) | 0.830 ± 0.014 (n=2) |",
        f"| {PCA} | 0.910 ± 0.014 (n=2) | 0.780 ± 0.000 (n=2) |",
        "| ScGene (+ gene-panel views) | – | 0.850 (n=1) |",
    ]
    assert "| ScGene (demo recipe) | 0.420 ± 0.028 (n=2) | 0.510 ± 0.014 (n=2) |" in section  # KMeans ARI
    assert "| expression (logistic regression on log1p HVGs) | 0.950 ± 0.000 (n=2) | 0.950 ± 0.000 (n=2) |" in section
    assert "**Leiden ARI**" not in section  # measured in no run: no empty table
    limits = text[text.index("## Limits"):text.index("## Training data")]
    where = "left out (leave-one-dataset-out, means over seeds): ScGene (demo recipe) below"
    assert [line for line in limits.splitlines() if "left out" in line] == [
        f"- pbmc_a {where} {PCA} on kNN macro-F1 (k=15, 5-fold) 0.700 < 0.910; KMeans ARI 0.420 < 0.700.",
        f"- pbmc_b {where} {PCA} on KMeans ARI 0.510 < 0.610.",
        f"- pbmc_b {where} prior only on kNN macro-F1 (k=15, 5-fold) 0.800 < 0.830.",
    ]  # the gene-panel variant beats both baselines where it was measured: no limit claimed for it
    assert "- lymph_node: kNN macro-F1 (k=15, 5-fold)" in limits  # the zero-shot limits stay


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, "no such file; pass the runs.jsonl"),
    ("", ValueError, "holds no runs"),
    ('{"held_out": "a", "seed": 0, "scores": {"ScGene": {"knn_f1": 0.5}}}\n{"held_out": "a", "seed": 1,',
     ValueError, "line 2: not JSON"),
    ('{"held_out": "a", "seed": 0}', ValueError, "line 1: no scores"),
    ('{"held_out": "a", "seed": 0, "scores": {"PCA": {"knn_f1": 0.5}}}', ValueError, "'scores' has no 'ScGene' row"),
    ('{"held_out": "a", "seed": 0, "scores": {"ScGene": {"knn_f1": "high"}}}', ValueError, "a score is not a number"),
])
def test_a_malformed_transfer_file_is_named_with_the_fix(tmp_path, content, error, message):
    runs = tmp_path / "runs.jsonl"
    if content is not None:
        runs.write_text(content)
    with pytest.raises(error, match=message):
        model_card(scgene.DEFAULT_CHECKPOINT, transfer=runs)
    with pytest.raises(IsADirectoryError, match="is a folder: pass the protocol's runs file"):
        model_card(scgene.DEFAULT_CHECKPOINT, transfer=tmp_path)


def test_a_training_record_counts_each_source_and_the_card_says_what_is_not_recorded(tmp_path):
    cells = ad.read_h5ad(PBMC)
    cells[:20].copy().write_h5ad(tmp_path / "first.h5ad")
    cells[20:30].copy().write_h5ad(tmp_path / "second.h5ad")
    tokenized = tmp_path / "tokenized"
    assert main(["tokenize", str(tmp_path / "first.h5ad"), str(tmp_path / "second.h5ad"), str(tokenized),
                 "--max-length", "64"]) == 0
    assert tokenized_corpus([tokenized], ["MIT"]) == [
        {"file": "first", "dataset": str(tokenized), "cells": 20, "licence": "MIT"},
        {"file": "second", "dataset": str(tokenized), "cells": 10, "licence": "MIT"}]
    assert {row["licence"] for row in tokenized_corpus([tokenized, tokenized])} == {"not recorded"}
    with pytest.raises(ValueError, match="3 licences for 2 datasets: give one licence for all"):
        tokenized_corpus([tokenized, tokenized], ["MIT", "CC-BY-4.0", "GPL-3.0"])
    assert git_commit(tmp_path) is None  # not a git checkout
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert git_commit() == head

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(scgene.DEFAULT_CHECKPOINT, checkpoint)
    record = training_record(corpus=tokenized_corpus([tokenized], ["MIT"]), pretraining_flags=[], steps=5, seed=None,
                             build_seconds=float("nan")) | {"git_commit": None}
    del record["machine"]
    (checkpoint / BUILD_RECORD).write_text(json.dumps(record))
    text = str(model_card(checkpoint))
    training = text[text.index("## Training data"):text.index("## Intended use")]
    assert "| first | 20 | MIT |" in training and "| second | 10 | MIT |" in training
    assert "- recipe (pretraining flags): not recorded" in training
    assert "- steps: 5; seed: not recorded" in training
    assert "- wall time of the build: not recorded; machine: not recorded" in training
    assert f"- scgene version: {scgene.__version__}; git commit: not recorded" in training
    assert "None" not in training and "nan" not in training
    assert "- Pretrained on 30 cells (see Training data): a small corpus, not an atlas-scale model." in text
    assert "prior read-out" not in training  # only a checkpoint that reads the prior out says so
    (checkpoint / BUILD_RECORD).write_text(json.dumps(record | {"prior_readout_weight": 7.25}))
    assert "- prior read-out: the cell embedding adds the prior, pooled like the gene states, with weight 7.250" in str(
        model_card(checkpoint))

    (checkpoint / BUILD_RECORD).unlink()
    text = str(model_card(checkpoint))
    assert "Not recorded: checkpoint has no build_record.json" in text and "## Training record" not in text
    assert "- The training corpus is not recorded." in text
