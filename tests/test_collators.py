"""Collators: padding, masked-expression masking (never pad/cls, requested fraction, 80/10/10), labels."""

import numpy as np
import pytest
import torch

from scgene.data import DataCollatorForCellClassification, DataCollatorForMaskedExpression
from scgene.tokenization_scgene import ScGeneTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return ScGeneTokenizer.from_gene_list([f"G{i}" for i in range(300)])


def features(n_cells=64, seed=0):
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(20, 200))
        ids = np.concatenate([[1], rng.choice(np.arange(3, 303), n, replace=False)])
        values = np.concatenate([[0.0], rng.uniform(0.5, 5, n)]).astype(np.float32)
        bins = np.concatenate([[0], rng.integers(1, 51, n)])
        cells.append({"input_ids": ids.tolist(), "expression_values": values.tolist(), "expression_bins": bins.tolist(), "cell_type": int(rng.integers(0, 4))})
    return cells


def test_masking_never_touches_pad_or_cls_and_masks_the_fraction(tokenizer):
    cells = features()
    batch = DataCollatorForMaskedExpression(tokenizer, mlm_probability=0.25, seed=0)(cells)
    masked = batch["labels"] != -100
    ids = batch["input_ids"]
    assert not masked[ids == tokenizer.pad_token_id].any() and not masked[ids == tokenizer.cls_token_id].any()
    assert not masked[batch["attention_mask"] == 0].any()
    n_genes = torch.tensor([len(c["input_ids"]) - 1 for c in cells])
    assert torch.equal(masked.sum(1), torch.round(n_genes * 0.25).long())
    assert ((batch["bin_labels"] != -100) == masked).all()


def test_replacement_split_and_labels(tokenizer):
    cells = features(256)
    collator = DataCollatorForMaskedExpression(tokenizer, mlm_probability=0.3, seed=1)
    batch = collator(cells)
    masked = batch["labels"] != -100
    mask_bin = batch["expression_bins"] == tokenizer.n_bins
    assert torch.equal(mask_bin & masked, mask_bin)  # the mask bin only where masked
    assert (batch["expression_values"][mask_bin] == -1.0).all()
    share_masked = mask_bin.sum().item() / masked.sum().item()
    assert 0.76 < share_masked < 0.84
    # labels are the original values and bins
    for row, cell in enumerate(cells[:20]):
        n = len(cell["input_ids"])
        rows_mask = masked[row, :n]
        np.testing.assert_allclose(batch["labels"][row, :n][rows_mask].numpy(), np.asarray(cell["expression_values"], np.float32)[rows_mask.numpy()])
        np.testing.assert_array_equal(batch["bin_labels"][row, :n][rows_mask].numpy(), np.asarray(cell["expression_bins"])[rows_mask.numpy()])
    unchanged_or_random = masked & ~mask_bin
    assert 0.15 < unchanged_or_random.sum().item() / masked.sum().item() < 0.25


def test_masking_is_seeded(tokenizer):
    cells = features(16)
    first = DataCollatorForMaskedExpression(tokenizer, seed=7)(cells)
    second = DataCollatorForMaskedExpression(tokenizer, seed=7)(cells)
    other = DataCollatorForMaskedExpression(tokenizer, seed=8)(cells)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["labels"], other["labels"])


def test_a_cells_draws_do_not_depend_on_its_batch_mates_but_on_the_epoch(tokenizer):
    """What makes DDP and resumed runs match one uninterrupted process: a cell gets the same masks and views in a
    batch of 24 and in any half of it, in any order; another epoch draws again."""
    cells, _ = count_cells(tokenizer)
    collator = DataCollatorForMaskedExpression(tokenizer, count_views=True, seed=3)
    whole = collator(cells)
    halves = [collator(cells[12:][::-1]), collator(cells[:12])]
    for name in ("labels", "expression_values", "expression_bins", "view_input_ids", "view_expression_values"):
        for row in range(24):
            half, half_row = (halves[1], row) if row < 12 else (halves[0], 23 - row)
            n = int(half["attention_mask" if not name.startswith("view_") else "view_attention_mask"][half_row].sum())
            assert torch.equal(whole[name][row, :n], half[name][half_row, :n]), (name, row)
    collator.epoch = 1
    assert not torch.equal(collator(cells)["labels"], whole["labels"])


def test_padding_dtypes_and_multiple(tokenizer):
    cells = features(5)
    batch = DataCollatorForMaskedExpression(tokenizer, pad_to_multiple_of=64, seed=0)(cells)
    longest = max(len(c["input_ids"]) for c in cells)
    assert batch["input_ids"].shape[1] == -(-longest // 64) * 64
    assert batch["input_ids"].dtype == batch["expression_bins"].dtype == batch["bin_labels"].dtype == torch.int64
    assert batch["expression_values"].dtype == batch["labels"].dtype == torch.float32
    assert batch["attention_mask"].sum(1).tolist() == [len(c["input_ids"]) for c in cells]


def test_classification_collator(tokenizer):
    cells = features(6)
    batch = DataCollatorForCellClassification(tokenizer, label_column="cell_type")(cells)
    assert batch["labels"].tolist() == [c["cell_type"] for c in cells] and batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == (6, max(len(c["input_ids"]) for c in cells))
    first = cells[0]
    assert batch["input_ids"][0, : len(first["input_ids"])].tolist() == first["input_ids"]
    assert (batch["input_ids"][0, len(first["input_ids"]) :] == tokenizer.pad_token_id).all()


def test_classification_collator_names_a_missing_label_column(tokenizer):
    cells = features(3)
    with pytest.raises(KeyError, match=r"3 of 3 cells have no 'labels' label.*cell_type.*label_column="):
        DataCollatorForCellClassification(tokenizer)(cells)


def count_cells(tokenizer, n_cells=24, seed=0, max_length=None, deep_scale=1):
    """Tokenized real-looking cells from integer counts (with `total_counts`), as `scgene tokenize` writes them; the
    second half of the cells has `deep_scale` times the counts."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    counts = sp.random(n_cells, 300, density=0.3, random_state=seed, data_rvs=lambda n: rng.negative_binomial(2, 0.3, n) + 1)
    counts = sp.diags(np.where(np.arange(n_cells) < n_cells // 2, 1, deep_scale)) @ counts
    adata = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    adata.var_names = [f"G{i}" for i in range(300)]
    chunk = next(tokenizer.iter_encoded(adata, max_length=max_length, truncation=max_length is not None))
    bounds = np.concatenate([[0], np.cumsum(chunk.lengths)])
    cells = [{"input_ids": chunk.input_ids[a:b], "expression_values": chunk.expression_values[a:b],
              "expression_bins": chunk.expression_bins[a:b], "total_counts": chunk.total_counts[i]}
             for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return cells, adata


def test_full_rate_count_view_is_the_tokenized_cell(tokenizer):
    from scgene.data.collators import downsampled_cells

    cells, adata = count_cells(tokenizer)
    np.testing.assert_allclose([c["total_counts"] for c in cells], np.asarray(adata.X.sum(axis=1)).ravel())
    for cell, view in zip(cells, downsampled_cells(cells, tokenizer, [np.random.default_rng(0)] * len(cells), min_rate=1.0)):
        np.testing.assert_array_equal(view["input_ids"], cell["input_ids"])
        np.testing.assert_array_equal(view["expression_bins"], cell["expression_bins"])
        np.testing.assert_allclose(view["expression_values"], cell["expression_values"], atol=1e-5)


def test_count_views_are_shallower_copies_of_the_same_cells(tokenizer):
    cells, _ = count_cells(tokenizer)
    batch = DataCollatorForMaskedExpression(tokenizer, count_views=True, min_count_rate=0.2, seed=0)(cells)
    for prefix in ("", "view_"):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"].bool()
        kept = mask.sum(1) - 1  # genes, <cls> excluded
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
        assert (kept <= torch.tensor([len(c["input_ids"]) - 1 for c in cells])).all() and (kept >= 1).all()
        assert kept.float().mean() < np.mean([len(c["input_ids"]) - 1 for c in cells])  # counts were thinned away
        for row, cell in enumerate(cells):  # a view keeps a subset of the cell's own genes
            assert set(ids[row][mask[row]].tolist()) <= set(np.asarray(cell["input_ids"]).tolist())
        bins = batch[f"{prefix}expression_bins"][mask & (ids != tokenizer.cls_token_id)]
        assert bins.min() >= 1 and bins.max() <= tokenizer.n_bins  # mask bin only in the masked view
    assert not torch.equal(batch["view_attention_mask"].sum(1), batch["attention_mask"].sum(1))  # two different draws
    assert (batch["labels"] != -100).any() and "view_labels" not in batch


def test_matched_depth_views_give_deep_and_shallow_cells_the_same_depth(tokenizer):
    """Cells 12..23 carry 20x the counts of cells 0..11. Views that keep a fraction of each cell's own counts keep
    that gap (depth separates the cells); matched-depth views thin the deep cells to the shallow cells' depths."""
    from scgene.data.collators import downsampled_cells, matched_depth_rates

    cells, adata = count_cells(tokenizer, deep_scale=20)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    assert totals[12:].mean() > 15 * totals[:12].mean()
    rng = np.random.default_rng(0)
    matched = np.stack([matched_depth_rates(totals, [rng] * 24) * totals for _ in range(200)])  # (draws, cells) view depths
    assert 0.7 < matched[:, 12:].mean() / matched[:, :12].mean() < 1.3
    assert (matched <= totals + 1e-9).all()  # a view never has more counts than its cell
    own_fraction = np.stack([rng.uniform(0.3, 1.0, size=24) * totals for _ in range(200)])
    assert own_fraction[:, 12:].mean() / own_fraction[:, :12].mean() > 15
    views = downsampled_cells(cells, tokenizer, [rng] * 24, min_rate=0.3, matched_depth=True)
    assert np.mean([len(v["input_ids"]) for v in views[12:]]) < np.mean([len(c["input_ids"]) for c in cells[12:]])


def test_count_views_need_raw_totals(tokenizer):
    cells, _ = count_cells(tokenizer, n_cells=4)
    cells[1]["total_counts"] = float("nan")  # tokenized from log1p input
    with pytest.raises(ValueError, match="total_counts"):
        DataCollatorForMaskedExpression(tokenizer, count_views=True)(cells)


def test_panel_views_are_the_cell_as_a_smaller_gene_panel_would_measure_it(tokenizer):
    """Unthinned (rate 1) panel views keep a subset of each cell's genes, renormalised over that subset: the same
    values the tokenizer gives for a file that holds only those genes."""
    from scgene.data.collators import downsampled_cells

    cells, adata = count_cells(tokenizer)
    rngs = [np.random.default_rng(index) for index in range(len(cells))]
    views = downsampled_cells(cells, tokenizer, rngs, min_rate=1.0, min_panel_fraction=0.3)
    assert np.mean([len(v["input_ids"]) / len(c["input_ids"]) for v, c in zip(views, cells)]) < 0.85
    for row in (0, 5, 17):
        genes = tokenizer.convert_ids_to_genes(views[row]["input_ids"][1:])
        panel = adata[row : row + 1, genes].copy()  # a file of only these genes
        expected = next(tokenizer.iter_encoded(panel, truncation=False))
        order = np.argsort(expected.input_ids[1:])
        np.testing.assert_allclose(np.sort(views[row]["expression_values"][1:]),
                                   np.sort(expected.expression_values[1:][order]), rtol=1e-5)
    with pytest.raises(ValueError, match="min_panel_fraction"):
        DataCollatorForMaskedExpression(tokenizer, min_panel_fraction=0.5)  # needs count views
