"""Tiny ScGene configurations and random inputs shared by the model tests."""

import itertools

import torch

from scgene import ScGeneConfig, ScGeneForMaskedExpression

VOCAB_SIZE = 40
N_BINS = 6
DESIGN_COMBINATIONS = list(
    itertools.product(("standard", "dual_branch"), ("mha", "mla"), ("linear", "binned"))
)


def tiny_config(**overrides) -> ScGeneConfig:
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        kv_lora_rank=16,
        n_bins=N_BINS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    settings.update(overrides)
    return ScGeneConfig(**settings)


def random_cells(batch_size: int, num_genes: int, seed: int = 0, add_cls: bool = True, shared_panel: bool = False):
    """A batch of cells: distinct gene ids per cell (or one shared panel), log1p-like values and their bins."""
    generator = torch.Generator().manual_seed(seed)
    genes = torch.stack(
        [torch.randperm(VOCAB_SIZE - 3, generator=generator)[:num_genes] + 3 for _ in range(batch_size)]
    )
    if shared_panel:
        genes = genes[:1].expand(batch_size, -1).clone()
    values = torch.rand(batch_size, num_genes, generator=generator) * 3
    values[torch.rand(batch_size, num_genes, generator=generator) < 0.3] = 0.0
    bins = torch.bucketize(values, torch.linspace(0, 3, N_BINS)[1:-1], right=True) + (values > 0).long()
    bins = bins.clamp(max=N_BINS - 1)
    if add_cls:
        genes = torch.cat([torch.ones(batch_size, 1, dtype=torch.long), genes], dim=1)
        values = torch.cat([torch.zeros(batch_size, 1), values], dim=1)
        bins = torch.cat([torch.zeros(batch_size, 1, dtype=torch.long), bins], dim=1)
    return {
        "input_ids": genes,
        "expression_values": values,
        "expression_bins": bins,
        "attention_mask": torch.ones_like(genes),
    }


def with_prior(model, seed: int = 0):
    """Give a model a random non-zero prior (special-token rows zero), as build-prior would."""
    generator = torch.Generator().manual_seed(seed)
    prior = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=generator)
    prior[:3] = 0.0
    model.set_gene_prior(prior)
    return model


def tiny_pretrained(vocab_size: int, model_class=ScGeneForMaskedExpression, seed: int = 0, **overrides):
    """A tiny model on a real vocabulary (d = 32, 2 layers, 4 heads, mean pooling, `overrides` on top) with a random
    prior (scale 0.5, special-token rows zero), in eval mode: what the inference, perturbation and regulation tests
    save as a checkpoint."""
    settings = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, pooling="mean")
    torch.manual_seed(seed)
    model = model_class(ScGeneConfig(**(settings | overrides)))
    prior = torch.randn(vocab_size, 32) * 0.5
    prior[:3] = 0
    model.set_gene_prior(prior)
    return model.eval()
