"""Transfer, not recall: leave one labelled dataset out, pretrain on the others, score zero-shot on the one left out.

For each labelled human set (PBMC 3k, CellBench, the 3-chemistry PBMC set, lymph node) in turn, the others (plus the
unlabelled celltypist sample) are the fold's corpus. Each fold does what a user would do:
`scgene tokenize` the corpus, `scgene build-prior` on it (co-expression pooled over its files, the knowledge of every
vocabulary gene), `examples/pretrain_masked_expression.py` with the recipe, then `scgene.evaluate` on the left-out
set (never seen by the model, its prior or its annotator) next to 50 PCs, logistic regression, the prior alone and
the untrained model on the same cells. Where the left-out set is a PBMC set, annotation transfer is scored too: a
logistic regression on the other PBMC set's embeddings (the reference, labels mapped to shared types by
`scripts/pbmc_label_map.csv`) labels the left-out cells, against logistic regression on the reference's expression
and kNN on the reference's 50 PCs; and, refitted without the reference's B cells, how often each calls cells
"Unknown" (calibrated confidence below 0.5) among types the reference has and among those it lacks.

Every finished (fold, seed) appends to OUT/runs.jsonl and is skipped when the script runs again; OUT/table.md is the
summary (mean ± sd over seeds), which `scgene push DIR ORG/NAME --transfer OUT/runs.jsonl` puts on the model card.

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

from scgene.hub import LABEL_TRANSFER_ROW
from scgene.transfer import (
    DEFAULT_STEPS,
    DEFAULT_VARIANT,
    RUNS_FILE,
    corpus_share,
    mean_sd,
    metric_tables,
    read_runs,
    readouts,
    recipe_name,
    run_recipe,
)

REPO = Path(__file__).resolve().parents[1]
LABEL_MAP = REPO / "scripts" / "pbmc_label_map.csv"
SETS = REPO / "scripts" / "transfer_sets.csv"  # the labelled human sets of ../shared/data/scrna, and one unlabelled
# The recipe of `make demo` (examples/demo.py): masked expression plus the contrastive objective on count views.
RECIPE = ["--hidden_size", "128", "--norm_position", "pre", "--pooling", "mean", "--contrastive_loss_weight", "1",
          "--warmup_steps", "20", "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0",
          "--learning_rate", "1e-3", "--per_device_train_batch_size", "32"]
# Variants of the recipe, each a row of the ablation: name -> extra pretraining flags.
VARIANTS = {
    DEFAULT_VARIANT: [],
    "+ gene-panel views": ["--panel_views_min_fraction", "0.3"],
    "+ expression-weighted pooling": ["--pooling", "weighted_mean"],
    "+ expression-weighted pooling, gene-panel views": ["--pooling", "weighted_mean", "--panel_views_min_fraction", "0.3"],
    # seed 001's encoder (gene branch + regulated expression branch): what `scgene.regulation` reads
    "+ expression-weighted pooling, dual-branch": ["--pooling", "weighted_mean", "--encoder_type", "dual_branch"],
}
SHOWN = ["knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari", "label_pc1_corr_genes", "pc1_corr_genes"]


@dataclass(frozen=True)
class LabelledSet:
    name: str
    file: str
    label_key: str
    keep: tuple[str, str] | None = None  # (obs column, value) of the cells to use
    batch_key: str | None = None
    pbmc: bool = False  # annotation transfer is scored between PBMC sets


def read_sets(path: Path) -> tuple[list[LabelledSet], list[str]]:
    """The protocol's sets (a CSV: name, file, label_key, keep as COLUMN=VALUE, batch_key, pbmc as 0/1): the labelled
    ones, and the files without a label_key, which only join every fold's pretraining corpus."""
    table = pd.read_csv(path, dtype=str).fillna("")
    labelled = [LabelledSet(row["name"], row["file"], row["label_key"],
                            tuple(row["keep"].split("=", 1)) if row["keep"] else None, row["batch_key"] or None,
                            row["pbmc"] == "1")
                for _, row in table.iterrows() if row["label_key"]]
    return labelled, [row["file"] for _, row in table.iterrows() if not row["label_key"]]


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


def checkpoint_path(folder: Path, seed: int, variant: str, steps: int) -> Path:
    name = recipe_name(variant, steps)
    suffix = "" if name == DEFAULT_VARIANT else "_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return folder / f"model_seed{seed}{suffix}"


def pretrain_on(corpus: list[Path], folder: Path, seed: int, steps: int, variant: str) -> Path:
    """What a user does with a corpus: `scgene tokenize` it and `scgene build-prior` on it (each once per folder), then
    pretrain the seed's model with the recipe and the variant's flags; returns the checkpoint."""
    scgene = [sys.executable, "-m", "scgene.cli"]
    if not (folder / "tokenized").exists():
        run(scgene + ["tokenize", *corpus, folder / "tokenized", "--max-length", "256"])
    if not (folder / "prior" / "prior_record.json").exists():
        run(scgene + ["build-prior", "--adata", *corpus, "--out", folder / "prior", "--hidden-size", "128",
                      "--gene2vec-dim", "64", "--threshold", "0.3", "--no-progress"])
    checkpoint = checkpoint_path(folder, seed, variant, steps)
    if not (checkpoint / "model.safetensors").exists():
        run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", folder / "tokenized",
             "--prior", folder / "prior" / "gene_prior.safetensors", "--output_dir", checkpoint, *RECIPE,
             "--max_steps", steps, "--seed", seed, "--use_cpu", "--report_to", "none", "--logging_steps", "50",
             "--save_strategy", "no", "--disable_tqdm", "true", *VARIANTS[variant]])  # a variant's flags come last
    return checkpoint


def corpus_subsample(path: Path, fraction: float, out: Path) -> Path:
    """The first `fraction` of the file's cells in a fixed random order (seed 0), in file order, written once to
    OUT/data/corpus_<pct>pct/: the shares of a learning curve are nested (12.5% of the cells are among the 25%)."""
    from scgene.fileio import atomic_path

    target = out / "data" / f"corpus_{100 * fraction:g}pct" / path.name
    if not target.exists():
        adata = anndata.read_h5ad(path)
        order = np.random.default_rng(0).permutation(adata.n_obs)
        keep = np.sort(order[: max(1, round(fraction * adata.n_obs))])
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as staging:
            adata[keep].copy().write_h5ad(staging)
    return target


def fold_corpus(held_out: str, files: dict[str, Path], unlabelled: list[Path], out: Path,
                corpus_fraction: float | None = None) -> list[Path]:
    """The files a fold pretrains on: every set but the one left out, and the unlabelled files (with
    `corpus_fraction`, that share of each file's cells)."""
    corpus = [path for name, path in files.items() if name != held_out] + unlabelled
    return [corpus_subsample(path, corpus_fraction, out) for path in corpus] if corpus_fraction else corpus


def build_fold(held_out: LabelledSet, files: dict[str, Path], unlabelled: list[Path], out: Path, seed: int,
               steps: int, variant: str, corpus_fraction: float | None = None) -> Path:
    """The fold's checkpoint: pretrained on every set but the one left out (with `corpus_fraction`, on that share
    of each file's cells, the prior built on the same share)."""
    folder = out / f"without_{held_out.name}"
    if corpus_fraction:
        folder = folder.with_name(f"{folder.name}_{100 * corpus_fraction:g}pct_of_corpus")
    return pretrain_on(fold_corpus(held_out.name, files, unlabelled, out, corpus_fraction), folder, seed, steps,
                       variant)


def thinned(adata: anndata.AnnData, quantile: float, seed: int) -> anndata.AnnData:
    """A copy of `adata` with each cell's counts thinned binomially to at most the `quantile` of the cells' count
    totals (scanpy's downsample_counts; shallower cells are kept as they are)."""
    import scanpy as sc

    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    target = int(np.quantile(totals, quantile))
    return sc.pp.downsample_counts(adata, counts_per_cell=target, random_state=seed, copy=True)


def mapped_labels(adata, labelled: LabelledSet, label_map: pd.DataFrame) -> np.ndarray:
    """The set's labels as the shared types of the label map ("" where the map has none)."""
    table = label_map[label_map["dataset"] == labelled.name].set_index("label")["shared_type"]
    return adata.obs[labelled.label_key].astype(str).map(table).fillna("").to_numpy()


ANNOTATORS = (LABEL_TRANSFER_ROW,  # what scgene.transfer_labels does
              "ScGene embedding of all genes + logistic regression",
              "expression + logistic regression", "reference 50 PCs + kNN")
WITHHELD_TYPE = "B"  # left out of the reference once, so the query's cells of it are a type the reference lacks
ANNOTATION_RULE = "distance; kNN on unscaled PCs"  # how annotation is scored; runs scored otherwise are re-scored


def annotation_transfer(reference: anndata.AnnData, query: anndata.AnnData, reference_labels, query_labels,
                        checkpoint: Path, seed: int) -> dict:
    """Four annotators trained on the reference only (`scgene.label_transfer.ReferenceAnnotator`): logistic regression
    on ScGene embeddings of the genes both files measure (what `scgene.transfer_labels` does) and of all of each file's
    genes, on log1p expression of the shared genes, and kNN on the reference's 50 PCs (the query projected onto them).
    Macro-F1 / accuracy of the best type on the query cells of types the reference has; then, trained once more without
    the reference's WITHHELD_TYPE cells, the share of query cells called "Unknown" (farther from the reference than the
    0.95 quantile of held-out reference cells, in the annotator's own features) among cells of types the reference has
    and among cells of types it lacks (WITHHELD_TYPE and any the reference never had)."""
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from scgene import embed
    from scgene.inference import UNKNOWN_LABEL
    from scgene.label_transfer import ReferenceAnnotator, shared_gene_ids
    from scgene.tokenization_scgene import ScGeneTokenizer

    shared_ids = shared_gene_ids(query, reference, ScGeneTokenizer.from_pretrained(checkpoint))
    embedded = {genes: {name: embed(cells, checkpoint, key_added=None, progress=False, **options)
                        for name, cells in (("reference", reference), ("query", query))}
                for genes, options in (("shared", {"genes": shared_ids}), ("all", {}))}
    genes = reference.var_names.intersection(query.var_names)

    def log1p(cells):
        view = anndata.AnnData(cells[:, genes].X.astype(np.float32))
        sc.pp.normalize_total(view, target_sum=1e4)
        sc.pp.log1p(view)
        return view.X.toarray() if hasattr(view.X, "toarray") else np.asarray(view.X)

    expression = {"reference": log1p(reference), "query": log1p(query)}
    hvg = np.argsort(-expression["reference"].var(axis=0))[:2000]
    pca = make_pipeline(StandardScaler(), PCA(n_components=50, random_state=seed)).fit(expression["reference"][:, hvg])
    annotators = {  # name: (classifier, features, standardised); PCs keep their scale, as kNN on PCs always reads them
        ANNOTATORS[0]: ("logistic", embedded["shared"], True),
        ANNOTATORS[1]: ("logistic", embedded["all"], True),
        ANNOTATORS[2]: ("logistic", expression, True),
        ANNOTATORS[3]: ("knn", {k: pca.transform(v[:, hvg]) for k, v in expression.items()}, False),
    }
    scores = {}
    for name, (classifier, features, standardize) in annotators.items():
        result = {}
        for withheld in ("", WITHHELD_TYPE):
            train = (reference_labels != "") & (reference_labels != withheld)
            annotator = ReferenceAnnotator(classifier, seed=seed, standardize=standardize)
            annotator.fit(features["reference"][train], reference_labels[train])
            calls = annotator.predict(features["query"])
            known = np.isin(query_labels, annotator.classes_) & (query_labels != "")
            if not withheld:  # the best type, whether or not the cell is far from the reference
                result |= {"f1": float(f1_score(query_labels[known], calls.best[known], average="macro")),
                           "accuracy": float(accuracy_score(query_labels[known], calls.best[known]))}
                continue
            unknown = calls.labels == UNKNOWN_LABEL
            novel = ~known & (query_labels != "")
            result |= {"unknown_rate_known_types": float(unknown[known].mean()),
                       "unknown_rate_novel_types": float(unknown[novel].mean()), "novel_cells": int(novel.sum())}
        scores[name] = result
    scores["cells"] = int((np.isin(query_labels, np.unique(reference_labels)) & (query_labels != "")).sum())
    scores["genes_shared"] = int(len(shared_ids))
    scores["unknown_rule"] = ANNOTATION_RULE
    return scores


def summary(log: Path) -> str:
    """Per metric, a table of ScGene's recipes and the baselines by left-out set (mean ± sd over seeds, and their
    number: `scgene.transfer.metric_tables`, which the model card shows too); then the annotation transfer."""
    runs = read_runs(log)
    lines = metric_tables(runs, {metric: metric for metric in SHOWN})
    annotation = [r for r in runs if r.get("annotation")]
    if annotation:
        lines += ["", "Annotation transfer (reference: the other PBMC set; macro-F1 / accuracy on the query's cells of "
                  "types the reference has; \"Unknown\" rates (farther from the reference than 95% of held-out reference cells) with the "
                  f"reference's {WITHHELD_TYPE} cells withheld, on cells of types it has / lacks):", "",
                  "| query | annotator | seeds | macro-F1 | accuracy | Unknown, known types | Unknown, novel types |",
                  "|---|---|---|---|---|---|---|"]
        for held_out in dict.fromkeys(r["held_out"] for r in annotation):
            fold = [r for r in annotation if r["held_out"] == held_out]
            scores = {}
            for r in fold:
                for name, value in r["annotation"].items():
                    if isinstance(value, dict):  # baseline annotators: once per seed, whatever the variant
                        label = f"{name} ({run_recipe(r)})" if name.startswith("ScGene") else name
                        scores.setdefault(label, {})[r["seed"]] = value
            for name, by_seed in scores.items():
                values = list(by_seed.values())
                columns = ("f1", "accuracy", "unknown_rate_known_types", "unknown_rate_novel_types")
                lines.append(f"| {held_out} | {name} | {len(values)} | "
                             + " | ".join(mean_sd(v.get(c) for v in values) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "scrna")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "transfer")
    parser.add_argument("--sets", type=Path, default=SETS, help="CSV of the sets (see scripts/transfer_sets.csv)")
    parser.add_argument("--label-map", type=Path, default=LABEL_MAP, help="CSV: dataset, label, shared_type")
    parser.add_argument("--held-out", nargs="*", help="names of the sets to leave out (default: every labelled set)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=list(VARIANTS))
    parser.add_argument("--genes", choices=["all", "hvg"], default="all",
                        help="hvg: the models (trained, untrained, prior) read only the left-out set's highly variable "
                             "genes, those the PCA baseline reads; its own rows, on the same fold checkpoints")
    parser.add_argument("--common-depth", type=float, metavar="QUANTILE",
                        help="every embedding, baselines included, reads the left-out set with each cell thinned "
                             "(scanpy's downsample_counts) to this quantile of the set's count totals, e.g. 0.1; the "
                             "depth metrics still read the cells' own depth. Rows of their own, on the same checkpoints")
    parser.add_argument("--prior-readout", action="store_true",
                        help="the model's cell embedding adds its prior, pooled the same way, with the weight that "
                             "scgene.fit_prior_readout_weight fits on the fold's corpus (the untrained model too); "
                             "rows of their own, on the same checkpoints")
    parser.add_argument("--corpus-fraction", type=float, metavar="SHARE",
                        help="a learning curve in cells: each fold pretrains (prior included) on this share of every "
                             "corpus file's cells, e.g. 0.25 (nested shares); rows of their own")
    parser.add_argument("--rescore-annotation", action="store_true",
                        help="first re-score the annotation transfer of finished runs scored by an older rule")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from scgene import fit_prior_readout_weight
    from scgene.evaluation import EvaluationSettings, evaluate
    from scgene.fileio import atomic_path
    from scgene.inference import load_model

    sets, unlabelled_files = read_sets(args.sets)
    files = {labelled.name: prepared_file(args.data, labelled, args.out) for labelled in sets}
    unlabelled = [args.data / name for name in unlabelled_files]
    label_map = pd.read_csv(args.label_map)
    log = args.out / RUNS_FILE
    runs = read_runs(log) if log.exists() else []
    done = {(r["held_out"], r["seed"], run_recipe(r)) for r in runs}
    if args.common_depth is not None and not 0 < args.common_depth < 1:
        parser.error(f"--common-depth {args.common_depth}: pass a quantile between 0 and 1, e.g. 0.1")
    if args.corpus_fraction is not None and not 0 < args.corpus_fraction < 1:
        parser.error(f"--corpus-fraction {args.corpus_fraction}: pass a share between 0 and 1, e.g. 0.25")
    corpus = {"corpus_fraction": args.corpus_fraction} if args.corpus_fraction else {}
    # baselines once per fold, seed and read-out (reading the HVGs leaves PCA and logistic regression as they are)
    scored_baselines = {(r["held_out"], r["seed"], r.get("genes", "all"), r.get("depth_quantile"),
                         bool(r.get("prior_readout_weight")), r.get("corpus_fraction")) for r in runs}
    read = {"genes": "hvg"} if args.genes == "hvg" else {}
    readout = {"depth_quantile": args.common_depth} if args.common_depth else {}
    by_name = {labelled.name: labelled for labelled in sets}
    unknown = set(args.held_out or []) - set(by_name)
    if unknown:
        parser.error(f"--held-out {sorted(unknown)}: not labelled sets of {args.sets} ({sorted(by_name)})")
    def scored_annotation(held_out: LabelledSet, query, checkpoint: Path, seed: int) -> dict:
        reference_set = next(s for s in sets if s.pbmc and s.name != held_out.name)
        reference = anndata.read_h5ad(files[reference_set.name])
        return annotation_transfer(reference, query, mapped_labels(reference, reference_set, label_map),
                                   mapped_labels(query, held_out, label_map), checkpoint, seed) | {
            "reference": reference_set.name}

    if args.rescore_annotation:  # finished runs scored before the "Unknown" rates existed: their checkpoints again
        for entry in runs:
            if entry.get("annotation") and entry["annotation"].get("unknown_rule") != ANNOTATION_RULE:
                held_out = by_name[entry["held_out"]]
                checkpoint = checkpoint_path(args.out / f"without_{held_out.name}", entry["seed"],
                                             entry.get("variant", DEFAULT_VARIANT), entry.get("steps", DEFAULT_STEPS))
                print(f"re-scoring the annotation of {checkpoint}", flush=True)
                entry["annotation"] = scored_annotation(held_out, anndata.read_h5ad(files[held_out.name]), checkpoint,
                                                        entry["seed"])
        with atomic_path(log) as staging:
            staging.write_text("".join(json.dumps(entry, default=float) + "\n" for entry in runs))
        (args.out / "table.md").write_text(summary(log))
    for seed in args.seeds:
        for name in args.held_out or list(by_name):
            recipe = {"variant": args.variant, "steps": args.steps, **corpus, **read, **readout}
            if (name, seed, run_recipe(recipe | ({"prior_readout_weight": 1} if args.prior_readout else {}))) in done:
                continue
            held_out = by_name[name]
            start = time.perf_counter()
            checkpoint = build_fold(held_out, files, unlabelled, args.out, seed, args.steps, args.variant,
                                    args.corpus_fraction)
            train_seconds = time.perf_counter() - start
            query = anndata.read_h5ad(files[name])
            read_query = query if not readout else thinned(query, args.common_depth, seed)
            model, weight = checkpoint, {}
            if args.prior_readout:  # the weight comes from the fold's corpus, never from the left-out set
                model = load_model(checkpoint, device="cpu")
                fold_files = fold_corpus(name, files, unlabelled, args.out, args.corpus_fraction)
                model.config.prior_readout_weight = fit_prior_readout_weight(fold_files, model, seed=seed,
                                                                             progress=False)
                weight = {"prior_readout_weight": model.config.prior_readout_weight}
            baselines = (() if (name, seed, args.genes, args.common_depth, args.prior_readout,
                                 args.corpus_fraction) in scored_baselines else
                         ("untrained",) if args.prior_readout else
                         ("untrained", "prior") if args.corpus_fraction or (args.genes == "hvg" and not readout) else
                         ("untrained", "prior", "pca", "expression"))
            report = evaluate(read_query, model, label_key=held_out.label_key, batch_key=held_out.batch_key,
                              baselines=baselines, settings=EvaluationSettings(seed=seed), progress=False,
                              depth_reference=query, **read)
            suffix = "".join(f", {part}" for part in corpus_share(corpus) + readouts(read | readout | weight))
            entry = {"held_out": name, "seed": seed, "variant": args.variant, "steps": args.steps, **corpus, **read,
                     **readout,
                     **weight,
                     "train_seconds": round(train_seconds, 1),
                     "scores": {row if row == "ScGene" else row + suffix: report.table.loc[row].to_dict()
                                for row in report.table.index},
                     "info": report.info}
            if held_out.pbmc and sum(s.pbmc for s in sets) > 1 and not (corpus or read or readout or weight):
                entry["annotation"] = scored_annotation(held_out, query, checkpoint, seed)
            with log.open("a") as handle:
                handle.write(json.dumps(entry, default=float) + "\n")
            (args.out / "table.md").write_text(summary(log))
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
