"""ScGeneTokenizer: vocabulary, gene matching, normalisation, binning, selection, serialisation."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from transformers.dynamic_module_utils import get_imports

from scgene.tokenization_scgene import ScGeneTokenizer

DATA = Path(__file__).parent / "data"
PBMC = DATA / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
CELLBENCH = DATA / "cellbench_120cells_ensembl_subset.h5ad"
INPUT_NAMES = ("input_ids", "expression_values", "expression_bins", "attention_mask")



@pytest.fixture(scope="module")
def cellbench():
    return ad.read_h5ad(CELLBENCH)


def small_adata(counts, genes):
    return ad.AnnData(sp.csr_matrix(np.asarray(counts, dtype=np.float32)), var=pd.DataFrame(index=genes))


def assert_same_batch(a, b):
    assert set(a.keys()) == set(b.keys())
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


# ---------------------------------------------------------------- vocabulary
def test_default_vocabulary(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert tokenizer.vocab_size == len(tokenizer.ensembl_ids) == len(tokenizer.symbols) > 25000
    assert tokenizer.symbols[:3] == tokenizer.ensembl_ids[:3] == ["<pad>", "<cls>", "<mask>"]
    ids = tokenizer.convert_genes_to_ids(["MALAT1", "NEAT1", "XIST", "MT-CO1", "MT-RNR2", "GAPDH"])
    assert min(ids) >= 3 and len(set(ids)) == 6
    assert tokenizer.convert_ids_to_genes(ids) == ["MALAT1", "NEAT1", "XIST", "MT-CO1", "MT-RNR2", "GAPDH"]
    assert tokenizer.n_bins == 51


def test_convert_genes_by_ensembl_version_symbol_and_alias(tokenizer):
    (tp53,) = tokenizer.convert_genes_to_ids(["TP53"])
    assert tokenizer.convert_genes_to_ids(["ENSG00000141510", "ENSG00000141510.17", "P53", "LFS1"]) == [tp53] * 4
    assert tokenizer.ensembl_ids[tp53] == "ENSG00000141510" and tokenizer.symbols[tp53] == "TP53"
    assert tokenizer.convert_ids_to_genes([tp53], id_type="ensembl") == ["ENSG00000141510"]
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        tokenizer.convert_genes_to_ids(["TP53", "NOT_A_GENE"])


def test_from_gene_list_keeps_order_and_fills_the_other_id():
    tokenizer = ScGeneTokenizer.from_gene_list(["CD3E", "ENSG00000141510.3", "MY_GENE"])
    assert tokenizer.vocab_size == 6
    assert tokenizer.convert_genes_to_ids(["CD3E", "TP53", "MY_GENE"]) == [3, 4, 5]
    assert tokenizer.symbols[3:] == ["CD3E", "TP53", "MY_GENE"]
    assert tokenizer.ensembl_ids[4] == "ENSG00000141510" and tokenizer.ensembl_ids[5] == ""
    with pytest.raises(ValueError, match="twice"):
        ScGeneTokenizer.from_gene_list(["ENSG00000141510", "ENSG00000141510.2"])


def test_from_gene_table_with_aliases(caplog):
    table = pd.DataFrame({
        "gene_id": ["ENSG00000141510.17", "ENSG00000133703", None, "ENSG00000010610"],
        "name": ["TP53", "KRAS", "MYGENE", np.nan],
        "synonyms": ["P53|LFS1|SHARED", ["K-RAS2A", "SHARED"], "MYG1|KRAS", np.nan],
    })
    with caplog.at_level(logging.WARNING):
        tokenizer = ScGeneTokenizer.from_gene_table(table, "gene_id", "name", alias_column="synonyms", species="homo_sapiens")
    assert "SHARED" in caplog.text  # names two genes: dropped
    assert tokenizer.ensembl_ids[3:] == ["ENSG00000141510", "ENSG00000133703", "", "ENSG00000010610"]
    assert tokenizer.symbols[3:] == ["TP53", "KRAS", "MYGENE", ""]
    # aliases to Ensembl ids and, for a gene without one, to its symbol; an alias never shadows a symbol
    assert tokenizer.convert_genes_to_ids(["P53", "LFS1", "K-RAS2A", "MYG1", "KRAS", "ENSG00000010610.2"]) == [3, 3, 4, 5, 4, 6]
    with pytest.raises(KeyError, match="SHARED"):
        tokenizer.convert_genes_to_ids(["SHARED"])
    with pytest.raises(KeyError, match=r"not found.*ensembl_column="):
        ScGeneTokenizer.from_gene_table(table, "ensembl", "name")
    # a symbol-only table, as a dict of lists
    symbols_only = ScGeneTokenizer.from_gene_table({"symbol": ["A1", "B2"], "alias": ["A-ONE", ""]}, None, alias_column="alias")
    assert symbols_only.convert_genes_to_ids(["A-ONE", "B2"]) == [3, 4]


def test_vocabulary_rejects_unusable_genes():
    with pytest.raises(ValueError, match="neither an Ensembl id nor a symbol"):
        ScGeneTokenizer.from_gene_list(["CD3E", ""])
    with pytest.raises(ValueError, match="Symbol MY_GENE appears twice"):
        ScGeneTokenizer.from_gene_list(["MY_GENE", "MY_GENE"])
    with pytest.raises(ValueError, match="special token"):
        ScGeneTokenizer.from_gene_list(["CD3E", "<mask>"])


def test_from_anndata_takes_symbols_from_a_var_column(tokenizer, cellbench):
    default = tokenizer
    tokenizer = ScGeneTokenizer.from_anndata(cellbench)
    is_ensembl = cellbench.var_names.str.startswith("ENSG")
    assert 0 < (~is_ensembl).sum() < 50  # ERCC spike-ins: kept by name
    assert tokenizer.ensembl_ids[3:] == [name if e else "" for name, e in zip(cellbench.var_names, is_ensembl)]
    for name, symbol, found in zip(cellbench.var_names, cellbench.var["gene_symbol"].astype(str), tokenizer.symbols[3:]):
        if not name.startswith("ENSG"):
            assert found == name
        elif not symbol.startswith("ENSG"):
            assert found == symbol  # the adata's own symbol, not the default vocabulary's
        else:  # no symbol in the adata: the default vocabulary's, if it has one
            assert found == (default.symbols[default._lookup(name)] if default._lookup(name) else "")
    assert tokenizer.species == "homo_sapiens"
    # genes the default vocabulary does not know (mouse) keep the adata's own symbols, and no species
    mouse = small_adata(np.ones((2, 2)), ["ENSMUSG00000029580", "ENSMUSG00000057666"])
    mouse.var["feature_name"] = ["Actb", "Gapdh"]
    tokenizer = ScGeneTokenizer.from_anndata(mouse, min_coverage=0.9)
    assert tokenizer.symbols[3:] == ["Actb", "Gapdh"] and tokenizer.species == ""
    assert tokenizer.convert_genes_to_ids(["Gapdh", "ENSMUSG00000029580.4"]) == [4, 3]
    batch = tokenizer(mouse, return_tensors="np")
    assert batch["input_ids"][0].tolist() == [1, 3, 4]


def test_hub_files_import_only_allowed_modules():
    from transformers.dynamic_module_utils import get_relative_import_files

    import scgene.tokenization_scgene as module

    # the tokenizer and every file it imports relatively (copied with it by save_pretrained)
    files = [module.__file__, *get_relative_import_files(module.__file__)]
    assert {Path(f).name for f in files} == {"tokenization_scgene.py", "encoding_scgene.py", "vocabulary_scgene.py"}
    for file in files:
        # transformers' check_imports skips imports inside try/except, so scipy/anndata stay optional
        third_party = set(get_imports(file)) - set(sys.stdlib_module_names)
        assert third_party <= {"numpy", "torch", "transformers"}, (file, third_party)


# ---------------------------------------------------------------- serialisation
def test_save_load_round_trip_json_only(tmp_path, tokenizer, pbmc):
    custom = ScGeneTokenizer(n_bins=21, gene_selection="top_k", top_k=50, add_cls_token=False, max_length=64)
    custom.save_pretrained(tmp_path)
    assert "preprocessor_config.json" in {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["vocab"]["symbols"] == custom.symbols[3:]
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    loaded = ScGeneTokenizer.from_pretrained(tmp_path)
    assert loaded.to_json_string() == custom.to_json_string()
    assert loaded.ensembl_ids == custom.ensembl_ids and loaded.symbols == custom.symbols
    assert_same_batch(custom(pbmc), loaded(pbmc))


def test_custom_vocabulary_survives_save_and_load(tmp_path, pbmc):
    genes = list(pbmc.var_names[:500])
    custom = ScGeneTokenizer.from_gene_list(genes, n_bins=9, min_coverage=0.1)
    custom.save_pretrained(tmp_path)
    loaded = ScGeneTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_size == 503 and loaded.symbols == custom.symbols and loaded.ensembl_ids == custom.ensembl_ids
    assert_same_batch(custom(pbmc[:50]), loaded(pbmc[:50]))


def test_every_loading_path_returns_the_saved_vocabulary(tmp_path, pbmc):
    """The vocabulary travels inside the config, so it does not matter which classmethod transformers calls."""
    from transformers import AutoFeatureExtractor

    custom = ScGeneTokenizer.from_gene_list(list(pbmc.var_names[::-1][:400]), min_coverage=0.05)
    custom.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    for loaded in (ScGeneTokenizer.from_pretrained(tmp_path), AutoFeatureExtractor.from_pretrained(tmp_path),
                   ScGeneTokenizer.from_dict(config), ScGeneTokenizer.from_json_file(tmp_path / "preprocessor_config.json")):
        assert loaded.vocab_size == 403 and loaded.symbols == custom.symbols, type(loaded)
        assert_same_batch(custom(pbmc[:20]), loaded(pbmc[:20]))


def test_a_folder_with_the_older_vocab_json_layout_loads_or_fails_clearly(tmp_path, pbmc):
    custom = ScGeneTokenizer.from_gene_list(list(pbmc.var_names[:300]), min_coverage=0.05)
    custom.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps(config.pop("vocab")))  # as scgene 0.1 saved it
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert ScGeneTokenizer.from_pretrained(tmp_path).symbols == custom.symbols
    from transformers import AutoFeatureExtractor

    with pytest.raises(ValueError, match="saved by scgene 0.1.*save it again"):  # never the default vocabulary
        AutoFeatureExtractor.from_pretrained(tmp_path)


def test_auto_feature_extractor_after_import(tmp_path, tokenizer, pbmc):
    from transformers import AutoFeatureExtractor

    import scgene  # noqa: F401  (registers ScGeneTokenizer with AutoFeatureExtractor)

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "ScGeneTokenizer"
    assert_same_batch(tokenizer(pbmc[:20]), loaded(pbmc[:20]))


def test_trainer_saves_the_tokenizer_with_every_checkpoint(tmp_path):
    """Trainer(processing_class=tokenizer) writes it into each checkpoint, from where AutoFeatureExtractor loads it."""
    import datasets
    from transformers import AutoFeatureExtractor, Trainer, TrainingArguments

    from modeling_helpers import tiny_config
    from scgene import ScGeneForMaskedExpression
    from scgene.data import DataCollatorForMaskedExpression

    genes = [f"G{i}" for i in range(30)]
    tokenizer = ScGeneTokenizer.from_gene_list(genes, n_bins=6)
    cells = small_adata(np.random.default_rng(0).poisson(1.0, (16, 30)), genes)
    rows = [dict(zip(("input_ids", "expression_values", "expression_bins"), cell)) for cell in ragged_cells(tokenizer, cells)]
    torch.manual_seed(0)
    model = ScGeneForMaskedExpression(tiny_config(vocab_size=tokenizer.vocab_size, n_bins=6))
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", disable_tqdm=True, remove_unused_columns=False, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=DataCollatorForMaskedExpression(tokenizer, seed=0), processing_class=tokenizer)
    trainer.train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in checkpoints:
        loaded = AutoFeatureExtractor.from_pretrained(checkpoint)
        assert loaded.symbols == tokenizer.symbols
        assert_same_batch(tokenizer(cells), AutoFeatureExtractor.from_pretrained(checkpoint)(cells))


def ragged_cells(tokenizer, adata):
    """(input_ids, expression_values, expression_bins) lists of each cell, unpadded."""
    for chunk in tokenizer.iter_encoded(adata):
        ends = np.cumsum(chunk.lengths)
        for end, length in zip(ends, chunk.lengths):
            yield tuple(getattr(chunk, name)[end - length : end].tolist() for name in ("input_ids", "expression_values", "expression_bins"))


# ---------------------------------------------------------------- gene matching and coverage
def test_genes_matched_by_ensembl_versioned_symbol_and_alias(tokenizer, cellbench):
    reference = tokenizer(cellbench[:20])
    assert tokenizer.map_genes(cellbench).coverage.id_type == "Ensembl id"

    versioned = cellbench[:20].copy()
    versioned.var_names = [f"{name}.7" for name in versioned.var_names]
    assert_same_batch(reference, tokenizer(versioned))

    by_symbol = ad.AnnData(cellbench[:20].X.copy(), var=pd.DataFrame(index=cellbench.var["gene_symbol"].astype(str)))
    by_symbol.var_names_make_unique()
    assert tokenizer.map_genes(by_symbol).coverage.id_type == "symbol"
    symbol_ids = tokenizer(by_symbol, return_tensors="np")["input_ids"]
    # symbols find nearly every gene the Ensembl ids found
    for row in range(20):
        found = np.isin(reference["input_ids"][row][reference["attention_mask"][row] == 1], symbol_ids[row])
        assert found.mean() > 0.97
    explicit = tokenizer(cellbench[:20], gene_column="gene_symbol", return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(explicit, symbol_ids)


def test_a_gene_left_out_of_the_vocabulary_never_lands_on_another_gene(tokenizer):
    """DHFRP1, a pseudogene left out of the default vocabulary, is also an old alias of DHFR: its counts are
    unmatched, not added to DHFR."""
    adata = small_adata([[738, 18]], ["DHFRP1", "DHFR"])
    mapping = tokenizer.map_genes(adata)
    assert list(mapping.column_to_matched) == [-1, 0] and mapping.coverage.n_duplicated == 0
    batch = tokenizer.with_settings(min_coverage=0.0)(adata, return_tensors="np")
    dhfr = tokenizer.convert_genes_to_ids(["DHFR"])[0]
    assert list(batch["input_ids"][0]) == [tokenizer.cls_token_id, dhfr]
    np.testing.assert_allclose(batch["expression_values"][0][1], np.log1p(18 / 756 * 1e4), rtol=1e-6)  # DHFR's own


def test_immune_receptor_constant_genes_are_vocabulary_genes_with_ids_after_the_earlier_vocabulary(tokenizer):
    """TRAC (once an alias of NCOR2, whose counts it took), TRBC1/2, IGKC, IGHM, IGLC2, IGHA1 are genes of their own;
    they were appended, so every gene of the earlier 26,064-gene vocabulary keeps its id."""
    names = ["TRAC", "TRBC1", "TRBC2", "IGKC", "IGHM", "IGLC2", "IGHA1"]
    ids = tokenizer.convert_genes_to_ids(names)
    assert min(ids) >= 3 + 26064 and len(set(ids)) == len(names)
    # ids of the earlier vocabulary (checkpoints trained on it read these)
    assert tokenizer.convert_genes_to_ids(["NCOR2", "TP53", "CD3E", "MS4A1"]) == [16238, 8012, 16894, 9867]
    adata = small_adata([[738, 18]], ["TRAC", "NCOR2"])
    batch = tokenizer.with_settings(min_coverage=0.0)(adata, return_tensors="np")
    ncor2 = tokenizer.convert_genes_to_ids(["NCOR2"])[0]
    assert sorted(batch["input_ids"][0][1:]) == sorted([ids[0], ncor2])


def test_alias_resolves_like_the_symbol(tokenizer):
    counts = [[5, 1, 0], [0, 2, 7]]
    by_symbol = tokenizer(small_adata(counts, ["TP53", "KRAS", "CD4"]))
    by_alias = tokenizer(small_adata(counts, ["P53", "K-RAS2A", "CD4"]))
    assert_same_batch(by_symbol, by_alias)


def test_coverage_error_names_the_id_type_and_the_fix(tokenizer):
    mouse_symbols = small_adata(np.ones((3, 4)), ["Actb", "Gapdh", "Cd3e", "Ptprc"])
    with pytest.raises(ValueError, match=r"look like symbols.*gene_column"):
        tokenizer(mouse_symbols)
    mouse_ensembl = small_adata(np.ones((3, 2)), ["ENSMUSG00000029580", "ENSMUSG00000057666"])
    with pytest.raises(ValueError, match="look like Ensembl ids"):
        tokenizer(mouse_ensembl)
    assert tokenizer.map_genes(mouse_symbols).coverage.n_matched_genes == 0


def test_duplicated_genes_are_summed_with_a_warning(tokenizer, caplog):
    # TP53 by symbol and by Ensembl id: one token carrying 3 + 4 counts
    adata = small_adata([[3, 4, 3]], ["TP53", "ENSG00000141510", "CD4"])
    with caplog.at_level(logging.WARNING):
        batch = tokenizer(adata, return_tensors="np")
    assert "summed" in caplog.text
    ids = list(batch["input_ids"][0])
    tp53, cd4 = tokenizer.convert_genes_to_ids(["TP53", "CD4"])
    assert sorted(ids) == sorted([tokenizer.cls_token_id, tp53, cd4])
    values = dict(zip(ids, batch["expression_values"][0]))
    np.testing.assert_allclose(values[tp53], np.log1p(7 / 10 * 1e4), rtol=1e-6)
    np.testing.assert_allclose(values[cd4], np.log1p(3 / 10 * 1e4), rtol=1e-6)


def test_gene_column_detected_automatically_or_named(tokenizer, cellbench):
    reference = tokenizer(cellbench[:20])
    renamed = ad.AnnData(cellbench[:20].X.copy(), var=pd.DataFrame(
        {"gene_ids": pd.Categorical(cellbench.var_names), "n_cells": np.arange(cellbench.n_vars)},
        index=[str(i) for i in range(cellbench.n_vars)],
    ))
    assert tokenizer.map_genes(renamed).coverage.source == "gene_ids"
    assert_same_batch(reference, tokenizer(renamed))
    assert_same_batch(reference, tokenizer(renamed, gene_column="gene_ids"))
    with pytest.raises(KeyError, match=r"'ensembl' is not a column of adata.var.*gene_ids"):
        tokenizer(renamed, gene_column="ensembl")


def test_special_token_names_in_the_input_are_not_genes(tokenizer):
    batch = tokenizer(small_adata([[5, 1, 3]], ["TP53", "<cls>", "<mask>"]), return_tensors="np")
    assert batch["input_ids"].tolist() == [[1, tokenizer.convert_genes_to_ids(["TP53"])[0]]]


def test_every_call_reports_coverage_over_all_cells(tokenizer, caplog):
    adata = small_adata([[1, 1, 2], [0, 4, 0]], ["TP53", "CD4", "NOT_A_GENE"])
    with caplog.at_level(logging.INFO, logger="scgene"):
        tokenizer(adata, chunk_size=1)
    # the first cell alone has 50%; both cells 6 of 8 counts
    assert "Gene coverage: 2/3 genes matched the vocabulary by symbol (from var_names), carrying 75.0% of the counts of 2 cells" in caplog.text
    assert any(r.levelno == logging.WARNING and "Gene coverage" in r.message for r in caplog.records)  # under 90%
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scgene"):
        tokenizer(small_adata([[1, 1]], ["TP53", "CD4"]))
    assert [r.levelno for r in caplog.records if "Gene coverage" in r.message] == [logging.INFO]
    assert "carrying 100.0% of the counts of 1 cells" in caplog.text
    assert tokenizer.last_coverage.n_matched_genes == 2 and tokenizer.last_coverage.count_fraction == 1.0
    assert "last_coverage" not in tokenizer.to_dict() and "_last_coverage" not in tokenizer.to_dict()


def test_coverage_threshold_applies_to_the_whole_call(tokenizer):
    # the first chunk is fully covered, the whole input is not (4 of 14 counts): the call still fails
    adata = small_adata([[4, 0], [0, 10]], ["TP53", "NOT_A_GENE"])
    chunks = tokenizer.iter_encoded(adata, chunk_size=1, num_threads=1)
    assert next(chunks).lengths.tolist() == [2]
    with pytest.raises(ValueError, match=r"28.6% of the counts of 2 cells, below min_coverage=0.5"):
        list(chunks)
    strict = ScGeneTokenizer(min_coverage=0.8)
    with pytest.raises(ValueError, match=r"50.0% of the counts of 1 cells"):  # fails fast, on the first chunk
        next(strict.iter_encoded(small_adata([[1, 1]], ["TP53", "NOT_A_GENE"])))
    # no counts at all: nothing to judge, no error
    assert tokenizer(small_adata([[0, 0]], ["TP53", "NOT_A_GENE"]))["input_ids"].tolist() == [[1]]


def test_duplicated_genes_keep_the_input_column_order(tokenizer):
    # TP53 comes after CD4 in the vocabulary but first in the input: with or without its duplicate, TP53 first
    tp53, cd4 = tokenizer.convert_genes_to_ids(["TP53", "CD4"])
    assert cd4 < tp53
    with_duplicate = tokenizer(small_adata([[3, 5, 4], [0, 1, 2]], ["TP53", "CD4", "ENSG00000141510"]), return_tensors="np")
    summed = tokenizer(small_adata([[7, 5], [2, 1]], ["TP53", "CD4"]), return_tensors="np")
    assert with_duplicate["input_ids"].tolist() == summed["input_ids"].tolist() == [[1, tp53, cd4], [1, tp53, cd4]]
    np.testing.assert_allclose(with_duplicate["expression_values"], summed["expression_values"], rtol=1e-6)
    np.testing.assert_array_equal(with_duplicate["expression_bins"], summed["expression_bins"])


# ---------------------------------------------------------------- input handling
def test_log_normalized_input_is_not_normalized_twice(tokenizer, pbmc, caplog):
    raw = tokenizer(pbmc)
    lognorm = pbmc.copy()
    lognorm.X = sp.csr_matrix(np.log1p(pbmc.X.multiply(1e4 / pbmc.X.sum(axis=1)).tocsr()), dtype=np.float32)
    with caplog.at_level(logging.WARNING):
        again = tokenizer(lognorm)
    assert "log1p-normalised" in caplog.text
    np.testing.assert_array_equal(raw["input_ids"], again["input_ids"])
    np.testing.assert_allclose(raw["expression_values"], again["expression_values"], atol=1e-5)


@pytest.mark.parametrize("bad, message", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
def test_negative_nan_and_inf_are_rejected(tokenizer, bad, message):
    with pytest.raises(ValueError, match=message):
        tokenizer(small_adata([[1, 2, 3], [4, bad, 6]], ["TP53", "KRAS", "CD4"]))


def test_counts_with_a_leftover_log1p_flag_are_used_as_counts(tokenizer, pbmc, caplog):
    """scanpy leaves uns['log1p'] on copies; integer values are counts whatever the flag says."""
    flagged = pbmc[:20].copy()
    flagged.uns["log1p"] = {"base": None}
    with caplog.at_level(logging.WARNING):
        batch = tokenizer(flagged)
    assert "uns['log1p'] is set, but X holds integer counts" in caplog.text
    assert_same_batch(batch, tokenizer(pbmc[:20].copy()))
    assert tokenizer.last_coverage.count_fraction > 0.9  # measured on counts, not NaN


def test_min_max_scaled_values_are_rejected(tokenizer, pbmc):
    scaled = pbmc[:20].copy()
    scaled.X = (scaled.X / scaled.X.max()).astype(np.float32)
    with pytest.raises(ValueError, match="look min-max scaled"):
        tokenizer(scaled)


def test_implausibly_large_values_are_rejected(tokenizer):
    with pytest.raises(ValueError, match=r"values up to 3e\+38.*corrupt or wrongly scaled"):
        tokenizer(small_adata([[1, 2, 3], [4, 3e38, 6]], ["TP53", "KRAS", "CD4"]))


def test_cells_without_counts_are_encoded_with_a_warning(tokenizer, pbmc, caplog):
    cells = pbmc[:6].copy()
    keep = sp.diags(np.array([1, 0, 1, 1, 0, 1], dtype=np.float32))
    cells.X = sp.csr_matrix(keep @ cells.X)
    with caplog.at_level(logging.WARNING):
        batch = tokenizer(cells)
    assert "2 of 6 cells have no counts at all" in caplog.text and "filter_cells" in caplog.text
    assert batch["attention_mask"].sum(axis=1).tolist()[1] == 1  # <cls> alone


@pytest.mark.parametrize("cells, error, message", [
    (np.ones((2, 3), dtype=np.float32), TypeError, "Expected an AnnData.*numpy.ndarray"),
    (ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["TP53", "CD4"])), ValueError, "adata.X is None"),
])
def test_what_is_not_an_anndata_with_counts_is_named(tokenizer, cells, error, message):
    with pytest.raises(error, match=message):
        tokenizer(cells)
    with pytest.raises(error, match=message):
        next(tokenizer.iter_encoded(cells))


def test_lower_case_symbols_get_a_letter_case_hint(tokenizer, pbmc):
    lower = pbmc[:10].copy()
    lower.var_names = lower.var_names.str.lower()
    with pytest.raises(ValueError, match=r"symbols are lower case; upper-cased, \d+ of 2000 match.*str.upper\(\)"):
        tokenizer(lower)


def test_a_truncated_h5ad_is_named_with_what_to_check(tmp_path, tokenizer, pbmc):
    path = tmp_path / "cells.h5ad"
    pbmc[:50].write_h5ad(path)
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=f"{truncated} could not be read as an .h5ad file.*truncated"):
        tokenizer(truncated)


def test_input_anndata_is_not_modified(tokenizer, pbmc):
    adata = pbmc.copy()
    before = (adata.X.copy(), adata.obs.copy(), adata.var.copy(), dict(adata.uns))
    tokenizer(adata, label_column="cell_type")
    assert (adata.X != before[0]).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before[1])
    pd.testing.assert_frame_equal(adata.var, before[2])
    assert set(adata.uns) == set(before[3])


def test_log_normalized_input_is_not_modified(tokenizer, pbmc):
    lognorm = pbmc[:40].copy()
    lognorm.X = sp.csr_matrix(np.log1p(lognorm.X.multiply(1e4 / lognorm.X.sum(axis=1)).tocsr()), dtype=np.float32)
    before = lognorm.X.copy()
    for kwargs in ({}, {"add_cls_token": False}):
        batch = ScGeneTokenizer(**kwargs)(lognorm, return_tensors="np")
        batch["expression_values"][:] = -7  # the output does not share memory with the input either
    assert (lognorm.X != before).nnz == 0


def test_target_sum_is_configurable():
    tokenizer = ScGeneTokenizer.from_gene_list(GENES, add_cls_token=False, target_sum=100)
    batch = tokenizer(small_adata(COUNTS, GENES), return_tensors="np")
    np.testing.assert_allclose(batch["expression_values"][0, :3], np.log1p(np.array([3, 1, 6]) / 10 * 100), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_bins": 1}, "n_bins must be an integer of at least 2"),
    ({"n_bins": 5, "bin_edges": [0.1, 0.2]}, "bin_edges must be 3 non-decreasing numbers"),
    ({"max_length": 1}, "max_length counts the tokens of a cell, <cls> included"),
    ({"top_k": 0}, "top_k is a number of genes per cell"),
    ({"min_coverage": 50}, "min_coverage is a fraction"),
    ({"target_sum": 0}, "target_sum must be positive"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScGeneTokenizer(**kwargs)


def test_bad_call_arguments_are_rejected(tokenizer, pbmc):
    cells = pbmc[:5]
    with pytest.raises(ValueError, match="padding must be 'longest'"):
        tokenizer(cells, padding="longer")
    with pytest.raises(ValueError, match="chunk_size is a number of cells"):
        tokenizer(cells, chunk_size=0)
    with pytest.raises(ValueError, match="max_length counts the tokens"):
        tokenizer(cells, max_length=1)
    with pytest.raises(KeyError, match=r"label_column 'celltype' is not an obs column.*cell_type"):
        tokenizer(cells, label_column="celltype")
    unlabeled = cells.copy()
    unlabeled.obs["cell_type"] = unlabeled.obs["cell_type"].astype(object)
    unlabeled.obs.iloc[1, unlabeled.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(ValueError, match="1 missing labels"):
        tokenizer(unlabeled, label_column="cell_type")


# ---------------------------------------------------------------- selection modes on a known matrix
GENES = ["TP53", "KRAS", "CD4", "CD8A", "GAPDH"]
COUNTS = [[0, 3, 1, 0, 6], [2, 0, 0, 0, 0], [1, 2, 3, 4, 0]]


@pytest.fixture()
def known():
    return ScGeneTokenizer.from_gene_list(GENES, add_cls_token=False, n_bins=5), small_adata(COUNTS, GENES)


def tokens(batch, row):
    mask = np.asarray(batch["attention_mask"][row]).astype(bool)
    return list(np.asarray(batch["input_ids"][row])[mask])


def test_nonzero_selection(known):
    tokenizer, adata = known
    batch = tokenizer(adata, gene_selection="nonzero", return_tensors="np")
    assert [tokens(batch, r) for r in range(3)] == [[4, 5, 7], [3], [3, 4, 5, 6]]
    np.testing.assert_allclose(batch["expression_values"][0, :3], np.log1p(np.array([3, 1, 6]) / 10 * 1e4), rtol=1e-6)
    assert batch["input_ids"][1, 1] == tokenizer.pad_token_id and batch["expression_values"][1, 1] == 0


def test_all_selection_keeps_zeros_in_vocabulary_order(known):
    tokenizer, adata = known
    batch = tokenizer(adata, gene_selection="all", return_tensors="np")
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6, 7]] * 3
    assert batch["attention_mask"].all()
    zero = np.asarray(COUNTS) == 0
    assert (batch["expression_bins"][zero] == 0).all() and (batch["expression_values"][zero] == 0).all()
    assert (batch["expression_bins"][~zero] > 0).all()
    with pytest.raises(ValueError, match="truncation=False"):
        tokenizer(adata, gene_selection="all", max_length=3)


def test_top_k_selection_and_deterministic_truncation(known):
    tokenizer, adata = known
    top2 = tokenizer(adata, gene_selection="top_k", top_k=2, return_tensors="np")
    assert [sorted(tokens(top2, r)) for r in range(3)] == [[4, 7], [3], [5, 6]]
    truncated = tokenizer(adata, gene_selection="nonzero", max_length=2, return_tensors="np")
    assert [sorted(tokens(truncated, r)) for r in range(3)] == [[4, 7], [3], [5, 6]]


def test_seeded_sampling_for_training():
    genes = [f"G{i}" for i in range(40)]
    adata = small_adata(np.arange(1, 41, dtype=float)[None, :].repeat(4, 0), genes)
    tokenizer = ScGeneTokenizer.from_gene_list(genes)
    first = tokenizer(adata, max_length=11, seed=1)
    assert_same_batch(first, tokenizer(adata, max_length=11, seed=1))
    sampled = [set(tokens(first, r)) for r in range(4)]
    assert all(len(s) == 11 for s in sampled) and len({frozenset(s) for s in sampled}) > 1
    top = set(tokens(tokenizer(adata, max_length=11), 0))
    assert top == {1} | set(range(3 + 30, 3 + 40))  # inference keeps the 10 highest


def test_cls_token_prepended_with_zero_value_and_bin(tokenizer, pbmc):
    batch = tokenizer(pbmc[:10], return_tensors="np")
    assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (batch["expression_values"][:, 0] == 0).all() and (batch["expression_bins"][:, 0] == 0).all()
    assert (batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1] >= 3).all()


# ---------------------------------------------------------------- binning
def test_quantile_bins_balanced_monotone_and_zero_bin():
    genes = [f"G{i}" for i in range(200)]
    rng = np.random.default_rng(0)
    counts = rng.permutation(np.arange(1, 201)).astype(float)[None, :].repeat(2, 0)
    counts[1, :100] = 0
    tokenizer = ScGeneTokenizer.from_gene_list(genes, n_bins=11, add_cls_token=False)
    batch = tokenizer(small_adata(counts, genes), gene_selection="all", return_tensors="np")
    values, bins = batch["expression_values"], batch["expression_bins"]
    assert (bins[values == 0] == 0).all() and (bins[values > 0] >= 1).all() and bins.max() == 10
    for row in range(2):
        order = np.argsort(values[row], kind="stable")
        assert (np.diff(bins[row][order]) >= 0).all()  # monotone in value
        per_bin = np.bincount(bins[row][values[row] > 0], minlength=11)[1:]
        assert per_bin.max() - per_bin.min() <= 1  # distinct values: balanced quantiles


def test_tied_values_share_a_bin(tokenizer, pbmc):
    batch = tokenizer(pbmc[:50], return_tensors="np")
    values, bins = batch["expression_values"], batch["expression_bins"]
    for row in range(50):
        for value in np.unique(values[row][values[row] > 0])[:5]:
            assert len(np.unique(bins[row][values[row] == value])) == 1


def test_global_bins_fitted_saved_and_monotone(tmp_path, pbmc):
    tokenizer = ScGeneTokenizer(n_bins=11)
    edges = tokenizer.fit_bin_edges(pbmc, max_cells=200)
    assert len(edges) == 9 and tokenizer.binning == "global" and np.all(np.diff(edges) >= 0)
    batch = tokenizer(pbmc, return_tensors="np")
    real = (batch["attention_mask"] == 1) & (batch["input_ids"] > 2)
    values, bins = batch["expression_values"][real], batch["expression_bins"][real]
    order = np.argsort(values, kind="stable")
    assert (np.diff(bins[order]) >= 0).all() and bins.min() >= 1 and bins.max() == 10
    tokenizer.save_pretrained(tmp_path)
    assert_same_batch(batch, ScGeneTokenizer.from_pretrained(tmp_path)(pbmc, return_tensors="np"))


def test_global_bin_edges_fitted_on_a_corpus_of_several_anndatas(pbmc):
    whole = ScGeneTokenizer(n_bins=11).fit_bin_edges(pbmc[:200], max_cells=200)
    corpus = ScGeneTokenizer(n_bins=11).fit_bin_edges([pbmc[:120], pbmc[120:200]], max_cells=500)
    np.testing.assert_allclose(corpus, whole)
    sampled = ScGeneTokenizer(n_bins=11).fit_bin_edges([pbmc[:120], pbmc[120:200]], max_cells=50)
    assert len(sampled) == 9 and not np.allclose(sampled, whole)
    with pytest.raises(ValueError, match=r"No cells to fit bin edges on"):
        ScGeneTokenizer(n_bins=11).fit_bin_edges([pbmc[:0], pbmc[:0]])


# ---------------------------------------------------------------- outputs, determinism, backed
def test_padding_tensors_and_labels(tokenizer, pbmc):
    batch = tokenizer(pbmc[:8], max_length=64, padding="max_length", pad_to_multiple_of=48, return_tensors="pt", label_column="cell_type")
    assert batch["input_ids"].shape == (8, 96) and batch["input_ids"].dtype == torch.int64
    assert batch["expression_values"].dtype == torch.float32 and batch["expression_bins"].dtype == torch.int64
    assert (batch["attention_mask"].sum(1) <= 64).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    codes = pbmc[:8].obs["cell_type"].cat.codes.to_numpy()
    assert batch["labels"].tolist() == codes.tolist()
    assert list(tokenizer.model_input_names) == list(INPUT_NAMES)


def reference_padding(chunks, width):
    """`iter_encoded` chunks padded cell by cell, the straightforward way."""
    dtypes = dict(zip(INPUT_NAMES, (np.int64, np.float32, np.int64, np.int64)))
    n_cells = sum(len(chunk.lengths) for chunk in chunks)
    batch = {name: np.zeros((n_cells, width), dtype) for name, dtype in dtypes.items()}
    for chunk in chunks:
        for i, (end, length) in enumerate(zip(np.cumsum(chunk.lengths), chunk.lengths)):
            for name in INPUT_NAMES[:3]:
                batch[name][chunk.start + i, :length] = getattr(chunk, name)[end - length : end]
            batch["attention_mask"][chunk.start + i, :length] = 1
    return batch


@pytest.mark.parametrize(
    "padding, multiple, kwargs",
    [
        ("longest", None, {}),
        ("longest", None, {"max_length": 64, "chunk_size": 50}),
        ("max_length", 7, {"max_length": 300, "chunk_size": 64}),
        ("longest", 32, {"truncation": False, "chunk_size": 16}),  # later chunks are longer: the batch widens
        ("max_length", None, {"max_length": 100, "truncation": False, "chunk_size": 100}),  # cells over max_length
        ("longest", None, {"gene_selection": "all", "truncation": False, "chunk_size": 128}),
    ],
)
def test_padded_call_equals_padded_chunks(tokenizer, pbmc, padding, multiple, kwargs):
    batch = tokenizer(pbmc, padding=padding, pad_to_multiple_of=multiple, **kwargs)
    chunks = list(tokenizer.iter_encoded(pbmc, **kwargs))
    lengths = np.concatenate([chunk.lengths for chunk in chunks])
    width = max(lengths.max(), kwargs["max_length"] if padding == "max_length" else 0)
    width = -(-width // (multiple or 1)) * (multiple or 1)
    expected = reference_padding(chunks, width)
    assert set(batch.keys()) == set(expected)
    for name, array in expected.items():
        assert batch[name].dtype == array.dtype and batch[name].flags.c_contiguous, name
        np.testing.assert_array_equal(batch[name], array, err_msg=name)


def test_padded_call_on_no_cells(tokenizer, pbmc):
    batch = tokenizer(pbmc[:0].copy(), max_length=64, padding="max_length", pad_to_multiple_of=48)
    for name, dtype in zip(INPUT_NAMES, (np.int64, np.float32, np.int64, np.int64)):
        assert batch[name].shape == (0, 96) and batch[name].dtype == dtype
    assert tokenizer(pbmc[:0].copy(), return_attention_mask=False)["input_ids"].shape == (0, 0)
    assert "attention_mask" not in tokenizer(pbmc[:4], return_attention_mask=False)


def test_inference_output_is_deterministic(tokenizer, pbmc):
    first = tokenizer(pbmc, max_length=128, chunk_size=64)
    assert_same_batch(first, tokenizer(pbmc, max_length=128, chunk_size=64, num_threads=1))
    assert_same_batch(first, tokenizer(pbmc, max_length=128, chunk_size=100))


def test_backed_and_in_memory_paths_identical(tmp_path, tokenizer, cellbench):
    path = tmp_path / "cells.h5ad"
    cellbench.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for kwargs in ({}, {"gene_selection": "all", "truncation": False}, {"max_length": 300, "seed": 3}):
        assert_same_batch(tokenizer(cellbench, chunk_size=32, **kwargs), tokenizer(backed, chunk_size=32, **kwargs))
    assert_same_batch(tokenizer(cellbench, chunk_size=32), tokenizer(str(path), chunk_size=32))


class RecordingMatrix:
    """An X that hands out CSR row slices and records every read."""

    def __init__(self, matrix):
        self.matrix, self.reads = sp.csr_matrix(matrix), []

    def __getitem__(self, rows):
        assert isinstance(rows, slice), rows  # never the whole matrix, never fancy indexing
        part = self.matrix[rows]
        self.reads.append(part.shape[0])
        return part


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"gene_selection": "all", "truncation": False}])
def test_cells_are_read_one_chunk_at_a_time(tokenizer, pbmc, kwargs, backed):
    from types import SimpleNamespace

    matrix = RecordingMatrix(pbmc.X)
    lazy = SimpleNamespace(X=matrix, n_obs=pbmc.n_obs, uns={}, var=pbmc.var, var_names=pbmc.var_names, isbacked=backed)
    chunks = list(tokenizer.iter_encoded(lazy, chunk_size=32, **kwargs))
    if backed:  # the first chunk (for the input checks), then blocks of 8 chunks cut up in memory
        assert matrix.reads == [32, 256, 300 - 256]
    else:  # each cell read once, 32 at a time
        assert matrix.reads == [32] * 9 + [300 - 9 * 32]
    assert [chunk.start for chunk in chunks] == list(range(0, 300, 32))
    expected = tokenizer(pbmc, chunk_size=32, return_tensors="np", **kwargs)
    np.testing.assert_array_equal(np.concatenate([c.input_ids for c in chunks]), expected["input_ids"][expected["attention_mask"] == 1])


def test_real_h5ad_end_to_end(tokenizer):
    adata = ad.read_h5ad(PBMC)
    coverage = tokenizer.map_genes(adata).coverage
    assert coverage.n_matched_genes > 1850 and coverage.id_type == "symbol"
    batch = tokenizer(adata, return_tensors="pt", label_column="cell_type")
    assert batch["input_ids"].shape[0] == adata.n_obs == batch["labels"].shape[0]
    lengths = batch["attention_mask"].sum(1)
    nonzero_genes = np.asarray((adata.X[:, tokenizer.map_genes(adata).columns] > 0).sum(1)).ravel()
    np.testing.assert_array_equal(lengths.numpy(), nonzero_genes + 1)
    assert batch["expression_bins"].max() == tokenizer.n_bins - 1


@pytest.mark.parametrize("vocabulary", ["default", "custom"])
def test_remote_code_load_without_the_package(tmp_path, tokenizer, pbmc, vocabulary):
    """A saved tokenizer carries its code and its vocabulary: AutoFeatureExtractor loads it with trust_remote_code
    alone, where the package (and so its shipped default vocabulary) cannot be imported."""
    import scgene  # noqa: F401  (marks the class for auto_map on save)

    if vocabulary == "custom":
        tokenizer = ScGeneTokenizer.from_gene_list(list(pbmc.var_names[::-1]))

    tokenizer.save_pretrained(tmp_path / "tok")
    for name in ("tokenization_scgene.py", "encoding_scgene.py", "vocabulary_scgene.py"):
        assert (tmp_path / "tok" / name).exists(), name
    pbmc[:30].write_h5ad(tmp_path / "cells.h5ad")
    np.save(tmp_path / "expected.npy", tokenizer(pbmc[:30], return_tensors="np")["input_ids"])
    script = f"""
import sys
sys.modules["scgene"] = None  # the package is not importable here
import anndata, numpy as np
from transformers import AutoFeatureExtractor
tok = AutoFeatureExtractor.from_pretrained({str(tmp_path / "tok")!r}, trust_remote_code=True)
assert type(tok).__module__.startswith("transformers_modules"), type(tok).__module__
ids = tok(anndata.read_h5ad({str(tmp_path / "cells.h5ad")!r}), return_tensors="np")["input_ids"]
np.testing.assert_array_equal(ids, np.load({str(tmp_path / "expected.npy")!r}))
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- the default vocabulary's build script
def write_gene_tables(folder: Path) -> None:
    """A miniature ../shared/data/genes/ in the real formats."""
    import gzip

    folder.mkdir()
    gencode = [
        ("ENSG00000000003", "TSPAN6", "protein_coding"), ("ENSG00000000001", "GENEB", "protein_coding"),
        ("ENSG00000000010", "MALAT1", "lncRNA"), ("ENSG00000000011", "ENSG00000000011", "lncRNA"),
        ("ENSG00000000020", "MT-RNR2", "Mt_rRNA"), ("ENSG00000000030", "PSEUDO1", "processed_pseudogene"),
    ]
    with gzip.open(folder / "genes_homo_sapiens.csv.gz", "wt") as handle:
        handle.writelines(f"{e},{s},1,100,{b}\n" for e, s, b in gencode)
    org = [("1", "TSPAN6", "ENSG00000000003", "T245|OLD1|SHARED"), ("2", "GENEB", "ENSG00000000001", "SHARED|MALAT1")]
    with gzip.open(folder / "org_Hs_eg_gene_table.tsv.gz", "wt") as handle:
        handle.write("entrez_id\tsymbol\tname\tgene_type\tchromosome\tcytoband\tensembl_ids\tuniprot_ids\taliases\n")
        handle.writelines(f"{i}\t{s}\tname\tprotein-coding\t1\t1p1\t{e}\t\t{a}\n" for i, s, e, a in org)
    with gzip.open(folder / "GENCODEv44_Gene_id2name.csv.gz", "wt") as handle:
        handle.write("ENSG00000000010,LINC-OLD\nENSG00000000030,PSEUDO1\n")


def test_build_default_vocab_script_is_reproducible(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_default_vocab", Path(__file__).parents[1] / "scripts" / "build_default_vocab.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_gene_tables(tmp_path / "genes")
    vocab = script.build_vocab(tmp_path / "genes")
    # protein-coding, then named lncRNAs, then mitochondrial non-coding; Ensembl id order within each group
    assert vocab["ensembl_ids"] == ["ENSG00000000001", "ENSG00000000003", "ENSG00000000010", "ENSG00000000020"]
    assert vocab["symbols"] == ["GENEB", "TSPAN6", "MALAT1", "MT-RNR2"]
    # unambiguous aliases only, never a name that is already a symbol; pseudogenes are not in the vocabulary
    assert vocab["aliases"] == {"LINC-OLD": "ENSG00000000010", "OLD1": "ENSG00000000003", "T245": "ENSG00000000003"}
    unnamed = script.build_vocab(tmp_path / "genes", include_unnamed_lncrna=True)
    assert "ENSG00000000011" in unnamed["ensembl_ids"]
    # byte-identical files whatever their name, and a tokenizer reads them
    script.write_vocab(vocab, tmp_path / "a.json.gz")
    script.write_vocab(vocab, tmp_path / "other_name.json.gz")
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "other_name.json.gz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json.gz", "genes", "other_name.json.gz"]  # no temporary left
    tokenizer = ScGeneTokenizer(vocab_file=str(tmp_path / "a.json.gz"))
    assert tokenizer.convert_genes_to_ids(["TSPAN6", "OLD1", "ENSG00000000010.4", "LINC-OLD"]) == [4, 4, 5, 5]


def test_shipped_vocabulary_has_a_reproducible_gzip_header():
    from scgene.tokenization_scgene import DEFAULT_VOCAB

    header = Path(DEFAULT_VOCAB).read_bytes()[:10]
    assert header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"  # no FNAME flag, mtime 0


# ---------------------------------------------------------------- where the counts are: X, a layer, .raw
def log_normalized_copy(adata):
    import scanpy as sc

    logged = adata.copy()
    logged.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(logged, target_sum=1e6)  # log1p(CPM): another scale than the tokenizer's 1e4
    sc.pp.log1p(logged)
    return logged


def test_counts_in_a_layer_or_raw_are_named_and_read_with_layer_or_use_raw(tokenizer, pbmc, caplog):
    counts = pbmc[:40].copy()
    logged = log_normalized_copy(counts)
    with caplog.at_level(logging.WARNING):
        tokenizer(logged)
    assert "layer='counts' (--layer counts)" in caplog.text
    assert_same_batch(tokenizer(counts), tokenizer(logged, layer="counts"))
    # .raw with its own (more) genes than X: genes and counts both come from .raw
    with_raw = counts.copy()
    with_raw.raw = with_raw
    with_raw = with_raw[:, :500].copy()
    with_raw.X = log_normalized_copy(with_raw).X
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenizer(with_raw)
    assert "use_raw=True (--use-raw)" in caplog.text
    assert_same_batch(tokenizer(counts), tokenizer(with_raw, use_raw=True))


def test_layer_and_use_raw_errors_name_the_fix(tokenizer, pbmc):
    cells = pbmc[:10].copy()
    with pytest.raises(KeyError, match=r"layer 'counts' is not in adata.layers"):
        tokenizer(cells, layer="counts")
    with pytest.raises(ValueError, match="adata.raw is None"):
        tokenizer(cells, use_raw=True)
    cells.layers["counts"] = cells.X.copy()
    with pytest.raises(ValueError, match="not both"):
        tokenizer(cells, layer="counts", use_raw=True)


def test_cli_tokenize_reads_a_layer(tmp_path, pbmc):
    import datasets

    from scgene.cli import main

    logged = log_normalized_copy(pbmc[:30])
    logged.write_h5ad(tmp_path / "logged.h5ad")
    pbmc[:30].write_h5ad(tmp_path / "counts.h5ad")
    assert main(["tokenize", str(tmp_path / "logged.h5ad"), str(tmp_path / "a"), "--layer", "counts"]) == 0
    assert main(["tokenize", str(tmp_path / "counts.h5ad"), str(tmp_path / "b")]) == 0
    a, b = datasets.load_from_disk(str(tmp_path / "a")), datasets.load_from_disk(str(tmp_path / "b"))
    assert a["input_ids"] == b["input_ids"] and a["total_counts"] == b["total_counts"]


def test_a_small_gene_panel_is_named_even_when_it_carries_all_its_counts(tokenizer, pbmc, caplog):
    """The coverage share is measured on the file's own counts, so 50 genes carry 100% of them: the panel warning
    counts the genes matched against the vocabulary instead."""
    panel = pbmc[:20, :60].copy()
    with caplog.at_level(logging.WARNING):
        tokenizer(panel)
    matched = tokenizer.last_coverage.n_matched_genes
    assert 50 <= matched <= 60 and f"measures {matched} of the vocabulary's 26084 genes" in caplog.text
    assert tokenizer.last_coverage.count_fraction > 0.95  # the share of the file's own counts stays high
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ScGeneTokenizer.from_gene_list(list(panel.var_names))(panel)  # a vocabulary of just these genes: no warning
    assert "gene panel" not in caplog.text



def test_log2_normalised_x_without_counts_is_read_as_log2(tokenizer, pbmc, caplog):
    import scanpy as sc

    from scgene.preprocessing import preprocess

    natural = pbmc[:40].copy()
    sc.pp.normalize_total(natural, target_sum=1e4)
    sc.pp.log1p(natural)  # log1p(CP10k): what the tokenizer makes of counts
    log2 = pbmc[:40].copy()
    sc.pp.normalize_total(log2, target_sum=1e4)
    sc.pp.log1p(log2, base=2)  # log2(CP10k + 1), as some pipelines write
    with caplog.at_level(logging.WARNING):
        from_log2 = tokenizer(log2)
    assert "looks log2(x + 1)-normalised" in caplog.text
    from_natural = tokenizer(natural)
    np.testing.assert_array_equal(from_log2["input_ids"], from_natural["input_ids"])
    np.testing.assert_allclose(from_log2["expression_values"], from_natural["expression_values"], rtol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenizer(natural)
    assert "log2" not in caplog.text  # natural log1p stays natural
    prepared = preprocess(log2)
    assert prepared.uns["scgene_preprocessing"]["input_was_log2"]
    np.testing.assert_allclose(prepared.X.toarray(), natural.X.toarray(), rtol=1e-5, atol=1e-6)


def test_an_alias_column_beside_its_gene_is_left_out_not_summed_into_it(tokenizer):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    # 10x symbol lists hold KIAA0754 (an alias of MACF1) as a feature of its own, beside MACF1
    counts = sp.csr_matrix(np.array([[5, 7, 3], [2, 0, 1]], np.float32))
    both = ad.AnnData(counts, var=pd.DataFrame(index=["MACF1", "KIAA0754", "CD3E"]))
    mapping = tokenizer.map_genes(both)
    assert mapping.coverage.n_aliases_left_out == 1 and mapping.coverage.n_duplicated == 0
    assert "1 aliases of genes the input has under their own name left out" in str(mapping.coverage)
    macf1, cd3e = tokenizer.convert_genes_to_ids(["MACF1", "CD3E"])
    encoded = tokenizer(both)
    ids, values = np.asarray(encoded["input_ids"][0]), np.asarray(encoded["expression_values"][0])
    # MACF1 keeps its own 5 of the cell's 15 counts (normalised over every input gene, as scanpy does), not 5 + 7
    np.testing.assert_allclose(values[ids == macf1], np.log1p(5 / 15 * 1e4), rtol=1e-5)
    alone = ad.AnnData(counts[:, 1:], var=pd.DataFrame(index=["KIAA0754", "CD3E"]))
    assert tokenizer.map_genes(alone).coverage.n_aliases_left_out == 0  # without MACF1, the alias finds it
    assert macf1 in tokenizer(alone)["input_ids"][0]
