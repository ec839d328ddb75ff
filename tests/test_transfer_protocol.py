"""scripts/leave_one_dataset_out.py end to end on two real PBMC sets made from the shipped data (two disjoint halves of
PBMC 3k, the CellBench extract as unlabelled corpus): every fold pretrains on the other files only, the left-out set
is scored next to the baselines, annotation transfers from the other PBMC set, and finished folds are not redone."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess_heavy")  # not beside the FSDP test: both start several processes
def test_leave_one_dataset_out_on_two_pbmc_halves(tmp_path):
    pbmc = ad.read_h5ad(DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad")
    pbmc = pbmc[pbmc.obs["cell_type"].isin(["Naive CD4 T", "CD14+ Mono", "B", "NK", "CD8 T"])]
    data = tmp_path / "data"
    data.mkdir()
    pbmc[:300].copy().write_h5ad(data / "a.h5ad")
    pbmc[300:600].copy().write_h5ad(data / "b.h5ad")
    (data / "cellbench.h5ad").write_bytes((DATA / "cellbench_120cells_ensembl_subset.h5ad").read_bytes())
    sets = tmp_path / "sets.csv"
    sets.write_text("name,file,label_key,keep,batch_key,pbmc\npbmc_a,a.h5ad,cell_type,,,1\npbmc_b,b.h5ad,cell_type,,,1\n"
                    "cellbench,cellbench.h5ad,,,,0\n")
    labels = sorted(pbmc.obs["cell_type"].unique())
    label_map = tmp_path / "map.csv"
    pd.DataFrame([(name, label, label) for name in ("pbmc_a", "pbmc_b") for label in labels],
                 columns=["dataset", "label", "shared_type"]).to_csv(label_map, index=False)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "scripts" / "leave_one_dataset_out.py"), "--data", str(data), "--sets",
               str(sets), "--label-map", str(label_map), "--out", str(out), "--seeds", "0", "--steps", "2"]
    subprocess.run(command, check=True, capture_output=True)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["held_out"], r["variant"]) for r in runs] == [("pbmc_a", "demo recipe"), ("pbmc_b", "demo recipe")]
    for run in runs:
        # the fold's model never saw the left-out file: its corpus is the other half and the unlabelled file
        fold = out / f"without_{run['held_out']}"
        record = json.loads((fold / "prior" / "prior_record.json").read_text())
        other = "b.h5ad" if run["held_out"] == "pbmc_a" else "a.h5ad"
        assert sorted(Path(p).name for p in record["parameters"]["adata"]) == sorted([other, "cellbench.h5ad"])
        scores = run["scores"]
        assert set(scores) >= {"ScGene", "ScGene untrained", "prior only", "PCA (50 PCs of log1p HVGs)"}
        assert scores["PCA (50 PCs of log1p HVGs)"]["knn_f1"] > 0.6  # five PBMC types on real cells
        assert 0 <= scores["ScGene"]["label_pc1_corr_genes"] <= 1
        annotation = run["annotation"]
        assert annotation["reference"] != run["held_out"] and annotation["cells"] == 300
        assert annotation["expression + logistic regression"]["f1"] > 0.6
        # refitted without the reference's B cells: the query's B cells are the type it lacks
        query = pbmc[:300] if run["held_out"] == "pbmc_a" else pbmc[300:600]
        assert annotation["unknown_rule"] == "distance; kNN on unscaled PCs" and annotation["genes_shared"] > 1500  # two halves of one file
        for annotator in ("ScGene embedding of the shared genes + logistic regression",
                          "ScGene embedding of all genes + logistic regression", "expression + logistic regression",
                          "reference 50 PCs + kNN"):  # whether "Unknown" catches them is measured, not assumed
            rates = annotation[annotator]
            assert rates["novel_cells"] == (query.obs["cell_type"] == "B").sum() > 0
            assert 0 <= rates["unknown_rate_known_types"] <= 1 and 0 <= rates["unknown_rate_novel_types"] <= 1
    table = (out / "table.md").read_text()
    assert table.startswith("**knn_f1**") and "| embedding | pbmc_a | pbmc_b |" in table
    assert "| ScGene (demo recipe, 2 steps) |" in table and "reference 50 PCs + kNN" in table
    assert "Unknown, novel types" in table
    # finished folds are skipped; another variant adds its rows and reuses the baselines
    subprocess.run(command, check=True, capture_output=True)
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
    subprocess.run(command + ["--variant", "+ gene-panel views", "--held-out", "pbmc_b"], check=True,
                   capture_output=True)
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert last["variant"] == "+ gene-panel views" and list(last["scores"]) == ["ScGene"]
    row = next(line for line in (out / "table.md").read_text().splitlines()
               if line.startswith("| ScGene (+ gene-panel views, 2 steps) |"))
    assert row.split(" | ")[1] == "–" and row.split(" | ")[2] != "–"  # scored on pbmc_b only
    # the same fold checkpoints read on the left-out set's HVGs: rows of their own, no retraining
    models = sorted(path.stat().st_mtime for path in out.glob("without_*/model_seed0*/model.safetensors"))
    assert len(models) == 3  # two folds of the demo recipe, one of the gene-panel variant
    subprocess.run(command + ["--genes", "hvg", "--held-out", "pbmc_a"], check=True, capture_output=True)
    hvg = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert hvg["genes"] == "hvg" and hvg["held_out"] == "pbmc_a" and "annotation" not in hvg
    assert set(hvg["scores"]) == {"ScGene", "ScGene untrained, read on the set's HVGs",
                                  "prior only, read on the set's HVGs"}
    assert sorted(path.stat().st_mtime for path in out.glob("without_*/model_seed0*/model.safetensors")) == models
    assert "| ScGene (demo recipe, 2 steps, read on the set's HVGs) |" in (out / "table.md").read_text()
    # every embedding, the baselines too, reading the left-out set thinned to its median depth: rows of their own
    subprocess.run(command + ["--common-depth", "0.5", "--held-out", "pbmc_a"], check=True, capture_output=True)
    thinned = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    readout = "read at the set's 50th-percentile depth"
    assert thinned["depth_quantile"] == 0.5 and "annotation" not in thinned and "genes" not in thinned
    assert set(thinned["scores"]) == {"ScGene"} | {f"{row}, {readout}" for row in runs[0]["scores"] if row != "ScGene"}
    pca = "PCA (50 PCs of log1p HVGs)"
    assert thinned["scores"][f"{pca}, {readout}"]["knn_f1"] != runs[0]["scores"][pca]["knn_f1"]  # other counts
    assert sorted(path.stat().st_mtime for path in out.glob("without_*/model_seed0*/model.safetensors")) == models
    assert f"| ScGene (demo recipe, 2 steps, {readout}) |" in (out / "table.md").read_text()
    failed = subprocess.run(command + ["--common-depth", "10"], capture_output=True, text=True)
    assert failed.returncode == 2 and "--common-depth 10.0: pass a quantile between 0 and 1" in failed.stderr
    # the prior read out, with a weight fitted on the fold's corpus (not the left-out set): the model and the untrained
    # copy get rows of their own; the other baselines are the plain run's
    subprocess.run(command + ["--prior-readout", "--held-out", "pbmc_a"], check=True, capture_output=True)
    read_out = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert read_out["prior_readout_weight"] > 0 and "annotation" not in read_out
    assert set(read_out["scores"]) == {"ScGene", "ScGene untrained, + prior read-out"}
    assert read_out["scores"]["ScGene"]["knn_f1"] != runs[0]["scores"]["ScGene"]["knn_f1"] or (
        read_out["scores"]["ScGene"]["silhouette"] != runs[0]["scores"]["ScGene"]["silhouette"])
    assert "| ScGene (demo recipe, 2 steps, + prior read-out) |" in (out / "table.md").read_text()
    assert sorted(path.stat().st_mtime for path in out.glob("without_*/model_seed0*/model.safetensors")) == models
    # a learning curve in cells: the fold pretrains, prior included, on half of each corpus file's cells (rows of
    # their own, with their own untrained and prior baselines); the shares are nested
    subprocess.run(command + ["--corpus-fraction", "0.5", "--held-out", "pbmc_a"], check=True, capture_output=True)
    half = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    share = "50% of the corpus"
    assert half["corpus_fraction"] == 0.5 and "annotation" not in half
    assert set(half["scores"]) == {"ScGene", f"ScGene untrained, {share}", f"prior only, {share}"}
    record = json.loads((out / "without_pbmc_a_50pct_of_corpus" / "prior" / "prior_record.json").read_text())
    subsampled = [ad.read_h5ad(path) for path in record["parameters"]["adata"]]
    assert sorted(Path(p).name for p in record["parameters"]["adata"]) == ["b.h5ad", "cellbench.h5ad"]
    for cells, original in zip(subsampled, [data / Path(p).name for p in record["parameters"]["adata"]]):
        whole = ad.read_h5ad(original)
        assert cells.n_obs == round(whole.n_obs / 2) and set(cells.obs_names) < set(whole.obs_names)
    assert f"| ScGene (demo recipe, 2 steps, {share}) |" in (out / "table.md").read_text()
    spec = importlib.util.spec_from_file_location("leave_one_dataset_out", REPO / "scripts" / "leave_one_dataset_out.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    quarter = ad.read_h5ad(script.corpus_subsample(data / "b.h5ad", 0.25, out))
    assert set(quarter.obs_names) < set(next(c for c in subsampled if c.n_obs == 150).obs_names)
    failed = subprocess.run(command + ["--corpus-fraction", "1.5"], capture_output=True, text=True)
    assert failed.returncode == 2 and "--corpus-fraction 1.5: pass a share between 0 and 1" in failed.stderr
