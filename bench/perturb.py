"""Cost of `scgene.perturb(adata, genes="all")`: every gene of every cell deleted in turn, against a naive loop that
runs one forward per perturbed cell, with the same model in the same process.

The cells: simulated raw counts shaped like PBMC data (`bench/embed.py`'s `pbmc_like_counts`, 5,000 symbols of the
default vocabulary), read at the shipped checkpoint's 256 tokens per cell, so each cell makes 255 perturbed copies.
Rows (perturbed cells per second; peak RSS beyond the loaded model, VmHWM reset before each row):

- `perturb, embedding shifts`: `expression=False`, 1 forward per copy, copies of 8 cells batched under the token budget;
- `naive loop, embedding shifts`: the same copies one at a time (batch of 1), the loop a user would write;
- `perturb, with expression changes`: 7 masked rounds per copy plus the re-run reference round;
- `naive loop, with expression changes`: the same rounds one copy at a time;
- then, in a table of their own, `delete` and `knockout` of the same `--knockout-genes` genes (each detected in about
  half the cells), with expression changes: delete perturbs the cells that express a gene, knockout every cell, and
  where it adds the gene it also predicts the gene's level and the copy's own reference.

MFU: the model FLOPs per perturbed cell (counted by torch's FlopCounterMode) times the rate, over a 2,048 x 2,048
fp32 matmul timed in the same run (`bench/forward.py`; 8,192 x 8,192 on a GPU, where the memory column is the CUDA
allocator's peak). Naive rows run on `--naive-cells` cells (their rate does not depend on the count); the expression
rows on `--expression-cells`. The issue's bound: >= 5x the naive loop's perturbed cells per second.

    python bench/perturb.py [--n-cells 1000] [--expression-cells 50] [--naive-cells 5] [--knockout-genes 30]
        [--device cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from embed import anndata_of, gene_symbols, pbmc_like_counts, reset_peak, status_mb  # noqa: E402
from forward import count_flops, matmul_flops_per_second  # noqa: E402

ROUNDS = 7


def naive_loop(model, tokenizer, adata, expression: bool) -> int:
    """Delete each gene of each cell in turn, one forward per perturbed cell (and per masked round); returns copies."""
    batch = tokenizer(adata, return_tensors="pt")
    copies = 0
    with torch.inference_mode():
        for row in range(adata.n_obs):
            cell = {name: tensor[row : row + 1] for name, tensor in batch.items()}
            length = int(cell["attention_mask"].sum())
            for position in range(1, length):  # 0 is <cls>
                keep = torch.ones(length, dtype=torch.bool)
                keep[position] = False
                copy = {name: tensor[:, :length][:, keep] for name, tensor in cell.items()}
                copy = {name: tensor.to(model.device) for name, tensor in copy.items()}
                model.base_model(**copy).pooler_output.sum().item()
                if expression:
                    for round_index in range(ROUNDS + 1):
                        masked = copy["expression_values"].clone()
                        masked[:, 1 + round_index :: ROUNDS] = -1.0
                        model(**(copy | {"expression_values": masked})).predicted_values.sum().item()
                copies += 1
    return copies


def measure(row: str, adata, model, tokenizer, genes="all", mode: str = "delete") -> dict:
    """One row; its memory is the resident peak beyond the loaded model on the CPU, the CUDA allocator's on a GPU."""
    import scgene

    expression = row.endswith("expression changes")
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if on_gpu else reset_peak()
    start = time.perf_counter()
    if row.startswith("naive"):
        copies = naive_loop(model, tokenizer, adata, expression)
    else:
        result = scgene.perturb(adata, model, genes, mode=mode, expression=expression, tokenizer=tokenizer,
                                key_added=None, progress=False)
        copies = int(result.shifts["cells"].sum())
    seconds = time.perf_counter() - start  # every row ends on the host (.item(), result tables): the GPU is done
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else status_mb("VmHWM")
    return {"row": row, "cells": adata.n_obs, "perturbed_cells": copies, "seconds": seconds,
            "perturbed_cells_per_second": copies / seconds, "peak_mb": peak - before}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=1000)
    parser.add_argument("--expression-cells", type=int, default=50)
    parser.add_argument("--naive-cells", type=int, default=5)
    parser.add_argument("--n-genes", type=int, default=5000)
    parser.add_argument("--knockout-genes", type=int, default=30,
                        help="genes of the knockout-against-delete rows, on --expression-cells cells")
    parser.add_argument("--model", help="a pretrained checkpoint (default: the shipped one)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", help="save the rows here")
    args = parser.parse_args()
    import scgene
    from scgene.inference import load_tokenizer
    from scgene.perturbation import load_masked_expression_model

    model = load_masked_expression_model(args.model, args.device)
    tokenizer = load_tokenizer(None, model)
    adata = anndata_of(pbmc_like_counts(args.n_cells, 500, min(3000, args.n_genes // 2), args.n_genes),
                       gene_symbols(args.n_genes))
    plan = [("perturb, embedding shifts", args.n_cells), ("naive loop, embedding shifts", args.naive_cells),
            ("perturb, with expression changes", args.expression_cells),
            ("naive loop, with expression changes", args.naive_cells)]
    results = [measure(row, adata[:n].copy(), model, tokenizer) for row, n in plan]
    # FLOPs of a perturbed cell: one forward of a 255-token copy; with expression also 7 masked rounds and the
    # re-run reference round (every deleted gene was a token, so each copy has one)
    cell = {name: tensor[:1] for name, tensor in tokenizer(adata[:1], return_tensors="pt").items()}
    keep = cell["attention_mask"][0].bool().clone()
    keep[-1] = False
    copy = {name: tensor[:, keep].to(model.device) for name, tensor in cell.items()}
    forward_flops = count_flops(model.base_model, copy)
    on_gpu = args.device.startswith("cuda")
    peak = matmul_flops_per_second(8192 if on_gpu else 2048, device=args.device)  # fp32, as the model runs
    for result in results:
        flops = forward_flops * ((1 + ROUNDS + 1) if result["row"].endswith("expression changes") else 1)
        result["mfu"] = result["perturbed_cells_per_second"] * flops / peak
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"model {model.name_or_path or scgene.DEFAULT_CHECKPOINT}, {args.device} ({where})\n")
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; one forward of a perturbed cell {forward_flops / 1e6:.0f} MFLOP\n")
    print(f"| row | cells | perturbed cells | seconds | perturbed cells/s | x naive | MFU | "
          f"{'peak GPU MB' if on_gpu else 'peak RSS MB'} |\n"
          "|---|---|---|---|---|---|---|---|")
    for index, result in enumerate(results):
        naive = results[index + 1 if index % 2 == 0 else index]["perturbed_cells_per_second"]
        print(f"| {result['row']} | {result['cells']} | {result['perturbed_cells']} | {result['seconds']:.1f} | "
              f"{result['perturbed_cells_per_second']:.0f} | {result['perturbed_cells_per_second'] / naive:.1f} | "
              f"{result['mfu']:.0%} | {result['peak_mb']:.0f} |")
    # knockout against delete of the same genes, each detected in about half the cells: delete perturbs those, and
    # knockout also the others, where it adds the gene (at the level the model predicts, with its own reference)
    cells = adata[: args.expression_cells]
    detected = np.asarray((cells.X > 0).sum(0)).ravel()
    genes = list(cells.var_names[np.argsort(np.abs(detected - cells.n_obs / 2), kind="stable")[: args.knockout_genes]])
    modes = [measure(f"{mode}, {len(genes)} genes detected in half the cells, with expression changes", cells.copy(),
                     model, tokenizer, genes, mode) for mode in ("delete", "knockout")]
    print(f"\n| row | cells | perturbed cells | seconds | perturbed cells/s | x delete | "
          f"{'peak GPU MB' if on_gpu else 'peak RSS MB'} |\n|---|---|---|---|---|---|---|")
    for result in modes:
        rate = result["perturbed_cells_per_second"]
        print(f"| {result['row']} | {result['cells']} | {result['perturbed_cells']} | {result['seconds']:.1f} | "
              f"{rate:.0f} | {rate / modes[0]['perturbed_cells_per_second']:.2f} | {result['peak_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_flops_per_second": peak, "forward_flops": forward_flops,
                                               "rows": results + modes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
