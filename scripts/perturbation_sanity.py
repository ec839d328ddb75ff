"""A check anyone can read: overexpressing the markers of one PBMC type in cells of another should move their
embeddings toward that type more than overexpressing random genes of matched expression does.

Markers: the `--n-markers` genes with the largest mean log1p difference between the goal type and the rest, found on
one half of the cells; the other half is perturbed. Random sets: `--n-random` sets of as many genes, each drawn from
the genes whose mean expression falls in the same decile as its marker's. Reported per (start, goal): the markers'
mean move toward the goal (`shift_to_goal`, cosine with the goal's mean embedding, after minus before), the random
sets' mean and the share of random sets the markers beat.

    python scripts/perturbation_sanity.py [--data tests/data/pbmc3k_seurat_2638cells_2000hvg_counts.h5ad]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import scgene
from scgene.reports import markdown_table

PAIRS = [("CD14+ Mono", "B"), ("B", "CD14+ Mono"), ("Naive CD4 T", "NK"), ("NK", "CD14+ Mono"), ("CD8 T", "B")]


def log_normalised(adata) -> np.ndarray:
    counts = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(counts.sum(1)).ravel()
    return np.log1p(np.asarray(sp.diags(1e4 / totals) @ counts.toarray()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).parents[1] / "tests" / "data" /
                                              "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"))
    parser.add_argument("--model", help="checkpoint (default: the shipped one)")
    parser.add_argument("--n-markers", type=int, default=5)
    parser.add_argument("--n-random", type=int, default=30)
    parser.add_argument("--cells", type=int, default=100, help="start cells perturbed per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    adata = ad.read_h5ad(args.data)
    half = rng.permutation(adata.n_obs) < adata.n_obs // 2  # markers from one half, perturbation on the other
    expression = log_normalised(adata)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    mean = expression[half].mean(0)
    decile = np.searchsorted(np.quantile(mean, np.linspace(0.1, 0.9, 9)), mean)
    names = np.asarray(adata.var_names)
    tokenizer = scgene.ScGeneTokenizer()
    in_vocabulary = np.array([tokenizer._lookup(name) is not None for name in names])
    rows = []
    for start, goal in PAIRS:
        difference = expression[half & (labels == goal)].mean(0) - expression[half & (labels != goal)].mean(0)
        markers = np.argsort(-np.where(in_vocabulary, difference, -np.inf))[: args.n_markers]
        sets = {"markers": "+".join(names[markers])}
        for index in range(args.n_random):
            drawn = [rng.choice(np.flatnonzero((decile == decile[m]) & in_vocabulary & ~np.isin(np.arange(len(names)), markers)))
                     for m in markers]
            sets[f"random {index}"] = "+".join(names[drawn])
        test = adata[~half].copy()
        start_cells = np.flatnonzero(test.obs["cell_type"].astype(str).to_numpy() == start)
        keep = np.zeros(test.n_obs, bool)
        keep[rng.permutation(start_cells)[: args.cells]] = True
        keep |= test.obs["cell_type"].astype(str).to_numpy() == goal
        result = scgene.perturb(test[keep].copy(), args.model, list(sets.values()), mode="overexpress",
                                state_key="cell_type", start_state=start, goal_state=goal, expression=False,
                                key_added=None, progress=False)
        shifts = result.shifts["shift_to_goal"].to_numpy()
        rows.append({"start": start, "goal": goal, "markers": sets["markers"], "marker_shift": shifts[0],
                     "random_shift_mean": shifts[1:].mean(), "random_shift_sd": shifts[1:].std(),
                     "share_of_random_beaten": float((shifts[0] > shifts[1:]).mean()),
                     "marker_goal_pval": result.shifts["goal_pval"].iloc[0]})
        print(rows[-1], flush=True)
    print(markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
