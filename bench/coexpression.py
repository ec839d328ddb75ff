"""Benchmark of the prior's co-expression step and gene2vec training on realistic sparse counts.

    .venv/bin/python bench/coexpression.py [--genes 20000] [--cells 50000] [--threshold 0.7] [--block-size 1024]
                                           [--gene2vec-edges 500000] [--cache DIR]

The defaults are the issue's size; e.g. `--genes 2000 --cells 3000 --gene2vec-edges 10000` checks in seconds
that the benchmark runs (a run that small may find no edge at 0.7; gene2vec on them is then skipped).

Counts are simulated like 10x data: per-gene mean expression log-normal (most genes rarely detected, a few
very high), log-normal library sizes, 10 cell types each with 200 marker genes at 20x their baseline, Poisson
sampling; then normalize_total(1e4) + log1p as the tokenizer's preprocessing. Each measured step runs in a fresh
child process so its peak resident memory (ru_maxrss, which includes the loaded input matrix) is its own.
Target on 2 CPU cores: correlation under 5 minutes and under 4 GB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS, TARGET_GB = 300, 4  # the target for the correlation step on 2 CPU cores (at full size)


def simulate(n_cells: int, n_genes: int, seed: int = 0, chunk: int = 1000) -> sp.csr_matrix:
    """Log-normalised simulated counts (CSR float32), generated chunk by chunk of cells."""
    rng = np.random.default_rng(seed)
    base = np.minimum(rng.lognormal(mean=-3.6, sigma=2.0, size=n_genes), 50.0)
    n_types, n_markers = 10, 200
    markers = rng.choice(n_genes, size=(n_types, min(n_markers, n_genes // n_types)), replace=False)
    fold = np.ones((n_types, n_genes))
    for t in range(n_types):
        fold[t, markers[t]] = 20.0
    parts = []
    for start in range(0, n_cells, chunk):
        size = min(chunk, n_cells - start)
        types = rng.integers(0, n_types, size)
        library = rng.lognormal(0.0, 0.5, size)[:, None]
        counts = sp.csr_matrix(rng.poisson(base[None, :] * fold[types] * library).astype(np.float32))
        totals = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0)
        counts.data *= np.repeat(1e4 / totals, np.diff(counts.indptr)).astype(np.float32)
        np.log1p(counts.data, out=counts.data)
        parts.append(counts)
    return sp.vstack(parts, format="csr")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def worker(matrix_path: Path, result_path: Path, threshold: float, block_size: int, scaling_edges: int) -> None:
    """Child process: correlation, then gene2vec on its edges and on `scaling_edges` random edges between the
    same genes (how training time grows with a denser network); writes timings and peak memory as JSON."""
    sys.path.insert(0, str(REPO / "src"))
    import pandas as pd

    from scgene.prior.coexpression import coexpression_edges
    from scgene.prior.gene2vec import gene2vec

    X = sp.load_npz(matrix_path)
    loaded = peak_rss_gb()
    genes = [f"G{i}" for i in range(X.shape[1])]
    start = time.perf_counter()
    edges, info = coexpression_edges(X, genes, threshold=threshold, block_size=block_size, progress=True)
    seconds = time.perf_counter() - start
    result = {"input_gb": loaded, "correlation_s": seconds, "correlation_peak_gb": peak_rss_gb(), "edges": len(edges)}
    result["genes_used"] = info.n_genes_used
    del X
    if len(edges):  # a small simulation can have no pair above the threshold
        start = time.perf_counter()
        genes_out, _ = gene2vec(edges, dim=200, seed=0, progress=True)
        result |= {"gene2vec_s": time.perf_counter() - start, "gene2vec_genes": len(genes_out)}
    if scaling_edges:
        pairs = np.random.default_rng(0).integers(0, len(genes), size=(scaling_edges, 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        names = np.asarray(genes, dtype=object)
        random_edges = pd.DataFrame({"gene_a": names[pairs[:, 0]], "gene_b": names[pairs[:, 1]], "r": 1.0})
        start = time.perf_counter()
        gene2vec(random_edges, dim=200, seed=0, progress=True)
        result |= {"scaling_s": time.perf_counter() - start, "scaling_edges": len(random_edges)}
    result["process_peak_gb"] = peak_rss_gb()
    result_path.write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--cells", type=int, default=50000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--gene2vec-edges", type=int, default=500_000, help="random edges for gene2vec scaling")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "scgene_bench")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, threshold=args.threshold, block_size=args.block_size, scaling_edges=args.gene2vec_edges)
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    matrix_path = args.cache / f"lognorm_{args.cells}x{args.genes}.npz"
    if not matrix_path.exists():
        start = time.perf_counter()
        X = simulate(args.cells, args.genes)
        sp.save_npz(matrix_path, X, compressed=False)
        print(f"simulated {args.cells} x {args.genes} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    X = sp.load_npz(matrix_path)
    density = X.nnz / (X.shape[0] * X.shape[1])
    genes_per_cell = float(np.median(np.diff(X.indptr)))
    del X
    result_path = args.cache / "result.json"
    command = [sys.executable, __file__, "--worker", str(matrix_path), str(result_path), "--threshold",
               str(args.threshold), "--block-size", str(args.block_size), "--gene2vec-edges", str(args.gene2vec_edges)]
    subprocess.run(command, check=True)
    r = json.loads(result_path.read_text())

    rows = [
        ("cells x genes", f"{args.cells:,} x {args.genes:,}"),
        ("density / median genes per cell", f"{density:.1%} / {genes_per_cell:,.0f}"),
        ("RSS after imports + loading the input", f"{r['input_gb']:.2f} GB"),
        (f"correlation |r| >= {args.threshold} (block {args.block_size})", f"{r['correlation_s']:.1f} s"),
        ("correlation peak RSS", f"{r['correlation_peak_gb']:.2f} GB"),
        ("edges (genes with variance)", f"{r['edges']:,} ({r['genes_used']:,})"),
    ]
    if "gene2vec_s" in r:
        trained = f"{r['gene2vec_s']:.1f} s on {r['gene2vec_genes']:,} genes"
        rows.append(("gene2vec 200-d skip-gram, 30 epochs", trained))
    else:
        rows.append(("gene2vec 200-d skip-gram, 30 epochs", "skipped: no edge passed the threshold"))
    if "scaling_s" in r:
        rows.append((f"gene2vec on {r['scaling_edges']:,} random edges", f"{r['scaling_s']:.1f} s"))
    rows.append(("process peak RSS", f"{r['process_peak_gb']:.2f} GB"))
    met = r["correlation_s"] < TARGET_SECONDS and r["correlation_peak_gb"] < TARGET_GB
    verdict = "met" if met else "NOT met"
    if (args.genes, args.cells) != (20000, 50000):
        verdict += " (at this size; the target is for 20,000 genes x 50,000 cells)"
    rows.append((f"target: correlation < {TARGET_SECONDS // 60} min and < {TARGET_GB} GB", verdict))
    width = max(len(name) for name, _ in rows)
    print(f"{'step'.ljust(width)} | value")
    print(f"{'-' * width}-|------")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
