"""Tokenizer benchmark: cells/s and peak memory per gene-selection mode, in memory and backed, plus the
`datasets` export (issue 3). Not a test; prints a Markdown table.

The data: with a fixed seed, raw UMI counts for N cells x 20,000 real human genes (the first 20,000
protein-coding Ensembl ids of ../shared/data/genes), 2,000-5,000 UMIs per cell drawn from a log-normal
gene popularity, so about 90% of the entries are zero. "cells per CPU-second" divides by the process's
CPU time (all threads), a figure that other load on the machine does not distort. Each measurement runs in a fresh process, so the
peak resident memory (VmHWM) is that configuration's own, including the ~1 GB of imported libraries.

The padded `__call__` path (one (cells, width) batch) is timed against the streaming path `iter_encoded` in one
process, alternating, best of `PADDED_REPEATS` each: their ratio, not the absolute speed, is what it checks.

(Named `tokenizer.py`, not `tokenize.py`: a script's folder comes first on sys.path, and a `tokenize.py` there
shadows the standard library module that `inspect` and `linecache` import.)

    python bench/tokenizer.py [--n-cells 100000] [--workdir /tmp/scgene-bench]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GENES_TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "genes" / "genes_homo_sapiens.csv.gz"
N_GENES = 20_000
CONFIGS = {  # name -> tokenizer keyword arguments
    "nonzero": {"gene_selection": "nonzero", "max_length": 2048},
    "top_k": {"gene_selection": "top_k", "top_k": 1024, "max_length": 2048},
    "all": {"gene_selection": "all", "truncation": False, "chunk_size": 256},
}
PADDED_REPEATS = 3


def human_gene_ids(n_genes: int) -> list[str]:
    """The first `n_genes` protein-coding Ensembl ids of the GENCODE table in ../shared/data, or, where that folder
    is not there, of the default vocabulary shipped with scgene (built from the same table)."""
    if not GENES_TABLE.exists():
        from scgene.tokenization_scgene import ScGeneTokenizer

        return [gene for gene in ScGeneTokenizer().ensembl_ids[3:] if gene][:n_genes]
    with gzip.open(GENES_TABLE, "rt", newline="") as handle:
        ids = [row[0] for row in csv.reader(handle) if row[4] == "protein_coding"]
    return ids[:n_genes]


def make_counts(n_cells: int, n_genes: int, seed: int = 0, block: int = 10_000, umis=(2000, 5000), spread: float = 2.0):
    """CSR raw counts: per cell a total of `umis` (inclusive range) UMIs, each UMI a gene drawn by a log-normal
    popularity of width `spread`."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    popularity = np.cumsum(rng.lognormal(0.0, spread, n_genes))
    blocks = []
    for start in range(0, n_cells, block):
        rows = min(block, n_cells - start)
        totals = rng.integers(umis[0], umis[1] + 1, rows)
        genes = np.searchsorted(popularity, rng.random(totals.sum()) * popularity[-1])
        keys = np.repeat(np.arange(rows, dtype=np.int64), totals) * n_genes + genes
        keys.sort()
        first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        counts = np.diff(np.append(first, len(keys))).astype(np.float32)
        unique = keys[first]
        indptr = np.searchsorted(unique // n_genes, np.arange(rows + 1))
        blocks.append(sp.csr_matrix((counts, (unique % n_genes).astype(np.int32), indptr), shape=(rows, n_genes)))
    return sp.vstack(blocks, format="csr")


def write_dataset(path: Path, n_cells: int) -> None:
    import anndata as ad
    import pandas as pd

    counts = make_counts(n_cells, N_GENES)
    obs = pd.DataFrame({"batch": pd.Categorical(np.arange(n_cells) % 4)}, index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=human_gene_ids(N_GENES))).write_h5ad(path)


def peak_resident_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure(path: str, config: str, backed: bool, export_to: str | None) -> dict:
    """One configuration, in this (fresh) process."""
    import anndata as ad

    from scgene.data import export_dataset
    from scgene.tokenization_scgene import ScGeneTokenizer

    adata = ad.read_h5ad(path, backed="r" if backed else None)
    tokenizer = ScGeneTokenizer()
    kwargs = dict(CONFIGS[config])
    tokens = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    if export_to:
        export_dataset(adata, export_to, tokenizer, obs_columns=["batch"], num_shards=4, overwrite=True, **kwargs)
    else:
        for chunk in tokenizer.iter_encoded(adata, **kwargs):
            tokens += int(chunk.lengths.sum())
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = peak_resident_mb()
    return {"cells_per_s": adata.n_obs / seconds, "cells_per_cpu_s": adata.n_obs / cpu_seconds, "seconds": seconds, "peak_mb": peak_mb, "tokens_per_cell": tokens / adata.n_obs}


def measure_padded(path: str, config: str) -> dict:
    """The padded `__call__` against streaming `iter_encoded`, in memory, alternating in this (fresh) process."""
    import anndata as ad

    from scgene.tokenization_scgene import ScGeneTokenizer

    adata = ad.read_h5ad(path)
    tokenizer = ScGeneTokenizer()
    kwargs = CONFIGS[config]
    best = {"streaming": (np.inf, np.inf), "padded": (np.inf, np.inf)}
    for _ in range(PADDED_REPEATS):
        for name in best:
            start, cpu_start = time.perf_counter(), time.process_time()
            if name == "padded":
                tokens = int(tokenizer(adata, **kwargs)["attention_mask"].sum())
            else:
                tokens = sum(int(chunk.lengths.sum()) for chunk in tokenizer.iter_encoded(adata, **kwargs))
            best[name] = min(best[name], (time.perf_counter() - start, time.process_time() - cpu_start))
    (seconds, cpu_seconds), streaming_seconds = best["padded"], best["streaming"][0]
    return {
        "cells_per_s": adata.n_obs / seconds, "cells_per_cpu_s": adata.n_obs / cpu_seconds, "seconds": seconds,
        "peak_mb": peak_resident_mb(), "tokens_per_cell": tokens / adata.n_obs,
        "streaming_cells_per_s": adata.n_obs / streaming_seconds, "ratio": streaming_seconds / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scgene-bench"))
    parser.add_argument("--measure", nargs=4, metavar=("PATH", "CONFIG", "BACKED", "EXPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-padded", nargs=2, metavar=("PATH", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        path, config, backed, export_to = args.measure
        print(json.dumps(measure(path, config, backed == "backed", None if export_to == "-" else export_to)))
        return
    if args.measure_padded:
        print(json.dumps(measure_padded(*args.measure_padded)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"counts_{args.n_cells}x{N_GENES}.h5ad"
    if not path.exists():
        start = time.perf_counter()
        write_dataset(path, args.n_cells)
        print(f"made {path} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    runs = [(config, storage, "-") for config in CONFIGS for storage in ("in memory", "backed")]
    runs.insert(1, ("nonzero", "in memory", "padded"))
    runs.append(("nonzero", "backed", str(args.workdir / "export")))
    print(f"{args.n_cells:,} cells x {N_GENES:,} genes, raw counts ({describe_counts(path)}); 2 worker threads, "
          f"chunks of 512 cells (256 for 'all')\n")
    print("| mode | storage | cells/s | cells per CPU-second | seconds | tokens/cell | peak memory |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = {}
    for config, storage, export_to in runs:
        flag = "backed" if storage == "backed" else "memory"
        if export_to == "padded":
            command = [sys.executable, __file__, "--measure-padded", str(path), config]
        else:
            command = [sys.executable, __file__, "--measure", str(path), config, flag, export_to]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        results[config, storage, export_to] = result
        label = f"{config} (max_length {CONFIGS[config].get('max_length', 'none')})"
        if export_to == "padded":
            streaming = f"{result['streaming_cells_per_s']:,.0f} cells/s in the same process"
            label = f"{label}, padded `__call__` ({result['ratio']:.0%} of streaming: {streaming})"
        elif export_to != "-":
            label = f"datasets export, {label}"
        tokens = f"{result['tokens_per_cell']:.0f}" if result["tokens_per_cell"] else "-"
        print(
            f"| {label} | {storage} | {result['cells_per_s']:,.0f} | {result['cells_per_cpu_s']:,.0f} | "
            f"{result['seconds']:.1f} | {tokens} | "
            f"{result['peak_mb'] / 1024:.2f} GB |",
            flush=True,
        )
    print(
        "\nTargets (2 CPU cores): 'nonzero' (max_length 2048) at least 20,000 cells/s; backed peak memory under 2 GB; "
        "the padded `__call__` at least 60% of the streaming speed."
    )
    for storage in ("in memory", "backed"):
        speed = results["nonzero", storage, "-"]["cells_per_s"]
        print(f"- nonzero, {storage}: {speed:,.0f} cells/s -> {'met' if speed >= 20_000 else 'NOT met'}")
    peak = max(result["peak_mb"] for (_, storage, _), result in results.items() if storage == "backed") / 1024
    print(f"- highest backed peak: {peak:.2f} GB -> {'met' if peak < 2 else 'NOT met'}")
    ratio = results["nonzero", "in memory", "padded"]["ratio"]
    print(f"- padded `__call__`, nonzero in memory: {ratio:.0%} of streaming -> {'met' if ratio >= 0.6 else 'NOT met'}")


def describe_counts(path: Path) -> str:
    """Share of zeros and the UMI range per cell of the benchmark file, read backed."""
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    nnz, low, high = 0, np.inf, 0.0
    for start in range(0, adata.n_obs, 10_000):
        block = adata.X[start : start + 10_000]
        totals = np.asarray(block.sum(axis=1)).ravel()
        nnz, low, high = nnz + block.nnz, min(low, totals.min()), max(high, totals.max())
    adata.file.close()
    return f"{1 - nnz / (adata.n_obs * adata.n_vars):.1%} zeros, {low:,.0f}-{high:,.0f} UMIs per cell"


if __name__ == "__main__":
    main()
