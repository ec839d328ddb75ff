"""Corpus benchmark: `scgene tokenize` over many files into one dataset, and streamed pretraining on it (issue 10).

The corpus repeats the PBMC 3k file shipped in tests/data (2,638 real cells, raw counts) as N files (symbolic links,
each a source of its own), 380 by default: 1,002,440 cells. Each measurement runs in a fresh process, so its peak
resident memory (VmHWM) is its own, including the ~1 GB of imported libraries; the reference rows are the same work
on one copy of the file, so the ratio says what the corpus size costs.

- tokenize: cells/s and peak memory of `export_dataset` (what `scgene tokenize` runs), one file vs the corpus.
- pretrain: examples/pretrain_masked_expression.py (2 layers, width 64, 16 cells per step, 256 evaluation cells):
  seconds from process start to the end of the first training step (import, corpus opening, evaluation before
  training, first step), then steps/s over the next steps, and peak memory; map-style (train_test_split) vs
  `--streaming`.

    python bench/corpus.py [--copies 380] [--steps 20] [--workdir /tmp/scgene-corpus]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()  # the process start, for the first-step latency

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "tests" / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
MODEL = ["--num_hidden_layers", "2", "--num_attention_heads", "4", "--per_device_train_batch_size", "16",
         "--max_eval_cells", "256", "--eval_fraction", "0.01", "--learning_rate", "1e-4", "--use_cpu",
         "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1000"]


def peak_resident_gb() -> float:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024**2


def folder_gb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file()) / 1024**3


def measure_tokenize(sources: list[str], output: str) -> dict:
    import anndata
    import datasets

    from scgene.data import export_dataset
    from scgene.tokenization_scgene import ScGeneTokenizer

    if len(sources) == 1:
        cells = anndata.read_h5ad(sources[0], backed="r")
    else:
        cells = {Path(path).stem: path for path in sources}
    start = time.perf_counter()
    export_dataset(cells, output, ScGeneTokenizer(), num_shards=64, overwrite=True)
    seconds = time.perf_counter() - start
    n_cells = datasets.load_from_disk(output).num_rows
    return {"cells": n_cells, "seconds": seconds, "cells_per_s": n_cells / seconds, "peak_gb": peak_resident_gb(),
            "disk_gb": folder_gb(Path(output))}


def measure_pretrain(arguments: list[str], steps: int) -> dict:
    """Runs the pretraining script's main() here, timing its training steps."""
    sys.path.insert(0, str(REPO / "examples"))
    import pretrain_masked_expression

    from scgene.training import ScGeneTrainer

    step_ends = []
    training_step = ScGeneTrainer.training_step

    def timed_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        step_ends.append(time.perf_counter())
        return loss

    ScGeneTrainer.training_step = timed_step
    sys.argv = ["pretrain", *arguments, "--max_steps", str(steps)]
    pretrain_masked_expression.main()
    return {"first_step_s": step_ends[0] - START, "steps_per_s": (len(step_ends) - 1) / (step_ends[-1] - step_ends[0]),
            "peak_gb": peak_resident_gb()}


def child(*arguments) -> dict:
    command = [sys.executable, __file__, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=380)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scgene-corpus"))
    parser.add_argument("--tokenize", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--pretrain", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenize:
        print(json.dumps(measure_tokenize(args.tokenize[:-1], args.tokenize[-1])))
        return
    if args.pretrain:
        print(json.dumps(measure_pretrain(args.pretrain, args.steps)))
        return

    work = args.workdir
    files = work / "files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    for index in range(args.copies):
        (files / f"pbmc_copy{index:04d}.h5ad").symlink_to(PBMC)
    one, corpus = work / "one", work / "corpus"
    rows = {"one file": child("--tokenize", PBMC, one)}
    rows["corpus"] = child("--tokenize", *sorted(files.iterdir()), corpus)
    print(f"## Tokenize ({args.copies} copies of PBMC 3k, default human vocabulary, 'nonzero' up to 2048 genes, "
          "64 shards)\n")
    print("| input | cells | seconds | cells/s | ratio to one file | peak memory | on disk |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['cells']:,} | {row['seconds']:.0f} | {row['cells_per_s']:,.0f} | "
              f"{row['cells_per_s'] / rows['one file']['cells_per_s']:.2f} | {row['peak_gb']:.2f} GB | "
              f"{row['disk_gb']:.2f} GB |", flush=True)

    import torch
    from safetensors.torch import save_file

    from scgene import ScGeneTokenizer

    vocab_size = ScGeneTokenizer.from_pretrained(one).vocab_size
    prior = torch.randn(vocab_size, 64, generator=torch.Generator().manual_seed(0))
    save_file({"gene_prior": prior}, work / "gene_prior.safetensors")
    common = ["--prior", work / "gene_prior.safetensors", "--output_dir", work / "run", *MODEL]
    runs = {
        ("one file", "map-style"): ["--dataset", one],
        ("one file", "--streaming"): ["--dataset", one, "--streaming", "--shuffle_buffer", "1000"],
        ("corpus", "map-style"): ["--dataset", corpus],
        ("corpus", "--streaming"): ["--dataset", corpus, "--streaming", "--shuffle_buffer", "10000"],
    }
    print(f"\n## Pretraining, {args.steps} steps of 16 cells, 1 process on 2 cores\n")
    print("| data | loading | start to end of step 1 | steps/s after | peak memory |")
    print("|---|---|---:|---:|---:|")
    for (data, loading), arguments in runs.items():
        row = child("--steps", args.steps, "--pretrain", *arguments, *common)
        print(f"| {data} | {loading} | {row['first_step_s']:.1f} s | {row['steps_per_s']:.2f} | {row['peak_gb']:.2f} GB |",
              flush=True)


if __name__ == "__main__":
    main()
