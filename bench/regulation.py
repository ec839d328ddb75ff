"""Cost of `scgene.regulation`: seconds, cells/s and peak memory on 2,000 cells x 5,000 genes, against `scgene.embed`
of the same cells with the same model in the same run.

The cells: simulated raw counts shaped like PBMC data (`bench/embed.py`'s `pbmc_like_counts`: 500-3,000 expressed
genes per cell out of 5,000 symbols of the default vocabulary). The model: the shipped dual-branch checkpoint
(`scgene.DEFAULT_REGULATION_CHECKPOINT`, its tokenizer's 256 tokens per cell) or `--model`. Rows, each in a fresh
process so that "peak RSS MB" is that run's own (VmHWM reset after loading the model):

- `embed`: the cell embeddings (the reference: one forward per cell, as `regulation` runs);
- `regulation, every gene a regulator`: the full 5,000 x 5,000 network (accumulators 200 MB);
- `regulation, CollecTRI TFs`: `regulators=scgene.transcription_factors()`;
- `regulation, 5 groups`: every gene a regulator, one network per group of `groupby` (five accumulators);
- `prior regulation, CollecTRI TFs`: `scgene.prior_regulation` (the probe fitted on all of CollecTRI, then the TFs'
  top 100 targets); it reads no expression, so its cost does not grow with the cells.

The issue's bound: under 4 GB and a few minutes on 2 cores.

    python bench/regulation.py [--n-cells 2000] [--n-genes 5000] [--model DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from embed import anndata_of, gene_symbols, pbmc_like_counts, reset_peak, status_mb  # noqa: E402

ROWS = ["embed", "regulation, every gene a regulator", "regulation, CollecTRI TFs", "regulation, 5 groups",
        "prior regulation, CollecTRI TFs"]


def measure(row: str, path: Path, model_path: str) -> dict:
    """One row in this process: load the model, reset the memory peak, time the call."""
    import anndata

    import scgene
    from scgene.inference import load_model, load_tokenizer

    adata = anndata.read_h5ad(path)
    model = load_model(model_path)
    tokenizer = load_tokenizer(None, model)
    before = reset_peak()
    start = time.perf_counter()
    if row == "embed":
        scgene.embed(adata, model, tokenizer=tokenizer, progress=False)
        edges = None
    elif row.startswith("prior regulation"):
        edges = len(scgene.prior_regulation(adata, model, tokenizer=tokenizer, key_added=None))
    else:
        options = {"regulators": scgene.transcription_factors()} if row.endswith("TFs") else {}
        if row.endswith("groups"):
            options["groupby"] = "group"
        edges = len(scgene.regulation(adata, model, tokenizer=tokenizer, progress=False, **options))
    seconds = time.perf_counter() - start
    return {"row": row, "seconds": seconds, "cells_per_second": adata.n_obs / seconds,
            "peak_mb": status_mb("VmHWM") - before, "edges": edges}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=5000)
    parser.add_argument("--model", help="a dual-branch checkpoint (default: the shipped one)")
    parser.add_argument("--json", help="save the rows here")
    parser.add_argument("--child", nargs=3, metavar=("ROW", "PATH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.child[2])))
        return
    import scgene

    model = args.model or str(scgene.DEFAULT_REGULATION_CHECKPOINT)
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "cells.h5ad"
        adata = anndata_of(pbmc_like_counts(args.n_cells, 500, min(3000, args.n_genes // 2), args.n_genes), gene_symbols(args.n_genes))
        adata.obs["group"] = [f"group{i % 5}" for i in range(adata.n_obs)]
        adata.write_h5ad(path)
        results = []
        for row in ROWS:
            output = subprocess.run([sys.executable, __file__, "--child", row, str(path), model], capture_output=True,
                                    text=True)
            if output.returncode:
                raise RuntimeError(f"{row} failed:\n{output.stderr[-3000:]}")
            results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    reference = results[0]["seconds"]
    print(f"{args.n_cells} cells x {args.n_genes} genes, model {model}\n")
    print("| row | seconds | cells/s | x embed time | peak RSS MB | edges |\n|---|---|---|---|---|---|")
    for result in results:
        print(f"| {result['row']} | {result['seconds']:.1f} | {result['cells_per_second']:.0f} | "
              f"{result['seconds'] / reference:.2f} | {result['peak_mb']:.0f} | {result['edges'] or '–'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_cells": args.n_cells, "n_genes": args.n_genes, "model": model,
                                               "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
