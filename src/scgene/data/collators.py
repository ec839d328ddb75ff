"""Data collators: pad tokenized cells into model batches, for masked-expression pretraining and for
cell classification. They read the ragged columns that `ScGeneTokenizer` / `scgene tokenize` produce."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def matched_depth_rates(totals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per cell, the fraction of counts that leaves it with a target depth T, drawn log-uniformly between a quarter of
    the batch's first-quartile total and that quartile (min(1, T / total)): the views of three quarters of the cells
    then have the same depth distribution, whatever their own depth, so depth cannot tell cells apart."""
    high = np.quantile(totals, 0.25)
    return np.minimum(1.0, np.exp(rng.uniform(np.log(high / 4), np.log(high), size=len(totals))) / totals)


def downsampled_cells(features: list[dict], tokenizer: ScGeneTokenizer, rng: np.random.Generator, min_rate: float,
                      matched_depth: bool = False) -> list[dict]:
    """Each tokenized cell as if sequenced less deeply: its counts (recovered from the log1p values and the cell's
    `total_counts`) thinned binomially at a rate drawn from U(min_rate, 1) (or `matched_depth_rates`), renormalised
    and re-binned as tokenization does; genes that lose all their counts drop out. Two such views of a cell differ in
    depth, not in identity."""
    views, values_out, lengths = [], [], []
    totals = cell_totals(features)
    rates = matched_depth_rates(totals, rng) if matched_depth else None
    for index, (feature, total) in enumerate(zip(features, totals)):
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
        scaled = thinned[keep] * (tokenizer.target_sum / (thinned.sum() + rest))
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


@dataclass
class DataCollatorForMaskedExpression:
    """Masked expression modelling (BERT-style, on values and bins), optionally on two count-downsampled views.

    In each cell, `round(mlm_probability * n)` of its n gene tokens (at least one) are chosen, never pad or
    `<cls>`. Of those, `mask_replace_prob` get `mask_value` and the mask bin `n_bins`,
    `random_replace_prob` get the value and bin of a random gene token of the batch, the rest stay.
    `labels` / `bin_labels` hold the original value / bin at chosen positions and -100 elsewhere.

    `count_views=True` (for the contrastive objective) masks a downsampled copy of each cell (`downsampled_cells`)
    and adds a second, unmasked one as `view_input_ids`, `view_expression_values`, `view_expression_bins`,
    `view_attention_mask`; the cells need the `total_counts` column that `scgene tokenize` writes. Views keep
    U(`min_count_rate`, 1) of each cell's counts, or with `matched_depth` about the same depth for every cell.
    `seed` makes masking and views reproducible (private generators); None draws from torch's global generator.
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
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not 0 < self.mlm_probability <= 1:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError("mask_replace_prob + random_replace_prob must not exceed 1.")
        if not 0 < self.min_count_rate <= 1:
            raise ValueError(f"min_count_rate is the lowest fraction of counts a view keeps, in (0, 1]; got {self.min_count_rate}")
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, features: list[dict]) -> dict:
        views = {}
        if self.count_views:  # two independent draws: the first is masked, the second is the contrastive partner
            rng = np.random.default_rng(int(torch.randint(1 << 62, (1,), generator=self.generator)))
            second = downsampled_cells(features, self.tokenizer, rng, self.min_count_rate, self.matched_depth)
            views = {f"view_{name}": tensor for name, tensor in pad_features(second, self.tokenizer, self.pad_to_multiple_of).items()}
            features = downsampled_cells(features, self.tokenizer, rng, self.min_count_rate, self.matched_depth)
        batch = pad_features(features, self.tokenizer, self.pad_to_multiple_of) | views
        ids, values, bins = batch["input_ids"], batch["expression_values"], batch["expression_bins"]
        maskable = batch["attention_mask"].bool() & (ids != self.tokenizer.cls_token_id) & (ids != self.tokenizer.pad_token_id)
        n_maskable = maskable.sum(dim=1)
        n_masked = torch.clamp(torch.round(n_maskable * self.mlm_probability), min=1).minimum(n_maskable).long()
        # the n_masked lowest random scores among the maskable tokens of each row
        scores = torch.rand(ids.shape, generator=self.generator).masked_fill(~maskable, 2.0)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        masked = maskable & (ranks < n_masked[:, None])

        batch["labels"] = torch.where(masked, values, torch.full_like(values, -100.0))
        batch["bin_labels"] = torch.where(masked, bins, torch.full_like(bins, -100))
        draw = torch.rand(ids.shape, generator=self.generator)
        replace = masked & (draw < self.mask_replace_prob)
        randomise = masked & ~replace & (draw < self.mask_replace_prob + self.random_replace_prob)
        if randomise.any():
            pool = maskable.nonzero(as_tuple=True)
            source = torch.randint(len(pool[0]), (int(randomise.sum()),), generator=self.generator)
            values[randomise] = values[pool][source]
            bins[randomise] = bins[pool][source]
        values[replace] = self.mask_value
        bins[replace] = self.tokenizer.n_bins
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
