"""The model card draft written next to a converted checkpoint: what it was converted from, and the measured parity."""

from __future__ import annotations

from pathlib import Path

from ..fileio import sha256_file


def model_card(
    original_name: str,
    class_name: str,
    sizes,
    num_heads: int,
    num_genes: int,
    sources: dict[str, Path],
    parity: dict[str, float],
    tolerance: float,
    has_tokenizer: bool,
    parity_cells: int,
    target_sum: float = 1e4,
) -> str:
    """A model card draft; `sizes` is the `OriginalSizes` read from the checkpoint."""
    shape = (
        f"{sizes.num_hidden_layers} layers, feature_dim {sizes.hidden_size}, {num_heads} heads, "
        f"FFN {sizes.intermediate_size}, panel of {num_genes} genes"
    )
    if sizes.kind == "classifier":
        shape += f", cls_decoder {num_genes} -> {sizes.classifier_hidden_size} -> {sizes.num_labels} classes"
    source_lines = "\n".join(f"- {name}: `{path.name}` (sha256 `{sha256_file(path)}`)" for name, path in sources.items())
    edge_cells = ", the last two an empty cell and a cell with a single counted gene" if parity_cells >= 4 else ""
    parity_rows = "\n".join(f"| {name} | {diff:.3e} |" for name, diff in parity.items())
    from_tokenizer = (
        "tokenizer = ScGeneTokenizer.from_pretrained(path)  # every panel gene, in panel order, no <cls> token\n"
        "batch = tokenizer(adata, return_tensors=\"pt\")  # raw counts; adata must hold every panel gene\n"
        "outputs = model(**batch)\n\n"
        if has_tokenizer
        else ""
    )
    target_note = (
        f"\nThe saved tokenizer normalises each cell to {target_sum:g} counts (`scgene convert --target-sum`). Seed "
        "000 does not name the original's target, and `sc.pp.normalize_total` without one uses the dataset's "
        "median count: check that the tokenizer's target is the one the original was trained with."
        if has_tokenizer
        else ""
    )
    return f"""---
library_name: transformers
tags:
- scgene
- single-cell
- transcriptomics
- converted
---

# {class_name} converted from the original `{original_name}` (draft)

This checkpoint was converted with `scgene convert` from an original ScGene (seed 000) checkpoint.
Draft: add the license, training data, intended use and evaluation of the original release before publishing.

## Converted from

- original model: `{original_name}` ({shape})
{source_lines}

The original gene embedding (its forward input `gene_embedding`) is stored as the frozen buffer
`embeddings.gene_prior.weight`; rows 0-2 (`<pad>`, `<cls>`, `<mask>`) are zero, panel gene `i` is row `3 + i`.
The special-token embeddings are zero: the original has no special tokens.

## Parity

The converted model, reloaded from disk and fed the panel ids (no `<cls>`) with the original's `x` as
`expression_values`, against a reference implementation of the original (PyTorch's `nn.TransformerEncoder` with
the checkpoint's weights, on its standard path rather than the inference fast path, which would hold every
genes x genes attention matrix in memory) on fixed inputs: {parity_cells} cells x all {num_genes} panel genes, log1p of
Poisson counts normalised to 1e4 per cell{edge_cells}; fp32, eval mode. Tolerance: {tolerance:g}.

| output | max abs diff |
|---|---|
{parity_rows}

## Usage

The original's input `x` is log1p of `sc.pp.normalize_total` counts, one column per panel gene in panel order;
panel gene `i` has id `3 + i`, and there is no `<cls>` token.{target_note}

```python
import torch
from scgene import {"ScGeneTokenizer, " if has_tokenizer else ""}{class_name}

model = {class_name}.from_pretrained(path)
{from_tokenizer}# or from the original's x, (cells, {num_genes}) float32:
ids = torch.arange(3, {3 + num_genes}).expand(len(x), -1)
outputs = model(input_ids=ids, expression_values=x)
```
"""
