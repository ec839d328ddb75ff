"""Transfer, not recall: leave one labelled dataset out, pretrain on the others, score zero-shot on the one left out.

For each labelled human set (PBMC 3k, CellBench, the 3-chemistry PBMC set, lymph node) in turn, the others (plus the
unlabelled celltypist sample) are the fold's corpus. Each fold does what a user would do:
`scgene tokenize` the corpus, `scgene build-prior` on it (co-expression pooled over its files, the knowledge of every
vocabulary gene), `examples/pretrain_masked_expression.py` with the recipe, then `scgene.evaluate` on the left-out
set (never seen by the model, its prior or its annotator) next to 50 PCs, logistic regression, the prior alone and
the untrained model on the same cells. Where the left-out set is a PBMC set, annotation transfer is scored too: a
logistic regression on the other PBMC set's embeddings (the reference, labels mapped to shared types by
`scripts/pbmc_label_map.csv`) labels the left-out cells, against logistic regression on the reference's expression
and kNN on the reference's 50 PCs.

Every finished (fold, seed) appends to OUT/runs.jsonl and is skipped when the script runs again; OUT/table.md is the
summary (mean ± sd over seeds).

    python scripts/leave_one_dataset_out.py --data ../shared/data/scrna --out outputs/transfer --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
LABEL_MAP = REPO / "scripts" / "pbmc_label_map.csv"
# The recipe of `make demo` (examples/demo.py): masked expression plus the contrastive objective on count views.
RECIPE = ["--hidden_size", "128", "--norm_position", "pre", "--pooling", "mean", "--contrastive_loss_weight", "1",
          "--warmup_steps", "20", "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0",
          "--learning_rate", "1e-3", "--per_device_train_batch_size", "32"]
SHOWN = ["knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari", "label_pc1_corr_genes", "pc1_corr_genes"]


@dataclass(frozen=True)
class LabelledSet:
    name: str
    file: str
    label_key: str
    keep: tuple[str, str] | None = None  # (obs column, value) of the cells to use
    batch_key: str | None = None
    pbmc: bool = False  # annotation transfer is scored between PBMC sets


SETS = (
    LabelledSet("pbmc3k", "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad", "cell_type", pbmc=True),
    LabelledSet("cellbench", "cellbench_5cellline_1408cells_counts.h5ad", "cell_line", ("demuxlet_cls", "SNG"),
                batch_key="batch"),
    LabelledSet("pbmc_3_chemistries", "symphony_pbmcs_1200cells_counts.h5ad", "cell_type", batch_key="batch",
                pbmc=True),
    LabelledSet("lymph_node", "lymph_node_ref_330cells_counts.h5ad", "cell_type"),
)
UNLABELLED = ("celltypist_sample_559cells_counts.h5ad",)


def run(command: list) -> None:
    print("$ " + " ".join(map(str, command)), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def prepared_file(data: Path, labelled: LabelledSet, out: Path) -> Path:
    """The set's cells as the protocol uses them: the file itself, or (with `keep`) a filtered copy written once."""
    if labelled.keep is None:
        return data / labelled.file
    target = out / "data" / f"{labelled.name}.h5ad"
    if not target.exists():
        column, value = labelled.keep
        adata = anndata.read_h5ad(data / labelled.file)
        target.parent.mkdir(parents=True, exist_ok=True)
        adata[adata.obs[column].astype(str) == value].copy().write_h5ad(target)
    return target


def build_fold(held_out: LabelledSet, files: dict[str, Path], unlabelled: list[Path], out: Path, seed: int,
               steps: int) -> Path:
    """Tokenize the fold's corpus, build its prior (once per fold) and pretrain the seed's model; the checkpoint."""
    scgene = [sys.executable, "-m", "scgene.cli"]
    fold = out / f"without_{held_out.name}"
    corpus = [path for name, path in files.items() if name != held_out.name] + unlabelled
    if not (fold / "tokenized").exists():
        run(scgene + ["tokenize", *corpus, fold / "tokenized", "--max-length", "256"])
    if not (fold / "prior" / "prior_record.json").exists():
        run(scgene + ["build-prior", "--adata", *corpus, "--out", fold / "prior", "--hidden-size", "128",
                      "--gene2vec-dim", "64", "--threshold", "0.3", "--no-progress"])
    checkpoint = fold / f"model_seed{seed}"
    if not (checkpoint / "model.safetensors").exists():
        run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", fold / "tokenized",
             "--prior", fold / "prior" / "gene_prior.safetensors", "--output_dir", checkpoint, *RECIPE,
             "--max_steps", steps, "--seed", seed, "--use_cpu", "--report_to", "none", "--logging_steps", "50",
             "--save_strategy", "no", "--disable_tqdm", "true"])
    return checkpoint


def mapped_labels(adata, labelled: LabelledSet, label_map: pd.DataFrame) -> np.ndarray:
    """The set's labels as the shared types of the label map ("" where the map has none)."""
    table = label_map[label_map["dataset"] == labelled.name].set_index("label")["shared_type"]
    return adata.obs[labelled.label_key].astype(str).map(table).fillna("").to_numpy()


def annotation_transfer(reference: anndata.AnnData, query: anndata.AnnData, reference_labels, query_labels,
                        checkpoint: Path, seed: int) -> dict:
    """Macro-F1 / accuracy on the query cells of types the reference has, for three annotators trained on the
    reference only: logistic regression on ScGene embeddings, on log1p expression of the shared genes, and kNN on the
    reference's 50 PCs (the query projected onto them)."""
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from scgene import embed

    known = np.isin(query_labels, np.unique(reference_labels)) & (query_labels != "")
    train = reference_labels != ""
    embedded = {name: embed(cells, checkpoint, key_added=None, progress=False)
                for name, cells in (("reference", reference), ("query", query))}
    genes = reference.var_names.intersection(query.var_names)

    def log1p(cells):
        view = anndata.AnnData(cells[:, genes].X.astype(np.float32))
        sc.pp.normalize_total(view, target_sum=1e4)
        sc.pp.log1p(view)
        return view.X.toarray() if hasattr(view.X, "toarray") else np.asarray(view.X)

    expression = {"reference": log1p(reference), "query": log1p(query)}
    hvg = np.argsort(-expression["reference"].var(axis=0))[:2000]
    pca = make_pipeline(StandardScaler(), PCA(n_components=50, random_state=seed)).fit(expression["reference"][:, hvg])

    def logistic():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

    annotators = {
        "ScGene embedding + logistic regression": (logistic(), embedded),
        "expression + logistic regression": (logistic(), expression),
        "reference 50 PCs + kNN": (KNeighborsClassifier(15), {k: pca.transform(v[:, hvg]) for k, v in expression.items()}),
    }
    scores = {}
    for name, (classifier, features) in annotators.items():
        classifier.fit(features["reference"][train], reference_labels[train])
        predicted = classifier.predict(features["query"][known])
        scores[name] = {"f1": float(f1_score(query_labels[known], predicted, average="macro")),
                        "accuracy": float(accuracy_score(query_labels[known], predicted))}
    scores["cells"] = int(known.sum())
    scores["genes_shared"] = int(len(genes))
    return scores


def summary(log: Path) -> str:
    """Per left-out set: ScGene and the baselines, mean ± sd over seeds; then the annotation transfer."""
    runs = [json.loads(line) for line in log.read_text().splitlines()]

    def cell(values):
        values = np.array([v for v in values if v is not None and not np.isnan(v)], float)
        if not len(values):
            return "–"
        return f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else "")

    lines = ["| left out | embedding | seeds | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 3) + "|"]
    for held_out in dict.fromkeys(r["held_out"] for r in runs):
        fold = [r for r in runs if r["held_out"] == held_out]
        for row in fold[0]["scores"]:
            values = {m: cell(r["scores"][row].get(m) for r in fold) for m in SHOWN}
            lines.append(f"| {held_out} | {row} | {len(fold)} | " + " | ".join(values[m] for m in SHOWN) + " |")
    annotation = [r for r in runs if r.get("annotation")]
    if annotation:
        lines += ["", "Annotation transfer (reference: the other PBMC set; macro-F1 / accuracy on the query's cells of "
                  "types the reference has):", "", "| query | annotator | seeds | macro-F1 | accuracy |",
                  "|---|---|---|---|---|"]
        for held_out in dict.fromkeys(r["held_out"] for r in annotation):
            fold = [r for r in annotation if r["held_out"] == held_out]
            for name in (k for k in fold[0]["annotation"] if isinstance(fold[0]["annotation"][k], dict)):
                lines.append(f"| {held_out} | {name} | {len(fold)} | "
                             f"{cell(r['annotation'][name]['f1'] for r in fold)} | "
                             f"{cell(r['annotation'][name]['accuracy'] for r in fold)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scrna")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "transfer")
    parser.add_argument("--held-out", nargs="*", default=[s.name for s in SETS], choices=[s.name for s in SETS])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from scgene.evaluation import EvaluationSettings, evaluate

    files = {labelled.name: prepared_file(args.data, labelled, args.out) for labelled in SETS}
    unlabelled = [args.data / name for name in UNLABELLED]
    label_map = pd.read_csv(LABEL_MAP)
    log = args.out / "runs.jsonl"
    done = {(r["held_out"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()
    by_name = {labelled.name: labelled for labelled in SETS}
    for seed in args.seeds:
        for name in args.held_out:
            if (name, seed) in done:
                continue
            held_out = by_name[name]
            start = time.perf_counter()
            checkpoint = build_fold(held_out, files, unlabelled, args.out, seed, args.steps)
            train_seconds = time.perf_counter() - start
            query = anndata.read_h5ad(files[name])
            report = evaluate(query, checkpoint, label_key=held_out.label_key, batch_key=held_out.batch_key,
                              settings=EvaluationSettings(seed=seed), progress=False)
            entry = {"held_out": name, "seed": seed, "train_seconds": round(train_seconds, 1),
                     "scores": {row: report.table.loc[row].to_dict() for row in report.table.index},
                     "info": report.info}
            if held_out.pbmc:
                reference_set = next(s for s in SETS if s.pbmc and s.name != name)
                reference = anndata.read_h5ad(files[reference_set.name])
                entry["annotation"] = annotation_transfer(
                    reference, query, mapped_labels(reference, reference_set, label_map),
                    mapped_labels(query, held_out, label_map), checkpoint, seed) | {"reference": reference_set.name}
            with log.open("a") as handle:
                handle.write(json.dumps(entry, default=float) + "\n")
            (args.out / "table.md").write_text(summary(log))
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
