"""Publishing (`scgene.hub`, `scgene push`): a model card made from measurements that parses back, one Hub commit that
holds the whole checkpoint and that card (the Hub client's calls recorded, nothing sent), and the pushed files loading
through `AutoModel` / `AutoFeatureExtractor` from an offline cache in a process where scgene cannot be imported."""

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
from scgene.hub import model_card, push

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
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
    # bad input: one-line errors that name the fix
    assert main(["push", str(checkpoint), "org/x", "--evaluation", str(evaluation)]) == 1
    assert "NAME=FILE.json" in capsys.readouterr().err
    (checkpoint / "modeling_scgene.py").unlink()
    assert main(["push", str(checkpoint), "org/x"]) == 1
    assert "lacks the remote code" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "org/x"]) == 1
    assert "is not a folder" in capsys.readouterr().err
