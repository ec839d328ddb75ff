"""Cell-embedding throughput of `scgene.embed` on real-length cells, against the two usual ways of embedding cells.

The cells: simulated raw UMI counts shaped like PBMC data, each cell expressing 500-3,000 genes (log-uniform: many
small cells, a few large), genes drawn by a log-normal popularity from the default human vocabulary's symbols, counts
1 + Poisson (mostly 1-3 UMIs, a long tail). The model: an ScGene standard encoder of the Geneformer V1 shape (6 layers,
d=256, 4 heads, FFN 512, mean pooling), saved with `save_pretrained` and its tokenizer (max_length 4,096, so no cell is
truncated) in a temporary folder and loaded once, outside the timings. Rows, all on the same cells:

- `scgene.embed`: default settings (token budget 16,384, length-sorted windows), model and tokenizer passed as loaded
  objects, so only the embedding is timed (tokenizing included); the time to load the checkpoint is printed apart;
- optionally (`--with-2048`) `scgene.embed` with the tokenizer's default max_length 2,048 (cells above 2,047 genes keep
  their highest-expressed 2,047: fewer tokens, not the same embeddings);
- (a) the naive loop: every 32 cells in input order, `tokenizer(adata[i:i+32], return_tensors="pt")` and a forward of
  the same model under `torch.no_grad`;
- (b) transformers' `BertModel` (SDPA) of the same shape and vocabulary, fed the same per-cell token counts (random ids)
  the way Geneformer's `EmbExtractor.get_embs` does: cells sorted longest first, fixed batches of 100 (its default
  `forward_batch_size`), padded per batch with an attention mask, `output_hidden_states=True` and the mean of the
  second-to-last layer over real tokens (its default `emb_layer=-1`), here under `torch.inference_mode`. Geneformer's
  input is pre-tokenized, so this row does no tokenizing;
- (b) at scale: the same BertModel forward in near padding-free batches. With few cells, 100 neighbours in the
  length-sorted list span very different lengths (a 128-cell run pads (b) by ~40%); in a dataset of 100,000 cells they
  have almost the same length (0.1% padding). This row stands in for that case, so the comparison with Geneformer
  does not rest on the padding of a small benchmark.
- optionally (`--with-compile`) `scgene.embed(..., torch_compile=True)` and the (b)-at-scale row with
  `torch.compile(BertModel, dynamic=True)`, each compiled once in the warm-up (the time is printed apart), so that
  compiling ScGene is compared with compiling BertModel too, not only with BertModel as Geneformer runs it.

Timing: one warm-up on 8 cells per row, then `--repeats` round-robin passes over all cells, best pass kept (a burst of
other load slows one pass, not one row); ratios are against (a) and (b) timed in the same process, and are also printed
pass by pass. "tokens/s" counts real (unpadded) tokens, <cls> included; "padding" is the share of padded positions
among those the model ran (counted by a forward hook). "MFU": the model FLOPs of the real tokens (counted by torch's
FlopCounterMode) per second, over a 2,048 x 2,048 fp32 matmul timed in the same run. "peak RSS MB" is the resident memory one pass adds, in a fresh
process per row (VmHWM reset after loading, so it is the pass's own peak; glibc's heap keeps freed blocks, as for a user).

Memory section: `scgene.embed(path)` on backed .h5ad files of N and 4N small cells (10-50 UMIs each), and N cells
with 4x the token budget, each in a fresh process, with a copy of the model of the same width and vocabulary but
`--memory-layers` layers (1 by default, to keep the run short: at inference each layer's activations are freed before
the next, so depth changes the weights, ~1.6 MB a layer, not the activation peak). The growth from N to 4N cells is
split into the output array (n_cells x d float32, which any method must return), the obs names and the rest (the
tokenized window, which the code caps at `WINDOW_TOKENS`), and extrapolated to 1M cells.

Runtime: real-length cells are slow on CPU (~4,000 tokens/s for this model on 2 cores): one pass of all rows over the
default 128 cells takes ~6 minutes, the whole benchmark ~20. `--n-cells 64 --repeats 1 --no-memory` checks it in ~4.

    python bench/embed.py [--n-cells 128] [--repeats 2] [--with-2048] [--with-compile] [--memory-cells 10000]
                          [--memory-layers 1] [--no-memory]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENEFORMER_V1 = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)
GENEFORMER_V2 = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1024)  # 12L-38M
SHAPES = {"v1": GENEFORMER_V1, "v2": GENEFORMER_V2}
GENEFORMER_FORWARD_BATCH_SIZE = 100  # geneformer.emb_extractor.EmbExtractor(forward_batch_size=100), its default
NAIVE_BATCH_SIZE = 32
N_GENES = 20_000
ATLAS_GENES, ATLAS_REFERENCE_CELLS, ATLAS_TARGET_MB = 5_000, 10_000, 3_000
TARGET_VS_NAIVE, TARGET_VS_GENEFORMER = 1.5, 1.0
TARGET_AT_SCALE = 1.2  # issue 26: scgene.embed against (b) at scale
METHODS = {  # key -> row label
    "embed": "scgene.embed (max_length 4096)",
    "embed2048": "scgene.embed, max_length 2048 (truncates)",
    "naive": "(a) naive loop, 32 cells + forward",
    "geneformer": "(b) BertModel, Geneformer extractor",
    "geneformer_at_scale": "(b) at scale: same, ~unpadded batches",
    "embed_compiled": "scgene.embed, torch_compile=True",
    "geneformer_at_scale_compiled": "(b) at scale, torch.compile(BertModel)",
}
COMPILED = {"embed_compiled": "embed", "geneformer_at_scale_compiled": "geneformer_at_scale"}  # row -> its eager row


# ----------------------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------------------


def gene_symbols(n_genes: int) -> list[str]:
    """The first `n_genes` distinct symbols of the default human vocabulary."""
    from scgene import ScGeneTokenizer

    seen, symbols = set(), []
    for symbol in ScGeneTokenizer().symbols[3:]:
        if symbol and symbol not in seen:
            seen.add(symbol)
            symbols.append(symbol)
    return symbols[:n_genes]


def pbmc_like_counts(n_cells: int, low: int, high: int, n_genes: int, seed: int = 0):
    """CSR raw counts: per cell a log-uniform number of expressed genes in [low, high], drawn without replacement by
    a log-normal gene popularity (Gumbel top-k), each with 1 + Poisson(0.8 x relative popularity) UMIs."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    log_popularity = rng.normal(0.0, 1.5, n_genes)
    n_expressed = np.clip(np.exp(rng.uniform(np.log(low), np.log(high + 1), n_cells)).astype(np.int64), low, high)
    indices, data = [], []
    for expressed in n_expressed:
        keys = log_popularity + rng.gumbel(size=n_genes)
        genes = np.sort(np.argpartition(-keys, expressed)[:expressed])
        popularity = np.exp(log_popularity[genes])
        indices.append(genes.astype(np.int32))
        data.append((1 + rng.poisson(0.8 * popularity / popularity.mean())).astype(np.float32))
    indptr = np.concatenate([[0], np.cumsum(n_expressed)])
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr), shape=(n_cells, n_genes))


def small_cell_counts(n_cells: int, n_genes: int):
    """CSR raw counts of small cells: 10-50 UMIs each, each UMI a gene drawn by a log-normal popularity."""
    from tokenizer import make_counts  # bench/tokenizer.py, next to this script

    return make_counts(n_cells, n_genes, seed=1, block=50_000, umis=(10, 50), spread=1.5)


def anndata_of(counts, symbols):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=[f"cell{i}" for i in range(counts.shape[0])])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=symbols))


def save_checkpoint(folder: Path, num_layers: int, max_length: int, shape: dict = GENEFORMER_V1) -> None:
    """An ScGene standard encoder of a Geneformer shape (random weights, random prior) and its tokenizer."""
    import torch

    from scgene import ScGeneConfig, ScGeneModel, ScGeneTokenizer

    tokenizer = ScGeneTokenizer(max_length=max_length)
    torch.manual_seed(0)
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, encoder_type="standard", attention_type="mha",
                          pooling="mean", **(shape | {"num_hidden_layers": num_layers}))
    model = ScGeneModel(config)
    prior = torch.randn(config.vocab_size, config.hidden_size) * 0.5
    prior[:3] = 0
    model.set_gene_prior(prior)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_checkpoint(folder: Path, device: str = "cpu"):
    from scgene import ScGeneModel, ScGeneTokenizer

    model = ScGeneModel.from_pretrained(folder).eval().to(device)
    model.set_attn_implementation("sdpa")
    return model, ScGeneTokenizer.from_pretrained(folder)


def geneformer_bert(vocab_size: int, max_positions: int, shape: dict = GENEFORMER_V1):
    """transformers' BertModel of a Geneformer shape (ReLU, as Geneformer V1), SDPA, eval mode."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_act="relu",
                                **shape), add_pooling_layer=False).eval()
    bert.set_attn_implementation("sdpa")
    return bert


def token_lengths(tokenizer, adata, **kwargs) -> np.ndarray:
    """Tokens per cell (<cls> included), as the tokenizer makes them."""
    return np.concatenate([chunk.lengths for chunk in tokenizer.iter_encoded(adata, **kwargs)])


class Setup:
    """The cells, the checkpoint loaded from `workdir`, BertModel and its pre-tokenized cells, on the device and in the
    precision of `workdir/setup.json`: what every row needs."""

    def __init__(self, workdir: Path):
        import anndata as ad
        import torch

        settings = json.loads((workdir / "setup.json").read_text())
        self.device, self.dtype, shape = settings["device"], settings["dtype"], SHAPES[settings["shape"]]
        self.adata = ad.read_h5ad(workdir / "cells.h5ad")
        self.model, self.tokenizer = load_checkpoint(workdir / "model", self.device)
        self.lengths = token_lengths(self.tokenizer, self.adata)
        self.lengths_2048 = token_lengths(self.tokenizer, self.adata, max_length=2048)
        self.bert = geneformer_bert(self.tokenizer.vocab_size, max(self.tokenizer.max_length, int(self.lengths.max())),
                                    shape).to(self.device)
        generator = torch.Generator().manual_seed(0)
        # Geneformer's .dataset: one 1-D tensor of token ids per cell, same lengths as ScGene's tokens
        self.bert_cells = [torch.randint(3, self.tokenizer.vocab_size, (int(n),), generator=generator)
                           for n in self.lengths]
        # dynamic shapes, as scgene.embed(torch_compile=True); not fullgraph: transformers' hidden-state capture
        # (output_hidden_states) takes a lock that dynamo cannot trace, so the graph breaks there
        self.bert_compiled = torch.compile(self.bert, dynamic=True)

    def autocast(self):
        """The precision of the run for the rows that call a model directly (scgene.embed gets `dtype=`)."""
        import contextlib

        import torch

        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=getattr(torch, self.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# The rows
# ----------------------------------------------------------------------------------------------------------------------


def run_embed(setup: Setup, adata, max_length: int | None = None, torch_compile: bool = False) -> np.ndarray:
    import scgene

    extra = {} if max_length is None else {"max_length": max_length}
    return scgene.embed(adata, setup.model, tokenizer=setup.tokenizer, key_added=None, progress=False,
                        dtype=setup.dtype, torch_compile=torch_compile, **extra)


def run_naive(setup: Setup, adata) -> np.ndarray:
    import torch

    embeddings = np.empty((adata.n_obs, setup.model.config.hidden_size), np.float32)
    with torch.no_grad(), setup.autocast():
        for start in range(0, adata.n_obs, NAIVE_BATCH_SIZE):
            batch = setup.tokenizer(adata[start : start + NAIVE_BATCH_SIZE], return_tensors="pt").to(setup.device)
            embeddings[start : start + NAIVE_BATCH_SIZE] = setup.model(**batch).pooler_output.float().cpu().numpy()
    return embeddings


def run_geneformer(setup: Setup, n_cells: int, at_scale: bool = False, compiled: bool = False) -> np.ndarray:
    """Geneformer's EmbExtractor.get_embs on pre-tokenized cells: sort longest first, then per batch of 100
    pad_tensor_list, gen_attention_mask, forward with hidden states, mean_nonpadding_embs of layer L-1.

    `at_scale`: the same, but in near padding-free batches (scgene's token-budget batches of the length-sorted cells),
    standing in for Geneformer's batches of 100 on a large dataset, where 100 neighbours in the sorted list have
    almost the same length (0.1% padding at 100,000 cells). `compiled`: the forward of `torch.compile(BertModel)`."""
    import torch

    bert = setup.bert_compiled if compiled else setup.bert
    cells, lengths = setup.bert_cells[:n_cells], setup.lengths[:n_cells]
    layer = setup.bert.config.num_hidden_layers - 1  # emb_layer=-1: the second-to-last layer
    embeddings = np.empty((n_cells, setup.bert.config.hidden_size), np.float32)
    with torch.inference_mode(), setup.autocast():
        for rows in token_budget_batches(lengths) if at_scale else geneformer_batches(lengths):
            batch_lengths = torch.from_numpy(lengths[rows])
            width = int(batch_lengths.max())
            input_ids = torch.zeros((len(rows), width), dtype=torch.long)  # <pad> is 0
            for i, row in enumerate(rows):
                input_ids[i, : lengths[row]] = cells[row]
            attention_mask = (torch.arange(width)[None, :] < batch_lengths[:, None]).long()
            input_ids, attention_mask = input_ids.to(setup.device), attention_mask.to(setup.device)
            hidden = bert(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=True).hidden_states[layer]
            mean = (hidden.float() * attention_mask[..., None]).sum(1) / batch_lengths[:, None].to(setup.device)
            embeddings[rows] = mean.cpu().numpy()  # back to input order, as scgene.embed returns them
    return embeddings


def geneformer_batches(lengths: np.ndarray) -> list:
    """Geneformer's batches: the cells sorted longest first (downsample_and_sort), cut every 100."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + GENEFORMER_FORWARD_BATCH_SIZE] for i in range(0, len(order), GENEFORMER_FORWARD_BATCH_SIZE)]


def token_budget_batches(lengths: np.ndarray) -> list:
    """scgene.embed's batches at its defaults (all cells in one window)."""
    from scgene.inference import DEFAULT_MAX_TOKENS_PER_BATCH, plan_batches

    return plan_batches(lengths, DEFAULT_MAX_TOKENS_PER_BATCH, None)


def run(method: str, setup: Setup, n_cells: int | None = None) -> np.ndarray:
    """One pass of `method` over the first `n_cells` cells (all by default)."""
    n_cells = setup.adata.n_obs if n_cells is None else n_cells
    adata = setup.adata if n_cells == setup.adata.n_obs else setup.adata[:n_cells].copy()
    if method == "embed":
        return run_embed(setup, adata)
    if method == "embed2048":
        return run_embed(setup, adata, max_length=2048)
    if method == "embed_compiled":
        return run_embed(setup, adata, torch_compile=True)
    if method == "naive":
        return run_naive(setup, adata)
    return run_geneformer(setup, n_cells, at_scale=method.startswith("geneformer_at_scale"),
                          compiled=method in COMPILED)


class PositionCounter:
    """Counts the token positions (padding included) each model runs, through a forward pre-hook. `paused()` removes
    the hooks, for the compiled rows: a hook would be traced into their graph."""

    def __init__(self, *models):
        self.positions, self.models, self.handles = 0, models, []
        self.attach()

    def attach(self) -> None:
        self.handles = [model.register_forward_pre_hook(self.count, with_kwargs=True) for model in self.models]

    @contextlib.contextmanager
    def paused(self):
        for handle in self.handles:
            handle.remove()
        try:
            yield
        finally:
            self.attach()

    def count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions += input_ids.numel()


# ----------------------------------------------------------------------------------------------------------------------
# Memory, in fresh processes
# ----------------------------------------------------------------------------------------------------------------------


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: the peak since the last reset), in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux: clear_refs 5) and return the RSS: loading's own peak is left out."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")


def child(command: list[str]) -> dict:
    output = subprocess.run([sys.executable, __file__, *command], capture_output=True, text=True)
    if output.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def memory_of_method(method: str, workdir: Path) -> dict:
    setup = Setup(workdir)
    if method in COMPILED:  # compiling is paid once per process: its memory is not the pass's
        run(method, setup, n_cells=min(8, setup.adata.n_obs))
    before = reset_peak()
    start = time.perf_counter()
    run(method, setup)
    return {"peak_mb": status_mb("VmHWM") - before, "seconds": time.perf_counter() - start}


def memory_of_backed(path: Path, workdir: Path, budget: int) -> dict:
    import anndata  # noqa: F401  (imported before the baseline: reading a path imports it, once per process)

    import scgene

    model, tokenizer = load_checkpoint(workdir / "model_memory")
    before = reset_peak()
    start = time.perf_counter()
    embeddings = scgene.embed(str(path), model, tokenizer=tokenizer, max_tokens_per_batch=budget, progress=False)
    seconds, peak_mb = time.perf_counter() - start, status_mb("VmHWM") - before
    backed = anndata.read_h5ad(path, backed="r")  # what opening the path holds per cell: the obs table
    obs_mb = backed.obs.memory_usage(index=True, deep=True).sum() / 2**20
    backed.file.close()
    return {"peak_mb": peak_mb, "seconds": seconds, "output_mb": embeddings.nbytes / 2**20, "obs_mb": obs_mb}


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def flops_per_cell(model, vocab_size: int, lengths: np.ndarray, scgene_inputs: bool) -> np.ndarray:
    """Model FLOPs of one forward of a cell of each length. A transformer's FLOPs are a quadratic polynomial in the
    length, so they are counted (`bench/forward.py`'s FlopCounterMode count) at three lengths and interpolated."""
    import torch
    from forward import count_flops

    probes = np.array([16, 64, 256])
    counted = []
    for n in probes:
        inputs = {"input_ids": torch.randint(3, vocab_size, (1, int(n))), "attention_mask": torch.ones(1, int(n))}
        if scgene_inputs:
            inputs |= {"expression_values": torch.rand(1, int(n)), "expression_bins": torch.ones(1, int(n)).long()}
        inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
        counted.append(count_flops(model, inputs))
    return np.polyval(np.polyfit(probes, counted, 2), lengths)


def padding_share(lengths: np.ndarray, batches) -> float:
    positions = sum(len(rows) * int(lengths[rows].max()) for rows in batches)
    return 1 - lengths.sum() / positions


def speed_section(args, workdir: Path) -> None:
    import torch

    counts = pbmc_like_counts(args.n_cells, args.min_genes, args.max_genes, N_GENES)
    anndata_of(counts, gene_symbols(N_GENES)).write_h5ad(workdir / "cells.h5ad")
    shape = SHAPES[args.shape]
    save_checkpoint(workdir / "model", shape["num_hidden_layers"], args.max_length, shape)
    (workdir / "setup.json").write_text(json.dumps({"device": args.device, "dtype": args.dtype, "shape": args.shape}))
    start = time.perf_counter()
    load_checkpoint(workdir / "model", args.device)
    load_seconds = time.perf_counter() - start

    setup = Setup(workdir)
    lengths = setup.lengths
    methods = ["embed"] + (["embed2048"] if args.with_2048 else []) + ["naive", "geneformer", "geneformer_at_scale"]
    methods += list(COMPILED) if args.with_compile else []
    real_tokens = {method: int(lengths.sum()) for method in methods}
    real_tokens["embed2048"] = int(setup.lengths_2048.sum())
    genes = np.diff(counts.indptr)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.device} ({where}); load average {os.getloadavg()[0]:.2f} at start")
    print(f"{args.n_cells} cells, {genes.min()}-{genes.max()} expressed genes per cell (mean {genes.mean():.0f}, "
          f"{counts.sum() / args.n_cells:,.0f} UMIs), {lengths.mean():.0f} tokens per cell with <cls> "
          f"(max_length {args.max_length}: none truncated; {int((setup.lengths_2048 < lengths).sum())} cells above "
          f"2,048)")
    print(f"model: ScGene standard/mha at the Geneformer {args.shape.upper()} shape ({shape['num_hidden_layers']} "
          f"layers, d={shape['hidden_size']}, {shape['num_attention_heads']} heads, FFN {shape['intermediate_size']}), "
          f"vocab {setup.tokenizer.vocab_size:,}, {args.dtype}, SDPA; checkpoint loading (model + tokenizer) "
          f"{load_seconds:.2f} s, not timed below")

    counter = PositionCounter(setup.model, setup.bert)
    for method in methods:  # warm-up (and, for the compiled rows, compiling: timed apart)
        start = time.perf_counter()
        with counter.paused() if method in COMPILED else contextlib.nullcontext():
            run(method, setup, n_cells=min(8, args.n_cells))
        if method in COMPILED:
            print(f"{METHODS[method]}: compiling and the warm-up took {time.perf_counter() - start:.1f} s (not timed "
                  f"below; paid once per process)")
    seconds = {method: [] for method in methods}
    positions, outputs, gpu_peak = {}, {}, {}
    on_gpu = args.device.startswith("cuda")
    for repeat in range(args.repeats):
        for method in methods:
            counter.positions = 0
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            with counter.paused() if method in COMPILED else contextlib.nullcontext():
                outputs[method] = run(method, setup)  # back in host memory: the GPU has finished
            seconds[method].append(time.perf_counter() - start)
            positions[method] = positions[COMPILED[method]] if method in COMPILED else counter.positions
            if on_gpu:
                gpu_peak[method] = (torch.cuda.max_memory_allocated() - before) / 2**20
        print(f"  pass {repeat + 1}/{args.repeats}: " + ", ".join(f"{m} {seconds[m][-1]:.1f} s" for m in methods),
              file=sys.stderr, flush=True)
    load_timed = os.getloadavg()[0]
    # on a GPU the memory a pass adds is the CUDA allocator's peak, in this process; on the CPU, a fresh process per row
    peak = gpu_peak if on_gpu else {method: child(["--memory-of", method, "--workdir", str(workdir)])["peak_mb"]
                                    for method in methods}

    # MFU: the model FLOPs of the real tokens (padding is not useful work) over the time, against a large fp32 matmul
    from forward import matmul_flops_per_second

    matmul_size = 8192 if on_gpu else 2048
    matmul_peak = matmul_flops_per_second(matmul_size, device=args.device, dtype=getattr(torch, args.dtype))
    scgene_flops = flops_per_cell(setup.model, setup.tokenizer.vocab_size, lengths, scgene_inputs=True).sum()
    bert_flops = flops_per_cell(setup.bert, setup.tokenizer.vocab_size, lengths, scgene_inputs=False).sum()
    useful = {method: bert_flops if method.startswith("geneformer") else scgene_flops for method in methods}
    if "embed2048" in methods:
        useful["embed2048"] = flops_per_cell(setup.model, setup.tokenizer.vocab_size, setup.lengths_2048,
                                             scgene_inputs=True).sum()

    print(f"\nbest of {args.repeats} round-robin passes; load average {load_timed:.2f} after the timed passes; MFU "
          f"against a {matmul_size:,} x {matmul_size:,} {args.dtype} matmul at {matmul_peak / 1e9:,.0f} GFLOP/s\n")
    memory_label = "peak GPU MB" if on_gpu else "peak RSS MB"
    header = (f"{'method':<42} {'cells':>5} {'cells/s':>8} {'tokens/s':>9} {'padding':>8} {'MFU':>6} "
              f"{memory_label:>11} {'vs (a)':>7} {'vs (b)':>7}")
    print(header)
    print("-" * len(header))
    speed = {method: args.n_cells / min(seconds[method]) for method in methods}
    for method in methods:
        print(f"{METHODS[method]:<42} {args.n_cells:>5} {speed[method]:>8.2f} "
              f"{real_tokens[method] * speed[method] / args.n_cells:>9,.0f} "
              f"{1 - real_tokens[method] / positions[method]:>8.1%} "
              f"{useful[method] / min(seconds[method]) / matmul_peak:>6.1%} {peak[method]:>11,.0f} "
              f"{speed[method] / speed['naive']:>7.2f} {speed[method] / speed['geneformer']:>7.2f}")
    difference = np.abs(outputs["embed"] - outputs["naive"]).max()
    print(f"\nscgene.embed vs (a), same model and cells: max |difference| {difference:.1e}")
    for method, eager in COMPILED.items() if args.with_compile else ():
        print(f"{METHODS[method]} vs {METHODS[eager]}: max |difference| "
              f"{np.abs(outputs[method] - outputs[eager]).max():.1e}")
    for name, reference in (("(a)", "naive"), ("(b)", "geneformer"), ("(b) at scale", "geneformer_at_scale")):
        ratios = [mine / theirs for mine, theirs in zip(seconds[reference], seconds["embed"])]
        print(f"scgene.embed vs {name}, pass by pass: " + ", ".join(f"{ratio:.2f}x" for ratio in ratios))

    # (b)'s padding depends on the number of cells: its batches are 100 neighbours in the length-sorted list
    rng = np.random.default_rng(2)
    shares = []
    for n in (args.n_cells, 1_000, 100_000):
        sample = lengths if n == args.n_cells else rng.choice(lengths, n)
        shares.append(f"{n:,} cells (b) {padding_share(sample, geneformer_batches(sample)):.1%}, scgene.embed "
                      f"{padding_share(sample, token_budget_batches(sample)):.1%}")
    print("padding with these cells' lengths (computed): " + "; ".join(shares))

    print(f"\nTargets (cells/s): scgene.embed >= {TARGET_VS_NAIVE}x (a) and >= {TARGET_VS_GENEFORMER}x (b)")
    for name, reference, target in (("(a)", "naive", TARGET_VS_NAIVE), ("(b)", "geneformer", TARGET_VS_GENEFORMER),
                                    ("(b) at scale", "geneformer_at_scale", TARGET_VS_GENEFORMER)):
        ratio = speed["embed"] / speed[reference]
        print(f"- vs {name}: {ratio:.2f}x -> {'met' if ratio >= target else 'NOT met'}")
    if args.with_compile:
        print(f"Issue 26's target: >= {TARGET_AT_SCALE}x (b) at scale")
        for mine, reference in (("embed", "geneformer_at_scale"), ("embed_compiled", "geneformer_at_scale"),
                                ("embed_compiled", "geneformer_at_scale_compiled")):
            ratio = speed[mine] / speed[reference]
            passes = ", ".join(f"{theirs / own:.2f}x" for own, theirs in zip(seconds[mine], seconds[reference]))
            print(f"- {METHODS[mine]} vs {METHODS[reference]}: {ratio:.2f}x (pass by pass {passes}) -> "
                  f"{'met' if ratio >= TARGET_AT_SCALE else 'NOT met'}")


def memory_section(args, workdir: Path) -> None:
    from scgene.inference import DEFAULT_MAX_TOKENS_PER_BATCH, WINDOW_TOKENS

    save_checkpoint(workdir / "model_memory", args.memory_layers, 4096)
    symbols = gene_symbols(N_GENES)
    small, large = args.memory_cells, 4 * args.memory_cells
    counts = small_cell_counts(large, N_GENES)
    tokens = {}
    for n in (small, large):
        anndata_of(counts[:n], symbols).write_h5ad(workdir / f"small_{n}.h5ad")
        tokens[n] = counts[:n].nnz + n  # every gene is in the vocabulary; <cls> per cell; no cell reaches max_length
    runs = [(small, DEFAULT_MAX_TOKENS_PER_BATCH), (large, DEFAULT_MAX_TOKENS_PER_BATCH),
            (small, 4 * DEFAULT_MAX_TOKENS_PER_BATCH)]
    results = {(n, budget): child(["--memory-backed", str(workdir / f"small_{n}.h5ad"), "--workdir", str(workdir),
                                   "--budget", str(budget)]) for n, budget in runs}
    hidden = GENEFORMER_V1["hidden_size"]
    print(f"\nMemory: scgene.embed(path of a backed .h5ad), a fresh process each; 10-50 UMIs per cell; model of the same "
          f"width and vocabulary, {args.memory_layers} layer(s); window {WINDOW_TOKENS:,} tokens\n")
    header = (f"{'cells':>8} {'tokens':>10} {'token budget':>12} {'seconds':>8} {'peak RSS MB added':>18} "
              f"{'of which output':>16}")
    print(header)
    print("-" * len(header))
    for n, budget in runs:
        result = results[n, budget]
        print(f"{n:>8,} {tokens[n]:>10,} {budget:>12,} {result['seconds']:>8.1f} {result['peak_mb']:>18,.0f} "
              f"{result['output_mb']:>16,.1f}")
    base, grown = results[small, DEFAULT_MAX_TOKENS_PER_BATCH], results[large, DEFAULT_MAX_TOKENS_PER_BATCH]
    growth = grown["peak_mb"] - base["peak_mb"]
    per_cell = {key: (grown[key] - base[key]) / (large - small) for key in ("output_mb", "obs_mb")}  # MB per cell
    rest = growth - (large - small) * sum(per_cell.values())
    per_token = rest / (tokens[large] - tokens[small])  # the tokenized window (and heap around it), MB per token
    growing = max(per_token, 0.0)  # a small run can measure heap noise as a negative growth
    budget_growth = results[small, 4 * DEFAULT_MAX_TOKENS_PER_BATCH]["peak_mb"] - base["peak_mb"]
    print(f"\n{small:,} -> {large:,} cells (4x the cells and tokens): peak {growth:+,.0f} MB = output array "
          f"{per_cell['output_mb'] * (large - small):+,.1f} MB + obs names {per_cell['obs_mb'] * (large - small):+,.1f} "
          f"MB + the rest {rest:+,.0f} MB ({per_token * 2**20:,.0f} bytes per added token: the tokenized window)")
    print(f"4x the token budget at {small:,} cells: peak {budget_growth:+,.0f} MB")
    million, tokens_per_cell = 1_000_000, tokens[large] / large
    fixed_mb = base["peak_mb"] - base["output_mb"] - base["obs_mb"]
    linear = fixed_mb + growing * (tokens_per_cell * million - tokens[small]) + million * per_cell["obs_mb"]
    capped = fixed_mb + growing * (min(tokens_per_cell * million, WINDOW_TOKENS) - tokens[small]) \
        + million * per_cell["obs_mb"]
    print(f"1M such cells ({tokens_per_cell * million / 1e6:,.0f}M tokens): the output array alone is "
          f"{million * hidden * 4 / 2**20:,.0f} MB ({million:,} x {hidden} float32, returned to the caller), the obs "
          f"names {million * per_cell['obs_mb']:,.0f} MB; everything else {capped:,.0f} MB with the window capped at "
          f"{WINDOW_TOKENS:,} tokens as the code does ({linear:,.0f} MB if it grew linearly with the tokens, an upper "
          f"bound)")


def cli_peak(command: list[str]) -> dict:
    """Run `command` as a child process; its peak resident memory (ru_maxrss of that child alone) and seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    return {"peak_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start}


def atlas_section(args, workdir: Path) -> None:
    """`scgene embed FILE --out OUT.h5ad` (the shipped checkpoint, output streamed into the file) on a backed file of
    `--atlas-cells` small cells against the same command on 10,000 of them: what the cell count adds to the peak."""
    import h5py

    symbols = gene_symbols(ATLAS_GENES)
    counts = small_cell_counts(args.atlas_cells, ATLAS_GENES)
    runs = {}
    for n in (ATLAS_REFERENCE_CELLS, args.atlas_cells):
        path, out = workdir / f"atlas_{n}.h5ad", workdir / f"atlas_{n}_embedded.h5ad"
        anndata_of(counts[:n], symbols).write_h5ad(path)
        runs[n] = cli_peak([sys.executable, "-m", "scgene.cli", "embed", str(path), "--out", str(out)])
        with h5py.File(out, "r") as written:
            embedded = written["obsm/X_scgene"]
            runs[n] |= {"rows": embedded.shape[0], "finite": bool(np.isfinite(embedded[-1000:]).all())}
        path.unlink()
        out.unlink()
    del counts
    print(f"\nAtlas: `scgene embed FILE --out OUT.h5ad`, shipped checkpoint, backed input, embeddings streamed into the "
          f"output file; 10-50 UMIs per cell, {ATLAS_GENES:,} genes; peak RSS of the whole command (libraries, model)\n")
    print(f"{'cells':>10} {'seconds':>8} {'cells/s':>8} {'peak RSS MB':>12} {'rows written':>13}")
    for n, run in runs.items():
        print(f"{n:>10,} {run['seconds']:>8.0f} {n / run['seconds']:>8,.0f} {run['peak_mb']:>12,.0f} "
              f"{run['rows']:>13,}{'' if run['finite'] else ' (NOT finite)'}")
    added = runs[args.atlas_cells]["peak_mb"] - runs[ATLAS_REFERENCE_CELLS]["peak_mb"]
    print(f"\n{args.atlas_cells:,} cells add {added:+,.0f} MB to the peak of {ATLAS_REFERENCE_CELLS:,}; target: under "
          f"{ATLAS_TARGET_MB:,} MB beyond the model and libraries -> {'met' if added < ATLAS_TARGET_MB else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=128)
    parser.add_argument("--min-genes", type=int, default=500)
    parser.add_argument("--max-genes", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=4096, help="the saved tokenizer's max_length")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with-2048", action="store_true", help="add a row at the tokenizer's default max_length")
    parser.add_argument("--with-compile", action="store_true", help="add scgene.embed(torch_compile=True) and "
                        "torch.compile(BertModel) at scale (each compiled once, in the warm-up)")
    parser.add_argument("--memory-cells", type=int, default=10_000, help="N of the memory section (N and 4N cells)")
    parser.add_argument("--memory-layers", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="v1", help="Geneformer V1 (6 layers, d=256) or V2 "
                        "(12 layers, d=512) for every row of the speed section")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the speed section; memory is CPU RSS)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="precision of every row (autocast)")
    parser.add_argument("--atlas-cells", type=int, help="run only the atlas section, on this many cells (e.g. 1000000)")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", choices=sorted(METHODS), help=argparse.SUPPRESS)  # internal: fresh process
    parser.add_argument("--memory-backed", type=Path, help=argparse.SUPPRESS)  # internal: fresh process
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers' bars for saving and loading weights
    if args.memory_of:
        print(json.dumps(memory_of_method(args.memory_of, args.workdir)))
        return
    if args.memory_backed:
        print(json.dumps(memory_of_backed(args.memory_backed, args.workdir, args.budget)))
        return
    with tempfile.TemporaryDirectory(prefix="scgene-bench-embed-") as folder:
        if args.atlas_cells:
            atlas_section(args, Path(folder))
            return
        speed_section(args, Path(folder))
        if not args.no_memory:
            memory_section(args, Path(folder))


if __name__ == "__main__":
    main()
