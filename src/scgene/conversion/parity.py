"""Parity between a converted checkpoint and the reference original: fixed inputs shaped like the original's `x`,
every layer's output of both models, and the report printed by `scgene convert` and written into the model card."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from scgene.conversion.original import (
    ConversionError,
    ScBaseModel,
    ScBaseModelClassification,
)

PARITY_TOLERANCE = 1e-5
# Parity runs on PARITY_CELLS fixed cells over the whole panel, PARITY_CHUNK_CELLS at a time: memory per cell grows
# linearly with the panel (see `memory_efficient_reference`), time quadratically; `--parity-cells` sets the number.
PARITY_CELLS = 8
PARITY_CHUNK_CELLS = 2


def parity_inputs(num_genes: int, num_cells: int = PARITY_CELLS, seed: int = 0) -> torch.Tensor:
    """Fixed inputs shaped like the original's `x` `(num_cells, num_genes)`: log1p of counts normalised to 1e4.

    Counts are Poisson with gene means spread over two orders of magnitude and cell depths from 0.05 to 3 counts
    per gene; with at least 4 cells, the last two are the extremes: an empty cell (`x = 0`) and a cell with a
    single counted gene (`x = log1p(1e4)`, the largest value the original sees).
    """
    generator = torch.Generator().manual_seed(seed)
    gene_means = torch.exp(torch.randn(num_genes, generator=generator))
    gene_means = gene_means / gene_means.mean()
    depths = torch.logspace(math.log10(0.05), math.log10(3.0), num_cells)
    counts = torch.poisson(depths[:, None] * gene_means[None, :], generator=generator)
    if num_cells >= 4:
        counts[-2] = 0.0
        counts[-1] = 0.0
        counts[-1, int(torch.randint(num_genes, (1,), generator=generator))] = 1.0
    totals = counts.sum(dim=1, keepdim=True)
    return torch.log1p(torch.where(totals > 0, counts / totals.clamp(min=1.0) * 1e4, counts))


@contextmanager
def memory_efficient_reference():
    """Run `nn.TransformerEncoderLayer` on its standard path rather than the inference fast path.

    In eval mode without grad, PyTorch's fast path (`torch._transformer_encoder_layer_fwd`) materialises the
    attention weights, `heads x genes x genes` floats per cell (12.8 GB for 8 heads over 20,000 genes); the
    standard path computes the same layer through `scaled_dot_product_attention`, whose CPU kernel does not.
    `test_reference_fast_path_gives_the_same_numbers` checks that both paths agree.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.no_grad()
def reference_outputs(original: torch.nn.Module, x: torch.Tensor, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """One call of the original's own `forward`; hooks record the encoder's input, each layer's output and the
    `transformer_encoder` output on the way."""
    layers = original.transformer_encoder.layers
    captured: list[torch.Tensor] = []
    encoded: list[torch.Tensor] = []
    handles = [layers[0].register_forward_pre_hook(lambda module, args: captured.append(args[0]))]
    handles += [layer.register_forward_hook(lambda module, args, out: captured.append(out)) for layer in layers]
    handles.append(original.transformer_encoder.register_forward_hook(lambda module, args, out: encoded.append(out)))
    try:
        final = original(x, embedding)
    finally:
        for handle in handles:
            handle.remove()
    outputs = {"embeddings" if index == 0 else f"layer {index}": value for index, value in enumerate(captured)}
    outputs["hidden states"] = encoded[0]
    if isinstance(original, ScBaseModelClassification):
        outputs["logits"] = final
    elif isinstance(original, ScBaseModel):
        outputs["predictions"] = final
    return outputs


@torch.no_grad()
def converted_outputs(converted: torch.nn.Module, x: torch.Tensor, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """The converted model fed the panel ids (no `<cls>`) and the original's `x` as `expression_values`."""
    ids = torch.tensor(input_ids).expand(x.shape[0], -1)
    out = converted(input_ids=ids, expression_values=x, output_hidden_states=True)
    outputs = {"embeddings" if index == 0 else f"layer {index}": value for index, value in enumerate(out.hidden_states)}
    outputs["hidden states"] = out.last_hidden_state if "last_hidden_state" in out else out.hidden_states[-1]
    if "logits" in out:
        outputs["logits"] = out.logits
    elif "predicted_values" in out:
        outputs["predictions"] = out.predicted_values
    return outputs


def measure_parity(
    original: torch.nn.Module,
    converted: torch.nn.Module,
    embedding: torch.Tensor,
    input_ids: list[int],
    num_cells: int = PARITY_CELLS,
    chunk_cells: int = PARITY_CHUNK_CELLS,
) -> dict[str, float]:
    """Max abs difference per output over `parity_inputs(len(input_ids), num_cells)`, `chunk_cells` cells at a time:
    the embeddings (encoder input), each layer, the encoder output, then predictions or logits."""
    x = parity_inputs(len(input_ids), num_cells)
    report: dict[str, float] = {}
    with memory_efficient_reference():
        for chunk in x.split(chunk_cells):
            expected = reference_outputs(original, chunk, embedding)
            got = converted_outputs(converted, chunk, input_ids)
            if list(expected) != list(got):
                raise ConversionError(
                    f"The converted model returns {sorted(got)}, the original {sorted(expected)} "
                    "(embeddings + one hidden state per layer, then the head)."
                )
            for name in expected:
                report[name] = max(report.get(name, 0.0), _max_abs_diff(expected[name], got[name]))
    return report


def _max_abs_diff(expected: torch.Tensor, got: torch.Tensor) -> float:
    if expected.shape != got.shape:
        raise ConversionError(f"Output shapes differ: original {tuple(expected.shape)}, converted {tuple(got.shape)}.")
    return (expected - got).abs().max().item()


def format_parity_report(
    report: dict[str, float],
    tolerance: float = PARITY_TOLERANCE,
    num_cells: int | None = None,
    num_genes: int | None = None,
) -> str:
    """A small table: output, max abs diff, ok; headed by what it was measured on when given."""
    lines = []
    if num_cells is not None and num_genes is not None:
        lines.append(
            f"Parity: reloaded converted model vs reference original, {num_cells} fixed cells x all {num_genes} "
            "panel genes (log1p of Poisson counts normalised to 1e4), eval mode"
        )
    lines.append(f"{'output':<16} {'max abs diff':>12}  (tolerance {tolerance:g}, fp32)")
    for name, diff in report.items():
        lines.append(f"{name:<16} {diff:>12.3e}  {'ok' if diff <= tolerance else 'FAIL'}")
    return "\n".join(lines)
