"""ScGeneTokenizer: vocabulary, gene matching, normalisation, binning, selection, serialisation."""

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


def test_hub_files_import_only_allowed_modules():
    import scgene.tokenization_scgene as module
    from transformers.dynamic_module_utils import get_relative_import_files

    # the tokenizer and every file it imports relatively (copied with it by save_pretrained)
    files = [module.__file__, *get_relative_import_files(module.__file__)]
    assert {Path(f).name for f in files} == {"tokenization_scgene.py", "encoding_scgene.py"}
    for file in files:
        # transformers' check_imports skips imports inside try/except, so scipy/anndata stay optional
        third_party = set(get_imports(file)) - set(sys.stdlib_module_names)
        assert third_party <= {"numpy", "torch", "transformers"}, (file, third_party)


# ---------------------------------------------------------------- serialisation
def test_save_load_round_trip_json_only(tmp_path, tokenizer, pbmc):
    custom = ScGeneTokenizer(n_bins=21, gene_selection="top_k", top_k=50, add_cls_token=False, max_length=64)
    custom.save_pretrained(tmp_path)
    assert {"preprocessor_config.json", "vocab.json"} <= {p.name for p in tmp_path.iterdir()}
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


def test_auto_feature_extractor_after_import(tmp_path, tokenizer, pbmc):
    import scgene  # noqa: F401  (registers ScGeneTokenizer with AutoFeatureExtractor)
    from transformers import AutoFeatureExtractor

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "ScGeneTokenizer"
    assert_same_batch(tokenizer(pbmc[:20]), loaded(pbmc[:20]))


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


def test_input_anndata_is_not_modified(tokenizer, pbmc):
    adata = pbmc.copy()
    before = (adata.X.copy(), adata.obs.copy(), adata.var.copy(), dict(adata.uns))
    tokenizer(adata, label_column="cell_type")
    assert (adata.X != before[0]).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, before[1])
    pd.testing.assert_frame_equal(adata.var, before[2])
    assert set(adata.uns) == set(before[3])


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


def test_seeded_sampling_for_training(known):
    tokenizer, _ = known
    adata = small_adata(np.arange(1, 41, dtype=float)[None, :].repeat(4, 0), tokenizer.symbols[3:8] * 0 + [f"G{i}" for i in range(40)])
    tokenizer = ScGeneTokenizer.from_gene_list([f"G{i}" for i in range(40)])
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


def test_remote_code_load_without_the_package(tmp_path, tokenizer, pbmc):
    """A saved tokenizer carries its code: AutoFeatureExtractor loads it with trust_remote_code alone."""
    import scgene  # noqa: F401  (marks the class for auto_map on save)

    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenization_scgene.py").exists() and (tmp_path / "tok" / "encoding_scgene.py").exists()
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
