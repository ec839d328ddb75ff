"""Where to read the cell embedding: checkpoints' cells scored by the harness under several read-outs.

Each read-out is a config switch of the checkpoint (`pooling`, `pooling_layer`), set on loading as a user would
(`from_pretrained(path, pooling_layer=-2)`): the token mean of the last layer, the `<cls>` token of the last layer,
and the token mean of the second-to-last layer (what Geneformer reads; the final LayerNorm applied). Every read-out is
scored with `scgene.evaluation.score_embedding` on the same cells and folds; with several checkpoints (seeds), the
table gives mean ± standard deviation. The table goes to stdout and OUT (markdown); per-checkpoint scores to OUT.json.

    python scripts/embedding_readout.py --data CELLS.h5ad --model RUN_SEED0 RUN_SEED1 --label-key cell_type --out r.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata
import pandas as pd
from transformers import AutoModel

from scgene.evaluation import EvaluationSettings, depth_covariates, labelled_cells, score_embedding
from scgene.fileio import atomic_path
from scgene.inference import embed

SHOWN = ["knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari", "silhouette", "pc1_corr_genes"]
READOUTS = {
    "last layer, token mean": {"pooling": "mean", "pooling_layer": -1},
    "last layer, <cls> token": {"pooling": "cls", "pooling_layer": -1},
    "second-to-last layer, token mean": {"pooling": "mean", "pooling_layer": -2},
}


def score_readouts(cells, labels, covariates, model: str, settings: EvaluationSettings) -> dict[str, dict]:
    """The harness's scores of one checkpoint's embeddings under each read-out."""
    genes_detected, log_counts = covariates
    scores = {}
    for name, switches in READOUTS.items():
        features = embed(cells, AutoModel.from_pretrained(model, **switches), key_added=None, progress=False)
        scores[name] = score_embedding(features, labels, genes_detected=genes_detected, log_counts=log_counts,
                                       settings=settings)
    return scores


def markdown_table(per_model: dict[str, dict[str, dict]]) -> str:
    rows = pd.DataFrame([{"read-out": name, **scores} for runs in per_model.values() for name, scores in runs.items()])
    grouped = rows.groupby("read-out", sort=False)[SHOWN]
    mean, std = grouped.mean(), grouped.std()
    lines = ["| read-out | checkpoints | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 2) + "|"]
    for name in mean.index:
        cells = [f"{mean.loc[name, m]:.3f}" + (f" ± {std.loc[name, m]:.3f}" if len(per_model) > 1 else "")
                 for m in SHOWN]
        lines.append(f"| {name} | {len(per_model)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled raw-count .h5ad")
    parser.add_argument("--model", nargs="+", required=True, help="ScGene checkpoint(s), e.g. one per seed")
    parser.add_argument("--label-key", required=True)
    parser.add_argument("--out", type=Path, help="markdown table to write (and OUT.json with every score)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = EvaluationSettings(seed=args.seed)
    adata = anndata.read_h5ad(args.data)
    cells = adata[labelled_cells(adata, args.label_key, None, settings.n_folds)].copy()
    labels = cells.obs[args.label_key].astype(str).to_numpy()
    covariates = depth_covariates(cells)  # the same cells for every checkpoint
    per_model = {model: score_readouts(cells, labels, covariates, model, settings) for model in args.model}
    markdown = f"{', '.join(args.model)} on {cells.n_obs} cells of {args.data.name}\n\n" + markdown_table(per_model)
    print(markdown)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(markdown)
        with atomic_path(args.out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(per_model, indent=1, default=float))


if __name__ == "__main__":
    main()
