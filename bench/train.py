"""Pretraining-step benchmark: tokens/s and memory of one training step (forward, backward, AdamW step) of
`ScGeneForMaskedExpression` against transformers' `BertForMaskedLM` with SDPA attention (what Geneformer pretrains)
of the same shape on the same number of tokens (issue 10). Not a test; prints a Markdown table.

Every model gets the same batch layout: `--batch` cells of `--length` tokens, no padding, 15% of the tokens masked.
ScGene: the standard encoder (MHA) with binned expression, value and bin losses, the frozen prior as its gene
embedding; the dual-branch encoder is a second row. BERT: the same hidden size, layers, heads and MLP width, with the
default human vocabulary as its word list (its MLM head scores every vocabulary entry at every position, as
Geneformer's does), and a second row with a 64-word vocabulary to show the encoder alone. Speed is timed in one
process, the models taking turns (`--repeats` rounds of `--steps` steps, the best round counts), so the ratio is
not skewed by other load; memory is measured per model in a fresh process: the peak resident memory (VmHWM) during
the steps minus the resident memory once model and optimizer exist (activations, gradients, optimizer state); on a
GPU, the CUDA allocator's peak during the steps minus what it held before them, in the timing process. "MFU": the FLOPs
of a step (forward and backward, counted once by torch's FlopCounterMode with eager attention) per second, over a
large matmul in the run's precision timed in the same run (2,048 on the CPU, 8,192 on a GPU).

    python bench/train.py [--hidden 256 --layers 4 --heads 4 --length 1024 --batch 8] [--device cuda --dtype bfloat16]
    python bench/train.py --hidden 512 --layers 12 --heads 8 --intermediate 1024 --length 4096 --device cuda \
        --dtype bfloat16   # the Geneformer V2 12L shape
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from forward import matmul_flops_per_second  # noqa: E402

MASKED_FRACTION = 0.15


def resident_gb(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024**2


def build(name: str, args) -> tuple[torch.nn.Module, dict]:
    """A model and a batch of `args.batch` x `args.length` tokens for it (seeded)."""
    from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneTokenizer

    generator = torch.Generator().manual_seed(0)
    vocab_size = ScGeneTokenizer().vocab_size
    shape = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 intermediate_size=args.intermediate or 4 * args.hidden)
    tokens = (args.batch, args.length)
    input_ids = torch.randint(3, vocab_size, tokens, generator=generator)
    input_ids[:, 0] = ScGeneTokenizer().cls_token_id  # both models read a <cls>-first sequence
    masked = torch.rand(tokens, generator=generator) < MASKED_FRACTION
    masked[:, 0] = False
    if name.startswith("bert"):
        from transformers import BertConfig, BertForMaskedLM

        words = 64 if name == "bert-small-vocab" else vocab_size
        config = BertConfig(vocab_size=words, max_position_embeddings=args.length, attn_implementation="sdpa",
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **shape)
        model = BertForMaskedLM(config)
        input_ids = input_ids % words
        labels = torch.where(masked, input_ids, -100)
        return model, {"input_ids": input_ids.masked_fill(masked, 1), "attention_mask": torch.ones(tokens, dtype=torch.long),
                       "labels": labels}
    config = ScGeneConfig(vocab_size=vocab_size, n_bins=51, encoder_type=name.removeprefix("scgene-"),
                          expression_encoding="binned", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          **shape)
    model = ScGeneForMaskedExpression(config)
    model.set_gene_prior(torch.randn(vocab_size, args.hidden, generator=generator))
    values = torch.rand(tokens, generator=generator) * 5
    bins = torch.randint(1, 51, tokens, generator=generator)
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones(tokens, dtype=torch.long),
        "expression_values": values.masked_fill(masked, config.mask_value), "expression_bins": bins.masked_fill(masked, 0),
        "labels": torch.where(masked, values, -100.0), "bin_labels": torch.where(masked, bins, -100),
    }
    return model, batch


def precision(device: str, dtype: str):
    """Autocast to `dtype` on `device` (nothing for float32)."""
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device, dtype=getattr(torch, dtype))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(model, optimizer, batch, steps: int, device: str = "cpu", dtype: str = "float32") -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with precision(device, dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def step_flops(model, batch) -> float:
    """FLOPs of one forward and backward (eager attention: the same arithmetic SDPA does, made visible), counted on
    the batch's first cell and multiplied by the cells: every cost is per cell, and eager attention on a whole batch
    of long cells would hold (cells, heads, length, length) per layer for the backward."""
    cells = len(batch["input_ids"])
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        model(**{name: tensor[:1] for name, tensor in batch.items()}).loss.backward()
    model.zero_grad(set_to_none=True)
    model.set_attn_implementation("sdpa")
    return counter.get_total_flops() * cells


def placed(name: str, args) -> tuple[torch.nn.Module, dict]:
    model, batch = build(name, args)
    return model.to(args.device), {key: value.to(args.device) for key, value in batch.items()}


def measure_memory(name: str, args) -> dict:
    """In this (fresh) process: resident memory added by `args.steps` training steps."""
    model, batch = placed(name, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = resident_gb("VmRSS")
    train_steps(model, optimizer, batch, args.steps, args.device, args.dtype)
    return {"step_gb": resident_gb("VmHWM") - before,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokens (genes) per cell")
    parser.add_argument("--intermediate", type=int, help="MLP width (default 4 x hidden)")
    parser.add_argument("--batch", type=int, default=8, help="cells per step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast precision of the forward (the weights and optimizer stay float32)")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per model")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return

    names = ["bert", "bert-small-vocab", "scgene-standard", "scgene-dual_branch"]
    on_gpu = args.device.startswith("cuda")
    runs, flops, memory = {}, {}, {}
    for name in names:
        model, batch = placed(name, args)
        flops[name] = step_flops(model, batch)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        train_steps(model, optimizer, batch, 1, args.device, args.dtype)  # warm-up: allocator, kernels, AdamW state
        runs[name] = (model, optimizer, batch)
        memory[name] = {"parameters_m": sum(p.numel() for p in model.parameters()) / 1e6}
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.repeats):
        for name in names:
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            best[name] = min(best[name], train_steps(*runs[name], args.steps, args.device, args.dtype))
            if on_gpu:
                memory[name]["step_gb"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    matmul_size = 8192 if on_gpu else 2048
    matmul_peak = matmul_flops_per_second(matmul_size, device=args.device, dtype=getattr(torch, args.dtype))
    tokens = args.batch * args.length * args.steps
    if not on_gpu:
        flags = [f"--{key}={getattr(args, key)}" for key in ("hidden", "layers", "heads", "length", "batch", "steps",
                                                              "dtype")]
        flags += [f"--intermediate={args.intermediate}"] if args.intermediate else []
        memory = {name: json.loads(subprocess.run([sys.executable, __file__, "--memory-of", name, *flags], check=True,
                                                  capture_output=True, text=True).stdout.strip().splitlines()[-1])
                  for name in names}
    where = torch.cuda.get_device_name() if on_gpu else f"{torch.get_num_threads()} threads"
    print(f"Training step (forward, backward, AdamW), {args.batch} cells x {args.length} tokens, hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate or 4 * args.hidden}, "
          f"{args.dtype}, {args.device} ({where}); best of {args.repeats} rounds of {args.steps} steps; MFU against a "
          f"{matmul_size:,} x {matmul_size:,} {args.dtype} matmul at {matmul_peak / 1e9:,.0f} GFLOP/s\n")
    print("| model | parameters | tokens/s | ratio to BertForMaskedLM (SDPA) | MFU | memory of the steps |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {"bert": "BertForMaskedLM, SDPA, vocabulary of the default human tokenizer",
              "bert-small-vocab": "BertForMaskedLM, SDPA, 64-word vocabulary (the encoder alone)",
              "scgene-standard": "ScGeneForMaskedExpression, standard encoder (MHA)",
              "scgene-dual_branch": "ScGeneForMaskedExpression, dual-branch encoder"}
    for name in names:
        speed = tokens / best[name]
        utilisation = flops[name] * args.steps / best[name] / matmul_peak
        print(f"| {labels[name]} | {memory[name]['parameters_m']:.1f} M | {speed:,.0f} | "
              f"{best['bert'] / best[name]:.2f} | {utilisation:.1%} | {memory[name]['step_gb']:.2f} GB |")
    ratio = best["bert"] / best["scgene-standard"]
    print(f"\nTarget: the standard encoder at least 1.0x BertForMaskedLM's tokens/s -> {ratio:.2f}x, "
          f"{'met' if ratio >= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
