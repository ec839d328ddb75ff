"""The cell-identity ablation: pretraining recipes x seeds on one labelled dataset (optionally with more files to
pretrain on, --corpus), scored by `scgene.evaluate` on the labelled cells.

Each run is what a user would do: `scgene tokenize`, `scgene build-prior`, `examples/pretrain_masked_expression.py`
with the variant's flags, then the harness on the same cells. Baselines (50 PCs, logistic regression on expression,
the prior alone) are computed once; the untrained model once per seed. Every finished run is appended to
OUT/runs.jsonl and skipped when the script is run again, so an interrupted ablation resumes; OUT/table.md is the
summary (mean ± standard deviation over seeds, wall time per run).

    python scripts/cell_identity_ablation.py --data tests/data/pbmc3k_seurat_2638cells_2000hvg_counts.h5ad \
        --label-key cell_type --out outputs/ablation/pbmc3k --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
# variant -> (pretraining flags, prior). The rows made before temperature 0.02 became the default keep 0.1, so that
# they reproduce the tables in docs/cell-identity.md.
CONTRASTIVE = ["--contrastive_loss_weight", "1", "--contrastive_temperature", "0.1"]
VARIANTS = {
    "masked expression (value + bin)": ([], "fused"),
    "masked + contrastive count views": (CONTRASTIVE, "fused"),
    "masked + contrastive, temperature 0.05": (
        ["--contrastive_loss_weight", "1", "--contrastive_temperature", "0.05"], "fused"),
    "masked + contrastive, temperature 0.02": (
        ["--contrastive_loss_weight", "1", "--contrastive_temperature", "0.02"], "fused"),
    "masked + contrastive, temperature 0.01": (
        ["--contrastive_loss_weight", "1", "--contrastive_temperature", "0.01"], "fused"),
    "masked + contrastive, matched-depth views": ([*CONTRASTIVE, "--matched_depth_views"], "fused"),
    "masked expression, gene2vec prior only": ([], "gene2vec"),
    "contrastive only": ([*CONTRASTIVE, "--value_loss_weight", "0", "--bin_loss_weight", "0"], "fused"),
    "masked + contrastive, gene2vec prior only": (CONTRASTIVE, "gene2vec"),
    "masked + contrastive, knowledge prior only": (CONTRASTIVE, "knowledge"),
    "masked + contrastive, no prior": (CONTRASTIVE, "none"),
}
UNTRAINED = "untrained (step 0)"
BASELINE_ROWS = ("prior only", "PCA (50 PCs of log1p HVGs)", "expression (logistic regression on log1p HVGs)")
SHOWN = ["knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari", "silhouette", "pc1_corr_genes", "transfer_f1", "batch_ilisi"]


def run(command: list) -> None:
    print("$ " + " ".join(map(str, command)), flush=True)
    subprocess.run([str(part) for part in command], check=True)


def prepare_data(args) -> tuple[Path, list[Path]]:
    """The labelled cells the ablation scores (the input file itself, or with --keep / --top-genes a filtered copy
    in OUT) and the extra pretraining files of --corpus (with --corpus-top-genes, filtered copies in OUT/corpus)."""
    data = args.data
    if args.keep or args.top_genes:
        data = subset_copy(args.data, args.keep, args.top_genes, args.out / "cells.h5ad")
    corpus = [path if not args.corpus_top_genes else
              subset_copy(path, [], args.corpus_top_genes, args.out / "corpus" / f"{index}_{path.name}")
              for index, path in enumerate(args.corpus)]
    return data, corpus


def subset_copy(source: Path, keep: list[str], top_genes: int | None, target: Path) -> Path:
    """`source` with only the cells where obs[KEY] == VALUE for each KEY=VALUE of `keep`, and the `top_genes` most
    variable genes (of log-normalised counts, genes in 3+ cells), written once to `target`."""
    if target.exists():
        return target
    import scanpy as sc

    adata = anndata.read_h5ad(source)
    for condition in keep:
        key, value = condition.split("=", 1)
        adata = adata[adata.obs[key].astype(str) == value].copy()
    if top_genes:
        sc.pp.filter_genes(adata, min_cells=3)
        logged = sc.pp.log1p(sc.pp.normalize_total(adata, target_sum=1e4, copy=True), copy=True)
        sc.pp.highly_variable_genes(logged, n_top_genes=top_genes)
        adata = adata[:, logged.var["highly_variable"].to_numpy()].copy()
    adata.uns["ablation_subset"] = {"source": str(source), "keep": list(keep), "top_genes": top_genes or 0}
    target.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(target)
    return target


def prepare(args, data: Path, corpus: list[Path], variants: list[str]) -> dict[str, Path]:
    """Tokenized cells and the priors the variants need (fused, gene2vec only, knowledge only, none), each made once.

    With --vocabulary data the tokenizer is the dataset's own gene list (e.g. mouse genes, which the default human
    vocabulary does not hold); the knowledge table is human, so such a run needs --orthologs (e.g. mouse) for it.
    """
    scgene = [sys.executable, "-m", "scgene.cli"]
    tokenizer = []
    if args.vocabulary == "data":
        folder = args.out / "tokenizer"
        if not folder.exists():
            from scgene import ScGeneTokenizer

            ScGeneTokenizer.from_anndata(anndata.read_h5ad(data, backed="r")).save_pretrained(folder)
        tokenizer = ["--tokenizer", folder]
    tokenized = args.out / "tokenized"
    if not tokenized.exists():
        labels = [] if corpus else ["--obs-columns", args.label_key]  # pretraining needs no labels; other files lack them
        run(scgene + ["tokenize", data, *corpus, tokenized, "--max-length", args.max_length, *labels, *tokenizer])
    needed = {VARIANTS[variant][1] for variant in variants}
    only = {"fused": [], "gene2vec": ["--no-knowledge"], "knowledge": ["--no-gene2vec"]}
    orthologs = {name: ["--orthologs", args.orthologs] if args.orthologs and name != "gene2vec" else [] for name in only}
    paths = {"tokenized": tokenized}
    for name in sorted(needed - {"none"}) or ["gene2vec"]:
        folder = args.out / f"prior_{name}"
        if not (folder / "prior_record.json").exists():
            run(scgene + ["build-prior", "--adata", data, *corpus, "--out", folder, "--hidden-size", args.hidden_size,
                          "--gene2vec-dim", min(200, args.hidden_size // 2), "--threshold", "0.3",
                          "--knowledge-genes", "adata", "--no-progress", *tokenizer, *only[name], *orthologs[name]])
        paths[name] = folder / "gene_prior.safetensors"
    if "none" in needed:
        paths["none"] = args.out / "prior_none.safetensors"
        if not paths["none"].exists():
            some_prior = next(path for name, path in paths.items() if name != "tokenized")
            save_file({"gene_prior": torch.zeros_like(load_file(some_prior)["gene_prior"])}, paths["none"])
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled raw-count .h5ad")
    parser.add_argument("--label-key", required=True)
    parser.add_argument("--batch-key")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", nargs="*", default=[], metavar="KEY=VALUE", help="keep only cells with obs[KEY] == VALUE")
    parser.add_argument("--top-genes", type=int, help="keep this many highly variable genes (of log-normalised counts)")
    parser.add_argument("--vocabulary", choices=("human", "data"), default="human",
                        help="the default human vocabulary, or one made of the dataset's genes (non-human data)")
    parser.add_argument("--corpus", nargs="*", type=Path, default=[],
                        help="more raw-count .h5ad files to pretrain on (and build the prior from) with --data's cells")
    parser.add_argument("--corpus-top-genes", type=int, help="keep this many highly variable genes of each corpus file")
    parser.add_argument("--orthologs", help="build-prior --orthologs for the knowledge part (e.g. mouse)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--learning-rate", default="3e-4")
    parser.add_argument("--leiden-resolution", type=float, default=1.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.corpus and args.vocabulary == "data":
        parser.error("--corpus needs the shared human vocabulary (--vocabulary human): one file's genes do not cover the others.")
    data, corpus = prepare_data(args)
    inputs = prepare(args, data, corpus, args.variants)

    from scgene.evaluation import EvaluationSettings, evaluate

    adata = anndata.read_h5ad(data)
    log = args.out / "runs.jsonl"
    done = {(r["variant"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()

    def record(variant, seed, report, row, seconds):
        entry = {"variant": variant, "seed": seed, "seconds": round(seconds, 1), "scores": report.table.loc[row].to_dict(),
                 "info": report.info}
        with log.open("a") as handle:
            handle.write(json.dumps(entry, default=float) + "\n")

    for seed in args.seeds:
        settings = EvaluationSettings(seed=seed, leiden_resolution=args.leiden_resolution)
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            flags, prior = VARIANTS[variant]
            checkpoint = args.out / "runs" / f"{variant.replace(' ', '_').replace(',', '')}-seed{seed}"
            start = time.perf_counter()
            if not (checkpoint / "model.safetensors").exists():
                run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", inputs["tokenized"],
                     "--prior", inputs[prior], "--output_dir", checkpoint, "--hidden_size", args.hidden_size,
                     "--norm_position", "pre", "--pooling", "mean", "--max_steps", args.steps, "--warmup_steps", "20",
                     "--learning_rate", args.learning_rate, "--per_device_train_batch_size", "32", "--use_cpu",
                     "--report_to", "none", "--seed", seed, "--logging_steps", "50", "--save_strategy", "no",
                     "--disable_tqdm", "true", "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0", *flags])
            train_seconds = time.perf_counter() - start
            wanted = (("untrained",) if (UNTRAINED, seed) not in done else ()) + (
                ("prior", "pca", "expression") if not any(name in BASELINE_ROWS for name, _ in done) else ())
            report = evaluate(adata, checkpoint, label_key=args.label_key, batch_key=args.batch_key, baselines=wanted,
                              settings=settings, progress=False)
            for row in report.table.index:
                name = variant if row == "ScGene" else UNTRAINED if row == "ScGene untrained" else row
                seconds = train_seconds if row == "ScGene" else 0.0
                record(name, seed, report, row, seconds)
                done.add((name, seed))
            (args.out / "table.md").write_text(summary(log))
    print((args.out / "table.md").read_text())


def summary(log: Path) -> str:
    """Mean ± sd over seeds per variant, in the order runs were first recorded."""
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    shown = [m for m in SHOWN if any(r["scores"].get(m) is not None and not np.isnan(r["scores"][m]) for r in runs)]
    lines = ["| variant | seeds | " + " | ".join(shown) + " | train s/run |", "|---" * (len(shown) + 3) + "|"]
    for variant in variants:
        rows = [r for r in runs if r["variant"] == variant]
        cells = []
        for metric in shown:
            values = np.array([r["scores"].get(metric) for r in rows], dtype=float)
            values = values[~np.isnan(values)]
            cells.append("–" if not len(values) else f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""))
        seconds = np.mean([r["seconds"] for r in rows])
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    first = runs[0]["info"]
    return (f"{first['n_cells']} cells, {first['n_labels']} labels (`{first['label_key']}`); "
            f"settings {json.dumps(first['settings'])}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
