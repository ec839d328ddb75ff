import json

import anndata
import numpy as np
import pandas as pd
import pytest

from scgene import ScGeneConfig, ScGeneModel
from scgene.cli import main
from scgene.fileio import OUTPUT_MARKER
from scgene.prior.coexpression import read_edges
from scgene.prior.fusion import load_prior
from scgene.prior.gene2vec import load_word2vec_text
from scgene.tokenization_scgene import ScGeneTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pbmc_h5ad):
    """A tiny model and tokenizer over the 200 PBMC genes."""
    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer = ScGeneTokenizer.from_anndata(anndata.read_h5ad(pbmc_h5ad, backed="r"))
    tokenizer.save_pretrained(folder)
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32)
    ScGeneModel(config).save_pretrained(folder)
    return folder


def test_build_prior_end_to_end(checkpoint, pbmc_h5ad, knowledge_csv, tmp_path):
    out = tmp_path / "prior"
    args = ["build-prior", "--adata", str(pbmc_h5ad), "--knowledge", str(knowledge_csv), "--tokenizer", str(checkpoint),
            "--model", str(checkpoint), "--out", str(out), "--threshold", "0.3", "--gene2vec-dim", "12",
            "--text-cache", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER) == [
        "coexpression_edges.tsv", "gene2vec.txt", "gene_prior.safetensors", "model", "prior_record.json"
    ]
    edges = read_edges(out / "coexpression_edges.tsv")
    assert len(edges) > 100 and (edges.r.abs() >= 0.3).all()
    genes, vectors = load_word2vec_text(out / "gene2vec.txt")
    assert vectors.shape == (len(set(edges.gene_a) | set(edges.gene_b)), 12)

    prior = load_prior(out / "gene_prior.safetensors")
    tokenizer = ScGeneTokenizer.from_pretrained(checkpoint)
    assert prior.shape == (tokenizer.vocab_size, 16)
    np.testing.assert_array_equal(prior[:3], 0.0)
    in_knowledge = set(np.loadtxt(knowledge_csv, delimiter=",", skiprows=1, usecols=0, dtype=str, comments=None))
    for gene, token_id in zip(tokenizer.symbols[3:], range(3, tokenizer.vocab_size)):
        expected_zero = gene not in genes and gene not in in_knowledge
        assert (not prior[token_id].any()) == expected_zero, gene

    record = json.loads((out / "prior_record.json").read_text())
    assert record["coexpression"]["n_edges"] == len(edges) and record["coexpression"]["threshold"] == 0.3
    assert record["coverage"]["gene2vec"]["vocab_genes_covered"] == len(genes)
    assert record["coverage"]["knowledge"]["vocab_genes_covered"] == 30
    assert record["knowledge"]["pca_components"] == 16 and record["parameters"]["seed"] == 0
    assert set(record["outputs"]) == {"coexpression_edges.tsv", "gene2vec.txt", "gene_prior.safetensors"}

    model = ScGeneModel.from_pretrained(out / "model")
    np.testing.assert_array_equal(model.get_gene_prior().numpy(), prior)
    assert ScGeneTokenizer.from_pretrained(out / "model").vocab_size == tokenizer.vocab_size


def test_build_prior_node2vec_is_seeded(checkpoint, pbmc_h5ad, tmp_path):
    def build(folder, seed):
        args = ["build-prior", "--adata", str(pbmc_h5ad), "--tokenizer", str(checkpoint), "--no-knowledge",
                "--node2vec",
                "--walk-length", "6", "--walks-per-node", "3", "--hidden-size", "16", "--gene2vec-dim", "8",
                "--threshold", "0.3", "--sign", "positive", "--seed", str(seed), "--out", str(folder), "--no-progress"]
        assert main(args) == 0
        return load_prior(folder / "gene_prior.safetensors")

    first, again, other = build(tmp_path / "a", 0), build(tmp_path / "b", 0), build(tmp_path / "c", 1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(first[:, 8:], 0.0)  # gene2vec zero-padded to the hidden size
    record = json.loads((tmp_path / "a" / "prior_record.json").read_text())
    assert record["gene2vec"]["method"] == "node2vec" and record["coexpression"]["n_negative_edges"] == 0


def test_build_prior_needs_an_input(tmp_path):
    with pytest.raises(SystemExit, match="needs --adata"):
        main(["build-prior", "--out", str(tmp_path)])


def test_build_prior_checks_shapes_before_computing(checkpoint, pbmc_h5ad, tmp_path):
    with pytest.raises(SystemExit, match="--gene2vec-dim 200 exceeds the hidden size 16"):
        main(["build-prior", "--adata", str(pbmc_h5ad), "--hidden-size", "16", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="but the prior would be 26087 x 16"):
        main(["build-prior", "--adata", str(pbmc_h5ad), "--model", str(checkpoint), "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_build_prior_from_published_style_vectors(checkpoint, tmp_path):
    vectors = tmp_path / "gene2vec_dim_4.txt"  # headerless, tab after the gene, as the published Gene2vec files
    vectors.write_text("LYZ\t1 2 3 4\nS100A9\t0 0 1 0\nNOT_A_GENE\t9 9 9 9\n")
    out = tmp_path / "prior"
    assert main(["build-prior", "--gene2vec", str(vectors), "--no-knowledge", "--tokenizer", str(checkpoint),
                 "--hidden-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER) == ["gene_prior.safetensors", "prior_record.json"]
    prior = load_prior(out / "gene_prior.safetensors")
    lyz, s100a9 = ScGeneTokenizer.from_pretrained(checkpoint).convert_genes_to_ids(["LYZ", "S100A9"])
    np.testing.assert_array_equal(prior[lyz], [1, 2, 3, 4, 0, 0, 0, 0])
    assert np.count_nonzero(prior.any(axis=1)) == 2
    record = json.loads((out / "prior_record.json").read_text())
    assert record["coverage"]["gene2vec"]["examples_not_in_vocab"] == ["NOT_A_GENE"]
    assert len(record["sources"]["gene2vec"]["sha256"]) == 64


def gene2vec_only(adata, out, *extra):
    return ["build-prior", "--adata", str(adata), "--no-knowledge", "--hidden-size", "8", "--gene2vec-dim", "4",
            "--epochs", "2", "--threshold", "0.3", "--out", str(out), *extra]


def test_build_prior_shows_progress_bars(pbmc_h5ad, tmp_path, capfd):
    assert main(gene2vec_only(pbmc_h5ad, tmp_path / "prior")) == 0
    err = capfd.readouterr().err
    assert "co-expression" in err and "skip-gram epochs" in err and "100%" in err


def test_dense_on_disk_matrix_is_read_chunkwise(tmp_path):
    import tracemalloc

    import scipy.sparse as sp

    from scgene.commands.build_prior import _read_sparse_adata

    counts = sp.random(2000, 1000, density=0.03, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    dense = anndata.AnnData(X=counts.toarray())
    dense_path = tmp_path / "dense.h5ad"
    dense.write_h5ad(dense_path)
    dense_bytes = dense.X.nbytes
    del dense
    tracemalloc.start()
    try:
        read, hint = _read_sparse_adata(dense_path, dense_chunk_values=100 * 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sp.isspmatrix_csr(read.X) and (read.X != counts).nnz == 0 and hint == ""
    assert peak < dense_bytes / 2, (peak, dense_bytes)  # the cells x genes array never existed whole


def test_dense_and_sparse_h5ad_give_the_same_prior(pbmc_h5ad, tmp_path):
    sparse = anndata.read_h5ad(pbmc_h5ad)
    sparse.X = sparse.X.toarray()
    sparse.write_h5ad(tmp_path / "dense.h5ad")
    assert main(gene2vec_only(pbmc_h5ad, tmp_path / "from_sparse", "--no-progress")) == 0
    assert main(gene2vec_only(tmp_path / "dense.h5ad", tmp_path / "from_dense", "--no-progress")) == 0
    for name in ("coexpression_edges.tsv", "gene2vec.txt", "gene_prior.safetensors"):
        assert (tmp_path / "from_sparse" / name).read_bytes() == (tmp_path / "from_dense" / name).read_bytes()


def test_an_existing_prior_is_replaced_only_with_overwrite_and_whole(checkpoint, pbmc_h5ad, tmp_path):
    """A second run into the same --out needs --overwrite; it then replaces the folder whole: no file of the first
    run (the edge list it no longer makes) stays next to the new prior and record."""
    out = tmp_path / "prior"
    assert main(gene2vec_only(pbmc_h5ad, out, "--no-progress")) == 0
    first = {path.name: path.read_bytes() for path in out.iterdir()}
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("LYZ\t1 2 3 4\n")
    second = ["build-prior", "--gene2vec", str(vectors), "--no-knowledge", "--tokenizer", str(checkpoint),
              "--hidden-size", "8", "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit, match="exists; choose a new folder or pass --overwrite"):
        main(second)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == first
    assert main(second + ["--overwrite"]) == 0
    assert sorted(path.name for path in out.iterdir() if path.name != OUTPUT_MARKER) == ["gene_prior.safetensors", "prior_record.json"]
    record = json.loads((out / "prior_record.json").read_text())
    assert set(record["outputs"]) == {"gene_prior.safetensors"} and record["parameters"]["out"] == str(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prior", "vectors.txt"]  # no staging left


def test_a_failed_run_leaves_the_previous_prior_and_nothing_else(pbmc_h5ad, tmp_path):
    """Mouse-style genes against the human vocabulary: no vocabulary gene gets a prior, an error; the co-expression
    files already computed are not left behind, and the earlier prior stays as it was."""
    out = tmp_path / "prior"
    assert main(gene2vec_only(pbmc_h5ad, out, "--no-progress")) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    mouse = anndata.read_h5ad(pbmc_h5ad)
    mouse.var_names = [f"Mmgene{index}x" for index in range(mouse.n_vars)]  # names no human vocabulary has
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    with pytest.raises(SystemExit, match="None of the .* vocabulary genes got a prior.*mouse vocabulary"):
        main(gene2vec_only(tmp_path / "mouse.h5ad", out, "--no-progress", "--overwrite"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mouse.h5ad", "prior"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--threshold", "1.5"], r"--threshold/--sign: threshold must be in \(0, 1\]"),
        (["--max-cells", "1"], "--max-cells must be at least 2, got 1"),
        (["--walk-length", "1"], "--walk-length must be at least 2"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--gene2vec", "VECTORS"], "--adata and --gene2vec are alternatives"),
    ],
)
def test_bad_options_fail_before_any_work(pbmc_h5ad, tmp_path, extra, message):
    (tmp_path / "vectors.txt").write_text("LYZ 1 2\n")
    extra = [str(tmp_path / "vectors.txt") if e == "VECTORS" else e for e in extra]
    with pytest.raises(SystemExit, match=f"^scgene build-prior: error: {message}"):
        main(gene2vec_only(pbmc_h5ad, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_unknown_gene_column_are_named(pbmc_h5ad, tmp_path):
    with pytest.raises(SystemExit, match="--adata .*nope.h5ad: no such file"):
        main(gene2vec_only(tmp_path / "nope.h5ad", tmp_path / "out"))
    missing_table = ["build-prior", "--adata", str(pbmc_h5ad), "--knowledge", str(tmp_path / "k.xlsx"), "--out",
                     str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--knowledge .*k.xlsx: no such file"):
        main(missing_table)
    with pytest.raises(SystemExit, match=r"error: --gene-column 'symbol' is not a column .* Leave --gene-column unset"):
        main(gene2vec_only(pbmc_h5ad, tmp_path / "out", "--gene-column", "symbol"))
    assert not (tmp_path / "out").exists()


def test_bad_knowledge_table_fails_before_the_coexpression_step(pbmc_h5ad, knowledge_csv, tmp_path):
    bad = tmp_path / "knowledge.csv"
    bad.write_text(knowledge_csv.read_text().replace(",0,", ",2,", 1))
    before = bad.read_bytes()
    out = tmp_path / "out"
    args = ["build-prior", "--adata", str(pbmc_h5ad), "--knowledge", str(bad), "--hidden-size", "8",
            "--gene2vec-dim", "4", "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit, match=r"scgene build-prior: error: Column .* is numeric but not 0/1"):
        main(args)
    assert not out.exists() and bad.read_bytes() == before  # nothing computed or written; input untouched


def test_knowledge_of_the_data_genes_only(pbmc_h5ad, knowledge_csv, tmp_path):
    """--knowledge-genes adata embeds the knowledge of the genes the data measures (the default human vocabulary
    would otherwise mean 26k texts): a prior over the full vocabulary whose knowledge part covers only those genes."""
    cells = anndata.read_h5ad(pbmc_h5ad)
    half = cells[:, :100].copy()
    half.write_h5ad(tmp_path / "half.h5ad")
    out = tmp_path / "prior"
    assert main(["build-prior", "--adata", str(tmp_path / "half.h5ad"), "--knowledge", str(knowledge_csv),
                 "--knowledge-genes", "adata", "--out", str(out), "--hidden-size", "16", "--threshold", "0.3",
                 "--gene2vec-dim", "12", "--text-cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    in_knowledge = set(np.loadtxt(knowledge_csv, delimiter=",", skiprows=1, usecols=0, dtype=str, comments=None))
    expected = len(in_knowledge & set(half.var_names))
    assert 0 < expected < len(in_knowledge)
    record = json.loads((out / "prior_record.json").read_text())
    assert record["coverage"]["knowledge"]["vocab_genes_covered"] == expected
    assert load_prior(out / "gene_prior.safetensors").shape == (ScGeneTokenizer().vocab_size, 16)
    with pytest.raises(SystemExit, match="--knowledge-genes adata needs --adata"):
        main(["build-prior", "--gene2vec", str(out / "gene2vec.txt"), "--knowledge-genes", "adata",
              "--out", str(tmp_path / "x"), "--hidden-size", "16"])


def test_knowledge_only_prior_for_the_ablation(pbmc_h5ad, knowledge_csv, tmp_path):
    """--no-gene2vec: the knowledge term alone (no co-expression outputs); the rows are the fused prior's knowledge part."""
    out = tmp_path / "knowledge_only"
    assert main(["build-prior", "--adata", str(pbmc_h5ad), "--knowledge", str(knowledge_csv), "--no-gene2vec",
                 "--knowledge-genes", "adata", "--out", str(out), "--hidden-size", "16",
                 "--text-cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER) == ["gene_prior.safetensors", "prior_record.json"]
    record = json.loads((out / "prior_record.json").read_text())
    assert "gene2vec" not in record["coverage"] and record["coverage"]["knowledge"]["vocab_genes_covered"] > 0
    prior = load_prior(out / "gene_prior.safetensors")
    assert (np.abs(prior).sum(axis=1) > 0).sum() == record["coverage"]["knowledge"]["vocab_genes_covered"]
    with pytest.raises(SystemExit, match="nothing to fuse"):
        main(["build-prior", "--adata", str(pbmc_h5ad), "--no-gene2vec", "--no-knowledge", "--out", str(tmp_path / "x")])


def test_several_files_pool_their_edges_under_the_vocabulary_names(pbmc_h5ad, tmp_path):
    """Two files of the same genes, one named by symbols and one by Ensembl ids: each file's edges are computed on
    its own cells and pooled, under one name per gene, so gene2vec learns one word per gene."""
    cells = anndata.read_h5ad(pbmc_h5ad)
    tokenizer = ScGeneTokenizer()
    symbols_file, ensembl_file = tmp_path / "symbols.h5ad", tmp_path / "ensembl.h5ad"
    cells[:1300].write_h5ad(symbols_file)
    ensembl = cells[1300:].copy()
    mapping = tokenizer.map_genes(ensembl)
    ensembl_ids = tokenizer.convert_ids_to_genes(mapping.vocab_ids, "ensembl")
    ensembl_of = {gene: ensembl_ids[i] for gene, i in zip(ensembl.var_names, mapping.column_to_matched) if i >= 0}
    ensembl.var_names = [ensembl_of.get(gene, gene) for gene in ensembl.var_names]
    ensembl.write_h5ad(ensembl_file)

    def edges_of(*files):
        out = tmp_path / "_".join(path.stem for path in files)
        assert main(["build-prior", "--adata", *map(str, files), "--no-knowledge", "--hidden-size", "8",
                     "--gene2vec-dim", "4", "--epochs", "1", "--threshold", "0.3", "--out", str(out),
                     "--no-progress"]) == 0
        return out, read_edges(out / "coexpression_edges.tsv")

    out, pooled = edges_of(symbols_file, ensembl_file)
    _, first = edges_of(symbols_file)
    _, second = edges_of(ensembl_file)

    def vocabulary_symbols(adata):  # the name the pooled run gives each gene: its vocabulary symbol
        mapping = tokenizer.map_genes(adata)
        symbols = tokenizer.convert_ids_to_genes(mapping.vocab_ids)
        return {gene: symbols[i] for gene, i in zip(adata.var_names, mapping.column_to_matched) if i >= 0}

    for edges, adata in ((first, cells), (second, ensembl)):
        edges[["gene_a", "gene_b"]] = edges[["gene_a", "gene_b"]].replace(vocabulary_symbols(adata))
    expected = pd.concat([first, second], ignore_index=True)
    assert (first["gene_a"] == "CAVIN2").any()  # written SDPR (an alias) in the symbols file
    key = ["gene_a", "gene_b", "r"]
    pd.testing.assert_frame_equal(pooled.sort_values(key).reset_index(drop=True), expected.sort_values(key).reset_index(drop=True))
    words, _ = load_word2vec_text(out / "gene2vec.txt")
    assert not any(word.startswith("ENSG") for word in words) and len(words) == len(set(words))
    record = json.loads((out / "prior_record.json").read_text())
    assert [source["cells"] for source in record["sources"]["adata"]] == [1300, cells.n_obs - 1300]
    assert record["coexpression"]["n_edges"] == len(pooled) == sum(d["n_edges"] for d in record["coexpression"]["datasets"])
    with pytest.raises(SystemExit, match="--adata names a file twice"):
        main(["build-prior", "--adata", str(symbols_file), str(symbols_file), "--no-knowledge", "--out", str(tmp_path / "x")])


def test_a_mouse_vocabulary_gets_the_human_knowledge_through_orthologs(pbmc_h5ad, knowledge_csv, tmp_path):
    """Mouse cells (the PBMC genes renamed to their one-to-one mouse orthologs) with their own vocabulary: the human
    table gives them nothing, --orthologs mouse gives each translated gene its human ortholog's knowledge."""
    from scgene.prior.knowledge import read_orthologs

    orthologs = read_orthologs("mouse")
    human = anndata.read_h5ad(pbmc_h5ad)
    mouse = human[:, [gene in orthologs for gene in human.var_names]].copy()
    mouse.var_names = [orthologs[gene] for gene in mouse.var_names]
    mouse.write_h5ad(tmp_path / "mouse.h5ad")
    ScGeneTokenizer.from_anndata(mouse).save_pretrained(tmp_path / "vocab")
    args = ["build-prior", "--adata", str(tmp_path / "mouse.h5ad"), "--tokenizer", str(tmp_path / "vocab"),
            "--knowledge", str(knowledge_csv), "--no-gene2vec", "--hidden-size", "8", "--no-progress",
            "--text-cache", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="--orthologs mouse"):
        main(args + ["--out", str(tmp_path / "human_table")])
    assert main(args + ["--out", str(tmp_path / "prior"), "--orthologs", "mouse"]) == 0
    tokenizer = ScGeneTokenizer.from_pretrained(tmp_path / "vocab")
    prior = load_prior(tmp_path / "prior" / "gene_prior.safetensors")
    table_genes = {line.split(",")[0] for line in knowledge_csv.read_text().splitlines()[1:]}
    expected = {orthologs[gene] for gene in table_genes if gene in orthologs and orthologs[gene] in mouse.var_names}
    covered = {gene for gene in mouse.var_names if np.abs(prior[tokenizer.convert_genes_to_ids([gene])[0]]).sum() > 0}
    assert covered == expected and len(expected) > 10
    record = json.loads((tmp_path / "prior" / "prior_record.json").read_text())
    assert record["sources"]["orthologs"]["path"].endswith("human_mouse_ensembl105.csv.gz")


def test_a_terminated_run_leaves_the_previous_prior_and_no_staging_folder(pbmc_h5ad, tmp_path):
    """SIGTERM while gene2vec trains (slowed down), over an existing prior with --overwrite: the command stops with
    128 + SIGTERM, the old prior is unchanged, and no staging folder or moved-aside copy is left."""
    import signal
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "prior"
    assert main(gene2vec_only(pbmc_h5ad, out, "--no-progress")) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    slowed = textwrap.dedent(f"""
        import sys, time
        import scgene.prior.gene2vec as module
        def slow(*args, **kwargs):
            print("training", flush=True)
            time.sleep(60)
        module.gene2vec = slow
        from scgene.cli import main
        sys.exit(main({gene2vec_only(pbmc_h5ad, out, "--no-progress", "--overwrite")!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", slowed], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    while process.stdout.readline().strip() != "training":  # the co-expression files are staged by now
        assert process.poll() is None
    assert any(path.name.startswith(".prior.") for path in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["prior"]


def test_build_prior_reads_counts_from_a_layer_or_raw_and_names_them_next_to_a_log_x(checkpoint, pbmc_h5ad, tmp_path,
                                                                                    caplog):
    """X holds log1p(CPM) and the counts sit in layers['counts'] and .raw: without a flag the warning names both ways to
    read them; `--layer counts` and `--use-raw` build the co-expression from the counts (normalised here, not taken as
    log values), and `--use-raw` reads .raw's genes."""
    import logging

    import scanpy as sc

    counts = anndata.read_h5ad(pbmc_h5ad)
    logged = counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e6)
    sc.pp.log1p(logged)
    logged.layers["counts"] = counts.X.copy()
    logged.raw = counts
    path = tmp_path / "logged.h5ad"
    logged.write_h5ad(path)
    before = path.read_bytes()
    base = ["build-prior", "--adata", str(path), "--tokenizer", str(checkpoint), "--hidden-size", "16",
            "--no-knowledge", "--threshold", "0.3", "--gene2vec-dim", "8", "--no-progress"]
    with caplog.at_level(logging.WARNING):
        assert main([*base, "--out", str(tmp_path / "from_x")]) == 0
    about_log = [r.getMessage() for r in caplog.records if "log1p-normalised" in r.getMessage()]
    assert len(about_log) == 1 and "--layer counts" in about_log[0]  # one warning, naming the flag that reads counts
    records = {}
    for name, flags in {"from_x": [], "layer": ["--layer", "counts"], "raw": ["--use-raw"]}.items():
        if flags:
            assert main([*base, *flags, "--out", str(tmp_path / name)]) == 0
        record = json.loads((tmp_path / name / "prior_record.json").read_text())
        records[name] = record["sources"]["adata"][0]["preprocessing"]["input_was_log_normalized"]
    assert records == {"from_x": True, "layer": False, "raw": False}
    with pytest.raises(SystemExit, match="use_raw=True, not both|not both"):
        main([*base, "--layer", "counts", "--use-raw", "--out", str(tmp_path / "both")])
    assert path.read_bytes() == before and not (tmp_path / "both").exists()
