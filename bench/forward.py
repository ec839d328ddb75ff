"""Cell-embedding inference speed of the ScGene encoders against transformers' BertModel (what Geneformer runs).

Shape: Geneformer V1 (6 layers, d=256, 4 heads, FFN 512), batch 8, 2,048 genes per cell, fp32, SDPA, inference mode.
Prints one row per model: cells/s, seconds per batch, peak RSS growth during the run, FLOPs per cell (counted once
with eager attention by torch's FlopCounterMode), the speed ratio against BertModel measured in the same process, and
model FLOPs utilisation against a 2,048 x 2,048 fp32 matmul timed in the same run.

    python bench/forward.py [--batch-size 8] [--genes 2048] [--repeats 3]
"""

import argparse
import os
import threading
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from scgene import ScGeneConfig, ScGeneModel

GENEFORMER_V1 = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)


class PeakRSS:
    """Highest resident set size seen while the block runs, sampled every 2 ms, minus the size at entry."""

    def __enter__(self):
        self.process = psutil.Process(os.getpid())
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth_mb = (self.peak - self.start) / 2**20


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def count_flops(model, inputs) -> float:
    """FLOPs of one forward, counted with eager attention (the same arithmetic SDPA does, made visible)."""
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(**inputs)
    model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def time_forward(model, inputs, repeats: int) -> tuple[float, float]:
    with torch.inference_mode():
        model(**inputs)  # warm-up
        with PeakRSS() as memory:
            start = time.perf_counter()
            for _ in range(repeats):
                model(**inputs)
            seconds = (time.perf_counter() - start) / repeats
    return seconds, memory.growth_mb


def scgene_inputs(batch_size: int, genes: int, vocab_size: int, shared_panel: bool):
    generator = torch.Generator().manual_seed(0)
    if shared_panel:
        ids = (torch.randperm(vocab_size - 3, generator=generator)[:genes] + 3).expand(batch_size, -1).clone()
    else:
        ids = torch.stack([torch.randperm(vocab_size - 3, generator=generator)[:genes] + 3 for _ in range(batch_size)])
    values = torch.rand(batch_size, genes, generator=generator) * 4
    return {"input_ids": ids, "expression_values": values, "attention_mask": torch.ones_like(ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--genes", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.genes} genes")

    peak_flops = matmul_flops_per_second()
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

    header = f"{'model':<44} {'params':>8} {'cells/s':>8} {'s/batch':>8} {'peak MB':>8} {'GFLOP/cell':>10} {'vs BERT':>8} {'MFU':>6}"
    print(f"fp32 {2048}x{2048} matmul: {peak_flops / 1e9:.1f} GFLOP/s")
    print(header)
    print("-" * len(header))
    bert_seconds = None
    for label, model, inputs in runs:
        flops = count_flops(model, inputs)
        seconds, peak_mb = time_forward(model, inputs, args.repeats)
        bert_seconds = bert_seconds or seconds
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"{label:<44} {params:>7.2f}M {args.batch_size / seconds:>8.2f} {seconds:>8.2f} {peak_mb:>8.0f} "
            f"{flops / args.batch_size / 1e9:>10.1f} {bert_seconds / seconds:>8.2f} {flops / seconds / peak_flops:>6.0%}"
        )


if __name__ == "__main__":
    main()
