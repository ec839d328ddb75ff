"""Where to read the cell embedding: one checkpoint's cells scored by the harness under several read-outs.

Read-outs of the same forward pass: the mean over gene tokens of the last layer (the model's `pooler_output` with
pooling="mean"), the `<cls>` token of the last layer, the mean of the second-to-last layer (what Geneformer reads;
the encoder's final LayerNorm applied, as on the last layer), and the mean over all layers' token means. Each is scored
with `scgene.evaluation.score_embedding` on the same cells and folds; the table goes to stdout and OUT (markdown).

    python scripts/embedding_readout.py --data CELLS.h5ad --model CHECKPOINT --label-key cell_type --out readout.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import torch

from scgene.evaluation import EvaluationSettings, depth_covariates, labelled_cells, score_embedding
from scgene.fileio import atomic_path
from scgene.inference import load_model, load_tokenizer, run_over_cells

SHOWN = ["knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari", "silhouette", "pc1_corr_genes"]


def readouts(encoder, tokenizer, cells) -> dict[str, np.ndarray]:
    """(cells, d) embeddings per read-out, from one pass with every layer's states."""
    final_norm = getattr(encoder.encoder, "final_norm", None) or getattr(encoder.encoder, "expression_final_norm", None)
    names = ["last layer, token mean", "last layer, <cls> token", "second-to-last layer, token mean",
             "mean over layers, token mean"]
    out = {name: np.zeros((cells.n_obs, encoder.config.hidden_size), np.float32) for name in names}

    def consume(batch, outputs):
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        states = outputs.hidden_states  # embeddings, then one per layer; the last with the final norm
        penultimate = states[-2] if final_norm is None else final_norm(states[-2])
        per_layer = [encoder.pool(state, ids, mask) for state in states[1:]]
        for name, value in zip(names, (per_layer[-1], states[-1][:, 0], encoder.pool(penultimate, ids, mask),
                                       torch.stack(per_layer).mean(0))):
            out[name][batch.cells] = value.float().cpu().numpy()

    encoder.config.output_hidden_states = True
    run_over_cells(encoder, tokenizer, cells, consume, batch_size=None, max_tokens_per_batch=None, progress=False,
                   description="Embedding", encode_kwargs={})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled raw-count .h5ad")
    parser.add_argument("--model", required=True, help="ScGene checkpoint")
    parser.add_argument("--label-key", required=True)
    parser.add_argument("--out", type=Path, help="markdown table to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = EvaluationSettings(seed=args.seed)
    adata = anndata.read_h5ad(args.data)
    cells = adata[labelled_cells(adata, args.label_key, None, settings.n_folds)]
    labels = cells.obs[args.label_key].astype(str).to_numpy()
    genes_detected, log_counts = depth_covariates(cells)
    encoder = load_model(args.model)
    tokenizer = load_tokenizer(None, encoder)
    table = pd.DataFrame({
        name: score_embedding(features, labels, genes_detected=genes_detected, log_counts=log_counts, settings=settings)
        for name, features in readouts(encoder, tokenizer, cells).items()
    }).T[SHOWN]
    lines = ["| read-out | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{value:.3f}" for value in row) + " |" for name, row in table.iterrows()]
    markdown = f"{args.model} on {cells.n_obs} cells of {args.data.name}\n\n" + "\n".join(lines) + "\n"
    print(markdown)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(markdown)


if __name__ == "__main__":
    main()
