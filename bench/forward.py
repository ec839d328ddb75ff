"""Cell-embedding inference speed of the ScGene encoders against transformers' BertModel (what Geneformer runs).

Shape: Geneformer V1 (6 layers, d=256, 4 heads, FFN 512), batch 8, 2,048 genes per cell, fp32, SDPA, inference mode.
Prints one row per model: cells/s and seconds per batch (best of `--repeats` round-robin runs, after a warm-up
run counted by FLOPs), the peak resident memory one forward adds (each measured in a fresh process: "RSS MB" with
glibc's default heap, which keeps freed blocks for reuse, and "live MB" with MALLOC_MMAP_THRESHOLD_=64 KiB, so that
every freed tensor goes back to the system and the peak is what the live tensors needed), FLOPs per cell (counted once
with eager attention by torch's FlopCounterMode), the speed ratio against BertModel measured in the same process, and
model FLOPs utilisation against a 2,048 x 2,048 fp32 matmul timed in the same run.

    python bench/forward.py [--batch-size 8] [--genes 2048] [--repeats 5]
"""

import argparse
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from scgene import ScGeneConfig, ScGeneModel

GENEFORMER_V1 = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)


def resident_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: the process's peak), in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def forward_peak_mb(index: int, args, live: bool) -> float:
    """Peak resident memory that one forward of run `index` adds, measured in a fresh process; `live`: with freed
    blocks returned to the system at once, so the peak counts live tensors only."""
    command = [sys.executable, __file__, "--memory-of", str(index), "--batch-size", str(args.batch_size),
               "--genes", str(args.genes)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if live else None
    return float(subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout.split()[-1])


def matmul_flops_per_second(size: int = 2048, repeats: int = 10, device: str = "cpu",
                            dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate: best of `repeats` size x size products (on a GPU, after a warm-up, synchronized)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def count_flops(model, inputs) -> float:
    """FLOPs of one forward, counted with eager attention (the same arithmetic SDPA does, made visible)."""
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**inputs)
    model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def time_forward(model, inputs) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs)
        return time.perf_counter() - start


def scgene_inputs(batch_size: int, genes: int, vocab_size: int, shared_panel: bool):
    generator = torch.Generator().manual_seed(0)
    if shared_panel:
        ids = (torch.randperm(vocab_size - 3, generator=generator)[:genes] + 3).expand(batch_size, -1).clone()
    else:
        ids = torch.stack([torch.randperm(vocab_size - 3, generator=generator)[:genes] + 3 for _ in range(batch_size)])
    values = torch.rand(batch_size, genes, generator=generator) * 4
    return {"input_ids": ids, "expression_values": values, "attention_mask": torch.ones_like(ids)}


def build_runs(args) -> list:
    """(label, model, inputs) for BertModel and the ScGene designs, all at the same shape."""
    torch.manual_seed(0)
    vocab_size = 20_000
    bert = BertModel(
        BertConfig(vocab_size=vocab_size, max_position_embeddings=args.genes, hidden_act="relu", **GENEFORMER_V1),
        add_pooling_layer=False,
    ).eval()
    bert.set_attn_implementation("sdpa")
    bert_ids = torch.randint(3, vocab_size, (args.batch_size, args.genes), generator=torch.Generator().manual_seed(0))
    bert_inputs = {"input_ids": bert_ids, "attention_mask": torch.ones_like(bert_ids)}

    runs = [("BertModel (Geneformer V1 shape), SDPA", bert, bert_inputs)]
    for encoder_type, attention_type, shared in [
        ("standard", "mha", False),
        ("standard", "mla", False),
        ("dual_branch", "mha", True),
        ("dual_branch", "mla", True),
        ("dual_branch", "mha", False),
    ]:
        config = ScGeneConfig(
            vocab_size=vocab_size, encoder_type=encoder_type, attention_type=attention_type, pooling="mean",
            **GENEFORMER_V1,
        )
        model = ScGeneModel(config).eval()
        model.set_attn_implementation("sdpa")
        panel = "one shared panel" if shared else "own panel per cell"
        label = f"ScGene {encoder_type}/{attention_type}, {panel}"
        runs.append((label, model, scgene_inputs(args.batch_size, args.genes, vocab_size, shared)))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--genes", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", type=int, help=argparse.SUPPRESS)  # internal: one run's peak, fresh process
    args = parser.parse_args()
    runs = build_runs(args)
    if args.memory_of is not None:
        _, model, inputs = runs[args.memory_of]
        before = resident_mb("VmRSS")
        time_forward(model, inputs)
        print(resident_mb("VmHWM") - before)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.genes} genes")
    peak_flops = matmul_flops_per_second()

    # warm up, then time the models round-robin and keep each one's best run: a burst of other load on the machine
    # then slows one round, not one model
    flops = {label: count_flops(model, inputs) for label, model, inputs in runs}
    best = {label: float("inf") for label, _, _ in runs}
    for _ in range(args.repeats):
        for label, model, inputs in runs:
            best[label] = min(best[label], time_forward(model, inputs))
    rss_mb = {label: forward_peak_mb(index, args, live=False) for index, (label, _, _) in enumerate(runs)}
    live_mb = {label: forward_peak_mb(index, args, live=True) for index, (label, _, _) in enumerate(runs)}

    header = (f"{'model':<44} {'params':>8} {'cells/s':>8} {'s/batch':>8} {'RSS MB':>7} {'live MB':>7} "
              f"{'GFLOP/cell':>10} {'vs BERT':>8} {'MFU':>6}")
    print(f"fp32 {2048}x{2048} matmul: {peak_flops / 1e9:.1f} GFLOP/s")
    print(header)
    print("-" * len(header))
    bert_seconds = best[runs[0][0]]
    for label, model, _ in runs:
        seconds = best[label]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{label:<44} {params:>7.2f}M {args.batch_size / seconds:>8.2f} {seconds:>8.2f} {rss_mb[label]:>7.0f} "
            f"{live_mb[label]:>7.0f} "
            f"{flops[label] / args.batch_size / 1e9:>10.1f} {bert_seconds / seconds:>8.2f} "
            f"{flops[label] / seconds / peak_flops:>6.0%}"
        )


if __name__ == "__main__":
    main()
