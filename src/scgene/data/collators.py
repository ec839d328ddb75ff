"""Data collators: pad tokenized cells into model batches, for masked-expression pretraining and for
cell classification. They read the ragged columns that `ScGeneTokenizer` / `scgene tokenize` produce."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..tokenization_scgene import ScGeneTokenizer

SEQUENCE_DTYPES = {"input_ids": torch.int64, "expression_values": torch.float32, "expression_bins": torch.int64}


def pad_features(features: list[dict], tokenizer: ScGeneTokenizer, pad_to_multiple_of: int | None = None) -> dict:
    """Pad the ragged `input_ids` / `expression_values` / `expression_bins` of `features` to the longest cell.

    Pads hold `pad_token_id`, value 0 and bin 0; `attention_mask` marks the real tokens.
    """
    lengths = np.array([len(feature["input_ids"]) for feature in features])
    width = int(lengths.max()) if len(lengths) else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {name: torch.zeros((len(features), width), dtype=dtype) for name, dtype in SEQUENCE_DTYPES.items()}
    batch["input_ids"].fill_(tokenizer.pad_token_id)
    for row, feature in enumerate(features):
        for name, dtype in SEQUENCE_DTYPES.items():
            batch[name][row, : lengths[row]] = torch.as_tensor(np.asarray(feature[name]), dtype=dtype)
    batch["attention_mask"] = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
    return batch


def cell_totals(features: list[dict]) -> np.ndarray:
    totals = np.array([float(feature.get("total_counts", np.nan)) for feature in features])
    if not (np.isfinite(totals) & (totals > 0)).all():
        raise ValueError(
            "Count-downsampled views need each cell's raw total (the `total_counts` column of `scgene tokenize` "
            "output, NaN when the input was log1p-normalised): tokenize raw counts, or set contrastive_loss_weight=0."
        )
    return totals


def cell_fingerprint(feature: dict) -> int:
    """A 64-bit hash of a tokenized cell's genes and values: with the seed and the epoch, it seeds the cell's draws."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.ascontiguousarray(feature["input_ids"], dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(feature["expression_values"], dtype=np.float32).tobytes())
    return int.from_bytes(digest.digest(), "little")


def matched_depth_rates(totals: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """Per cell, the fraction of counts that leaves it with a target depth T, drawn log-uniformly between a quarter of
    the batch's first-quartile total and that quartile (min(1, T / total)): the views of three quarters of the cells
    then have the same depth distribution, whatever their own depth, so depth cannot tell cells apart."""
    high = np.quantile(totals, 0.25)
    targets = np.exp([rng.uniform(np.log(high / 4), np.log(high)) for rng in rngs])
    return np.minimum(1.0, targets / totals)


def downsampled_cells(features: list[dict], tokenizer: ScGeneTokenizer, rngs: list[np.random.Generator],
                      min_rate: float, matched_depth: bool = False, min_panel_fraction: float | None = None) -> list[dict]:
    """Each tokenized cell as if sequenced less deeply: its counts (recovered from the log1p values and the cell's
    `total_counts`) thinned binomially at a rate drawn from U(min_rate, 1) (or `matched_depth_rates`), renormalised
    and re-binned as tokenization does; genes that lose all their counts drop out. Two such views of a cell differ in
    depth, not in identity. `rngs` holds one generator per cell.

    With `min_panel_fraction`, a view is also measured on a smaller gene panel: each gene token is kept with a
    probability drawn from U(min_panel_fraction, 1), and the cell is renormalised over the kept genes only, as a file
    that holds only those genes would be (e.g. 2,000 HVGs against a whole transcriptome)."""
    views, values_out, lengths = [], [], []
    totals = cell_totals(features)
    rates = matched_depth_rates(totals, rngs) if matched_depth else None
    for index, (feature, total, rng) in enumerate(zip(features, totals, rngs)):
        ids = np.asarray(feature["input_ids"], np.int64)
        values = np.asarray(feature["expression_values"], np.float32)
        is_gene = ids != tokenizer.cls_token_id
        counts = np.rint(np.expm1(values[is_gene].astype(np.float64)) * total / tokenizer.target_sum).astype(np.int64)
        rate = rng.uniform(min_rate, 1.0) if rates is None else rates[index]
        thinned = rng.binomial(counts, rate)
        if not thinned.any():  # a cell never loses all its genes
            thinned = counts
        rest = rng.binomial(max(int(round(total)) - int(counts.sum()), 0), rate)  # counts of genes outside the tokens
        keep = thinned > 0
        if min_panel_fraction is not None:
            panel = rng.random(len(thinned)) < rng.uniform(min_panel_fraction, 1.0)
            if (keep & panel).any():  # a view keeps at least one expressed gene
                keep &= panel
                rest = 0  # a panel file's total is the panel's own counts
        scaled = thinned[keep] * (tokenizer.target_sum / (thinned[keep].sum() + rest))
        values_out.append(np.log1p(scaled).astype(np.float32))
        lengths.append(int(keep.sum()))
        views.append((ids[~is_gene], ids[is_gene][keep]))
    bins = np.split(tokenizer.bin_rows(np.concatenate(values_out), np.asarray(lengths)), np.cumsum(lengths)[:-1])
    cells = []
    for (special, genes), values, cell_bins in zip(views, values_out, bins):
        n_special = len(special)  # the <cls> token, kept first
        cells.append({"input_ids": np.concatenate([special, genes]),
                      "expression_values": np.concatenate([np.zeros(n_special, np.float32), values]),
                      "expression_bins": np.concatenate([np.zeros(n_special, np.int64), cell_bins.astype(np.int64)])})
    return cells


class KnownRegulation:
    """Known signed regulator -> target edges (e.g. the training TFs of CollecTRI) as vocabulary id pairs, looked up
    per cell for the regulation loss (`ScGeneConfig.regulation_loss_weight`)."""

    def __init__(self, table, tokenizer: ScGeneTokenizer):
        """`table`: `source, target, weight` (decoupler's network shape; the sign of `weight` is the edge's). Genes
        outside the vocabulary, self-edges and weight-0 edges are dropped; an edge listed twice keeps its first sign."""
        lookup = tokenizer._lookup
        sources = np.array([lookup(name) if lookup(name) is not None else -1 for name in table["source"]], np.int64)
        targets = np.array([lookup(name) if lookup(name) is not None else -1 for name in table["target"]], np.int64)
        signs = np.sign(np.asarray(table["weight"], dtype=float)).astype(np.int8)
        keep = (sources >= 0) & (targets >= 0) & (sources != targets) & (signs != 0)
        if not keep.any():
            raise ValueError("No edge of the known regulation joins two vocabulary genes: name genes by symbol or "
                             "Ensembl id, with the columns source, target, weight.")
        self.vocab_size = tokenizer.vocab_size
        keys = sources[keep] * self.vocab_size + targets[keep]
        self.keys, first = np.unique(keys, return_index=True)  # sorted, for searchsorted
        self.signs = signs[keep][first]

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, G) ids -> (B, G, G) int8: [target i, regulator j] = the known edge's sign, 0 where none is known."""
        ids = input_ids.numpy().astype(np.int64)
        keys = ids[:, None, :] * self.vocab_size + ids[:, :, None]  # regulator j (columns) -> target i (rows)
        where = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        found = self.keys[where] == keys
        return torch.from_numpy(np.where(found, self.signs[where], 0).astype(np.int8))


@dataclass
class DataCollatorForMaskedExpression:
    """Masked expression modelling (BERT-style, on values and bins), optionally on two count-downsampled views.

    In each cell, `round(mlm_probability * n)` of its n gene tokens (at least one) are chosen, never pad or
    `<cls>`. Of those, `mask_replace_prob` get `mask_value` and the mask bin `n_bins`,
    `random_replace_prob` get the value and bin of a random gene token of the same cell, the rest stay.
    `labels` / `bin_labels` hold the original value / bin at chosen positions and -100 elsewhere.

    `count_views=True` (for the contrastive objective) masks a downsampled copy of each cell (`downsampled_cells`)
    and adds a second, unmasked one as `view_input_ids`, `view_expression_values`, `view_expression_bins`,
    `view_attention_mask`; the cells need the `total_counts` column that `scgene tokenize` writes. Views keep
    U(`min_count_rate`, 1) of each cell's counts, or with `matched_depth` about the same depth for every cell; with
    `min_panel_fraction`, each view also keeps a random share of the cell's genes (a smaller gene panel).

    `known_regulation` (a `KnownRegulation`) adds `known_edges`, the known edges among each cell's genes, for
    the dual-branch regulation loss.

    Every draw for a cell comes from its own generator, seeded by (`seed`, `epoch`, the cell's content): a cell is
    masked and thinned the same way whatever its batch mates, process or position in the run, so a batch split over
    processes and a run resumed from a checkpoint see the same draws as one uninterrupted process. `ScGeneTrainer`
    sets `epoch` at each epoch so that masks change between epochs. With `seed=None` the seed of each batch comes from
    torch's global generator (reproducible under `torch.manual_seed`, not across resumes).
    """

    tokenizer: ScGeneTokenizer
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    mask_value: float = -1.0
    pad_to_multiple_of: int | None = None
    count_views: bool = False
    min_count_rate: float = 0.3
    matched_depth: bool = False
    min_panel_fraction: float | None = None
    known_regulation: KnownRegulation | None = None
    seed: int | None = None
    epoch: int = 0

    def __post_init__(self):
        if not 0 < self.mlm_probability <= 1:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("mask_replace_prob + random_replace_prob must not exceed 1.")
        if not 0 < self.min_count_rate <= 1:
            raise ValueError(f"min_count_rate is the lowest fraction of counts a view keeps, in (0, 1]; got {self.min_count_rate}")
        if self.min_panel_fraction is not None and not (0 < self.min_panel_fraction <= 1 and self.count_views):
            raise ValueError("min_panel_fraction is the lowest share of genes a view keeps, in (0, 1], and needs "
                             f"count_views=True; got {self.min_panel_fraction}")

    def cell_generators(self, features: list[dict]) -> list[np.random.Generator]:
        seed = self.seed if self.seed is not None else int(torch.randint(1 << 62, (1,)))
        return [np.random.default_rng([seed, self.epoch, cell_fingerprint(feature)]) for feature in features]

    def __call__(self, features: list[dict]) -> dict:
        rngs = self.cell_generators(features)
        views = {}
        if self.count_views:  # two independent draws: the first is masked, the second is the contrastive partner
            view_options = (self.min_count_rate, self.matched_depth, self.min_panel_fraction)
            second = downsampled_cells(features, self.tokenizer, rngs, *view_options)
            views = {f"view_{name}": tensor for name, tensor in pad_features(second, self.tokenizer, self.pad_to_multiple_of).items()}
            features = downsampled_cells(features, self.tokenizer, rngs, *view_options)
        batch = pad_features(features, self.tokenizer, self.pad_to_multiple_of) | views
        ids, values, bins = batch["input_ids"], batch["expression_values"], batch["expression_bins"]
        maskable = batch["attention_mask"].bool() & (ids != self.tokenizer.cls_token_id) & (ids != self.tokenizer.pad_token_id)
        labels, bin_labels = torch.full_like(values, -100.0), torch.full_like(bins, -100)
        for row, rng in enumerate(rngs):
            positions = maskable[row].nonzero().squeeze(1).numpy()
            n_masked = min(max(round(len(positions) * self.mlm_probability), 1), len(positions))
            chosen = torch.from_numpy(rng.choice(positions, n_masked, replace=False))
            labels[row, chosen], bin_labels[row, chosen] = values[row, chosen], bins[row, chosen]
            draw = torch.from_numpy(rng.random(n_masked))
            replace = chosen[draw < self.mask_replace_prob]
            randomise = chosen[(draw >= self.mask_replace_prob) & (draw < self.mask_replace_prob + self.random_replace_prob)]
            source = torch.from_numpy(rng.choice(positions, len(randomise)))
            values[row, randomise], bins[row, randomise] = values[row, source], bins[row, source]  # reads before writes
            values[row, replace], bins[row, replace] = self.mask_value, self.tokenizer.n_bins
        batch["labels"], batch["bin_labels"] = labels, bin_labels
        if self.known_regulation is not None:
            batch["known_edges"] = self.known_regulation.labels(ids)
        return batch


@dataclass
class DataCollatorForCellClassification:
    """Padding plus `labels (B,) int64` from the `label_column` of each feature."""

    tokenizer: ScGeneTokenizer
    label_column: str = "labels"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        missing = [i for i, feature in enumerate(features) if feature.get(self.label_column) is None]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(features)} cells have no {self.label_column!r} label (columns: "
                f"{sorted(features[missing[0]])}); set label_column= to the obs column exported with the cells."
            )
        batch = pad_features(features, self.tokenizer, self.pad_to_multiple_of)
        batch["labels"] = torch.tensor([int(f[self.label_column]) for f in features], dtype=torch.int64)
        return batch
