"""The datasets export and `scgene tokenize`: round trip, obs columns, shards, streaming, atomic writes."""

import anndata
import datasets
import numpy as np
import pytest

import scgene
from scgene.cli import main
from scgene.data import DataCollatorForCellClassification, export_dataset
from scgene.tokenization_scgene import ScGeneTokenizer


def test_arrow_export_round_trip(tmp_path, tokenizer, pbmc):
    out = export_dataset(pbmc, tmp_path / "ds", tokenizer, obs_columns=["cell_type", "nCount_RNA"], num_shards=3, chunk_size=128)
    dataset = datasets.load_from_disk(str(out))
    assert dataset.num_rows == pbmc.n_obs and len(list(out.glob("data-*.arrow"))) == 3
    assert dataset.features["cell_type"].names == list(pbmc.obs["cell_type"].cat.categories)
    batch = tokenizer(pbmc, return_tensors="np")
    for row in (0, 150, 299):
        length = batch["attention_mask"][row].sum()
        for name in ("input_ids", "expression_values", "expression_bins"):
            np.testing.assert_array_equal(dataset[row][name], batch[name][row, :length])
    assert dataset["cell_type"] == pbmc.obs["cell_type"].cat.codes.tolist()
    np.testing.assert_allclose(dataset["nCount_RNA"], pbmc.obs["nCount_RNA"], rtol=1e-6)
    # the tokenizer is saved next to the data and reproduces it
    reloaded = ScGeneTokenizer.from_pretrained(out)
    np.testing.assert_array_equal(reloaded(pbmc, return_tensors="np")["input_ids"], batch["input_ids"])
    # and the classification collator takes the rows as they are
    collated = DataCollatorForCellClassification(tokenizer, label_column="cell_type")([dataset[i] for i in range(4)])
    np.testing.assert_array_equal(collated["input_ids"].numpy(), batch["input_ids"][:4, : collated["input_ids"].shape[1]])


def test_streaming_and_parquet(tmp_path, tokenizer, pbmc):
    arrow = export_dataset(pbmc[:50], tmp_path / "arrow", tokenizer, obs_columns=["cell_type"])
    stream = datasets.load_dataset("arrow", data_files=str(arrow / "data-*.arrow"), streaming=True, split="train")
    first = next(iter(stream))
    assert first["input_ids"][0] == tokenizer.cls_token_id and "cell_type" in first
    parquet = export_dataset(pbmc[:50], tmp_path / "parquet", tokenizer, num_shards=2, file_format="parquet")
    files = sorted(str(p) for p in parquet.glob("data-*.parquet"))
    assert len(files) == 2
    table = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))
    assert table.num_rows == 50 and table[0]["input_ids"] == first["input_ids"]


def test_interrupted_export_leaves_nothing(tmp_path, tokenizer, pbmc, monkeypatch):
    original = ScGeneTokenizer.iter_encoded

    def failing(self, adata, **kwargs):
        for index, chunk in enumerate(original(self, adata, **kwargs)):
            if index == 1:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(ScGeneTokenizer, "iter_encoded", failing)
    with pytest.raises(KeyboardInterrupt):
        export_dataset(pbmc, tmp_path / "ds", tokenizer, chunk_size=64)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tokenizer, pbmc):
    out = tmp_path / "ds"
    export_dataset(pbmc[:20], out, tokenizer)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_dataset(pbmc[:10], out, tokenizer)
    export_dataset(pbmc[:10], out, tokenizer, overwrite=True)
    assert datasets.load_from_disk(str(out)).num_rows == 10


def test_more_shards_than_cells(tmp_path, tokenizer, pbmc):
    out = export_dataset(pbmc[:3], tmp_path / "ds", tokenizer, num_shards=5, chunk_size=2)
    assert len(list(out.glob("data-*.arrow"))) == 5
    dataset = datasets.load_from_disk(str(out))
    assert dataset.num_rows == 3 and dataset[2]["input_ids"][0] == tokenizer.cls_token_id


def test_cli_tokenize(tmp_path, pbmc, capsys):
    source = tmp_path / "cells.h5ad"
    pbmc[:40].write_h5ad(source)
    saved = tmp_path / "tokenizer"
    ScGeneTokenizer(n_bins=11).save_pretrained(saved)
    code = main(["tokenize", str(source), str(tmp_path / "out"), "--tokenizer", str(saved), "--gene-selection", "top_k",
                 "--top-k", "20", "--obs-columns", "cell_type", "--num-shards", "2", "--chunk-size", "16"])
    assert code == 0
    dataset = datasets.load_from_disk(str(tmp_path / "out"))
    assert dataset.num_rows == 40 and set(dataset.column_names) == {"input_ids", "expression_values", "expression_bins",
                                                                    "total_counts", "cell_type"}
    source_cells = anndata.read_h5ad(source)
    np.testing.assert_allclose(dataset["total_counts"], np.asarray(source_cells.X.sum(axis=1)).ravel(), rtol=1e-6)
    assert max(len(ids) for ids in dataset["input_ids"]) == 21
    assert max(max(bins) for bins in dataset["expression_bins"]) <= 10
    assert ScGeneTokenizer.from_pretrained(tmp_path / "out").n_bins == 11
    assert main(["tokenize", str(source), str(tmp_path / "out")]) == 1  # exists: a clear error, no traceback
    assert "--overwrite" in capsys.readouterr().err


def test_cli_tokenize_with_the_default_vocabulary(tmp_path, tokenizer, pbmc, capsys):
    source = tmp_path / "cells.h5ad"
    pbmc[:30].write_h5ad(source)
    assert main(["tokenize", str(source), str(tmp_path / "out"), "--max-length", "64", "--format", "parquet"]) == 0
    assert "Gene coverage" in capsys.readouterr().err  # the coverage report is shown
    saved = ScGeneTokenizer.from_pretrained(tmp_path / "out")
    assert saved.vocab_size == tokenizer.vocab_size and saved.ensembl_ids == tokenizer.ensembl_ids
    table = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data-*.parquet"), split="train", cache_dir=str(tmp_path / "cache"))
    expected = tokenizer(pbmc[:30], max_length=64, return_tensors="np")
    for row in (0, 29):
        assert table[row]["input_ids"] == expected["input_ids"][row, : expected["attention_mask"][row].sum()].tolist()


def test_cli_user_errors_are_one_line_messages(tmp_path, pbmc, capsys):
    assert main(["tokenize", str(tmp_path / "missing.h5ad"), str(tmp_path / "out")]) == 1
    assert "missing.h5ad is not a file" in capsys.readouterr().err
    source = tmp_path / "cells.h5ad"
    pbmc[:5].write_h5ad(source)
    assert main(["tokenize", str(source), str(tmp_path / "out"), "--obs-columns", "celltype"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scgene tokenize: error: obs columns not found: ['celltype']") and "Traceback" not in err
    assert main(["tokenize", str(source), str(tmp_path / "out"), "--num-shards", "0"]) == 1
    assert "--num-shards must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_overwrite_keeps_the_previous_output(tmp_path, tokenizer, pbmc, monkeypatch):
    out = export_dataset(pbmc[:10], tmp_path / "ds", tokenizer)
    original = ScGeneTokenizer.iter_encoded

    def failing(self, adata, **kwargs):
        yield from original(self, adata, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(ScGeneTokenizer, "iter_encoded", failing)
    with pytest.raises(RuntimeError):
        export_dataset(pbmc[:20], out, tokenizer, overwrite=True)
    monkeypatch.undo()
    assert datasets.load_from_disk(str(out)).num_rows == 10 and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    export_dataset(pbmc[:20], out, tokenizer, overwrite=True)
    assert datasets.load_from_disk(str(out)).num_rows == 20 and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_saved_tokenizer_carries_the_export_settings(tmp_path, tokenizer, pbmc):
    """The tokenizer saved next to the data says how the data was made; the sampling seed is a record only."""
    out = export_dataset(pbmc[:40], tmp_path / "ds", tokenizer, max_length=64, gene_selection="top_k", top_k=50, seed=3)
    saved = ScGeneTokenizer.from_pretrained(out)
    assert (saved.max_length, saved.gene_selection, saved.top_k, saved.sampling_seed) == (64, "top_k", 50, 3)
    assert tokenizer.max_length == 2048 and tokenizer.sampling_seed is None  # the caller's tokenizer is untouched
    inference = saved(pbmc[:40], return_tensors="np")
    highest = tokenizer(pbmc[:40], max_length=64, gene_selection="top_k", top_k=50, return_tensors="np")
    np.testing.assert_array_equal(inference["input_ids"], highest["input_ids"])
    unlimited = export_dataset(pbmc[:5], tmp_path / "all", tokenizer, truncation=False)
    assert ScGeneTokenizer.from_pretrained(unlimited).max_length is None


def test_cli_tokenizes_a_corpus_of_files_folders_and_globs_into_one_dataset(tmp_path, tokenizer, pbmc, capsys):
    """Files with different gene panels and label sets become one dataset: one vocabulary, shards over all cells,
    labels merged into one category list, and a `source` column naming each cell's file."""
    first = pbmc[:30].copy()
    second = pbmc[30:50, ::-1].copy()  # genes in another order: each file is mapped to the vocabulary on its own
    second = second[:, second.var_names[:1500]].copy()  # and a smaller panel
    second.obs["cell_type"] = second.obs["cell_type"].cat.rename_categories(lambda c: f"{c} (study 2)")
    folder = tmp_path / "study2"
    folder.mkdir()
    first.write_h5ad(tmp_path / "study1.h5ad")
    second.write_h5ad(folder / "part_a.h5ad")
    second[:5].write_h5ad(folder / "part_b.h5ad")
    out = tmp_path / "corpus"
    code = main(["tokenize", str(tmp_path / "study1.h5ad"), str(folder), str(out), "--obs-columns", "cell_type",
                 "--num-shards", "3", "--max-length", "128"])
    assert code == 0, capsys.readouterr().err
    corpus = datasets.load_from_disk(str(out))
    assert corpus.num_rows == 55 and len(list(out.glob("data-*.arrow"))) == 3
    assert corpus.features["source"].names == ["study1", "part_a", "part_b"]
    assert corpus["source"] == [0] * 30 + [1] * 20 + [2] * 5
    labels = corpus.features["cell_type"]
    assert labels.names == list(first.obs["cell_type"].cat.categories) + list(second.obs["cell_type"].cat.categories)
    decoded = [labels.int2str(code) for code in corpus["cell_type"]]
    assert decoded == [*map(str, first.obs["cell_type"]), *map(str, second.obs["cell_type"]), *map(str, second.obs["cell_type"][:5])]
    for row, (cells, index) in {0: (first, 0), 29: (first, 29), 30: (second, 0), 54: (second, 4)}.items():
        expected = tokenizer(cells[index : index + 1], max_length=128, return_tensors="np")
        length = expected["attention_mask"][0].sum()
        np.testing.assert_array_equal(corpus[row]["input_ids"], expected["input_ids"][0, :length])
        np.testing.assert_allclose(corpus[row]["expression_values"], expected["expression_values"][0, :length], rtol=1e-6)
    # a quoted glob names the same files; an input named twice is refused
    assert main(["tokenize", str(tmp_path / "study*" / "part_*.h5ad"), str(tmp_path / "glob")]) == 0
    assert datasets.load_from_disk(str(tmp_path / "glob"))["source"] == [0] * 20 + [1] * 5
    assert main(["tokenize", str(folder), str(folder / "part_a.h5ad"), str(tmp_path / "twice")]) == 1
    assert "given more than once" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "nothing_*.h5ad"), str(tmp_path / "none")]) == 1
    assert "matches no file" in capsys.readouterr().err


def test_a_corpus_refuses_columns_that_differ_in_type_or_are_missing(tmp_path, tokenizer, pbmc):
    first, second = pbmc[:10].copy(), pbmc[10:20].copy()
    second.obs["cell_type"] = second.obs["cell_type"].astype(str)
    with pytest.raises(ValueError, match="'cell_type' is categorical in a but string in b"):
        export_dataset({"a": first, "b": second}, tmp_path / "mixed", tokenizer, obs_columns=["cell_type"])
    with pytest.raises(KeyError, match=r"not found in b: \['donor'\]"):
        first.obs["donor"] = "d1"
        export_dataset({"a": first, "b": second}, tmp_path / "missing", tokenizer, obs_columns=["donor"])
    assert list(tmp_path.iterdir()) == []


def test_cli_names_an_unreadable_file_in_one_line_and_has_a_version(tmp_path, pbmc, capsys):
    (tmp_path / "notes.h5ad").write_text("not an h5ad file")
    assert main(["tokenize", str(tmp_path / "notes.h5ad"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"scgene tokenize: error: {tmp_path / 'notes.h5ad'} could not be read as an .h5ad file")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"scgene {scgene.__version__}"


def test_cli_messages_speak_in_flags(tmp_path, pbmc, capsys):
    """The coverage error names --gene-column and --min-coverage (a real flag), not Python arguments; a missing
    --tokenizer folder is named as such, not as a Hub id."""
    lower = pbmc[:20].copy()
    lower.var_names = lower.var_names.str.lower()
    lower.write_h5ad(tmp_path / "lower.h5ad")
    assert main(["tokenize", str(tmp_path / "lower.h5ad"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "--gene-column" in err and "--min-coverage" in err and "str.upper()" in err
    assert "gene_column" not in err and "min_coverage" not in err and "overwrite=True" not in err
    assert main(["tokenize", str(tmp_path / "lower.h5ad"), str(tmp_path / "out"), "--min-coverage", "0"]) == 0
    assert main(["tokenize", str(tmp_path / "lower.h5ad"), str(tmp_path / "out")]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["tokenize", str(tmp_path / "lower.h5ad"), str(tmp_path / "other"), "--tokenizer",
                 str(tmp_path / "nonexistent")]) == 1
    assert f"--tokenizer {tmp_path / 'nonexistent'}: no such folder" in capsys.readouterr().err
