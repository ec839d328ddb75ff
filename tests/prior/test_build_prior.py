import json

import anndata
import numpy as np
import pytest

from scgene import ScGeneConfig, ScGeneModel
from scgene.cli import main
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
    assert sorted(p.name for p in out.iterdir()) == [
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
    with pytest.raises(SystemExit, match="but the prior would be 26067 x 16"):
        main(["build-prior", "--adata", str(pbmc_h5ad), "--model", str(checkpoint), "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_build_prior_from_published_style_vectors(checkpoint, tmp_path):
    vectors = tmp_path / "gene2vec_dim_4.txt"  # headerless, tab after the gene, as the published Gene2vec files
    vectors.write_text("LYZ\t1 2 3 4\nS100A9\t0 0 1 0\nNOT_A_GENE\t9 9 9 9\n")
    out = tmp_path / "prior"
    assert main(["build-prior", "--gene2vec", str(vectors), "--no-knowledge", "--tokenizer", str(checkpoint),
                 "--hidden-size", "8", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gene_prior.safetensors", "prior_record.json"]
    prior = load_prior(out / "gene_prior.safetensors")
    lyz, s100a9 = ScGeneTokenizer.from_pretrained(checkpoint).convert_genes_to_ids(["LYZ", "S100A9"])
    np.testing.assert_array_equal(prior[lyz], [1, 2, 3, 4, 0, 0, 0, 0])
    assert np.count_nonzero(prior.any(axis=1)) == 2
    record = json.loads((out / "prior_record.json").read_text())
    assert record["coverage"]["gene2vec"]["examples_not_in_vocab"] == ["NOT_A_GENE"]
    assert len(record["sources"]["gene2vec"]["sha256"]) == 64
