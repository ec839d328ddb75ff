import numpy as np
import pytest
import torch

from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneModel
from scgene.prior.fusion import align_to_vocab, fuse_prior, load_prior, save_prior
from scgene.tokenization_scgene import ScGeneTokenizer

GENES = ["TP53", "MYC", "CD3E", "LYZ", "GAPDH"]


@pytest.fixture(scope="module")
def tokenizer():
    return ScGeneTokenizer.from_gene_list(GENES)


def test_fusion_shapes_padding_and_missing_gene_zeros(tokenizer):
    g2v_genes = ["TP53", "ENSG00000198851.10", "NOT_A_GENE"]  # CD3E by versioned Ensembl id
    g2v = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    know_genes = ["MYC", "TP53", "LYZ"]
    know = np.full((3, 8), 0.5, dtype=np.float32) * np.array([[1], [2], [3]], dtype=np.float32)
    prior, report = fuse_prior(tokenizer, 8, gene2vec=(g2v_genes, g2v), knowledge=(know_genes, know, None))
    ids = dict(zip(GENES, tokenizer.convert_genes_to_ids(GENES)))
    assert prior.shape == (tokenizer.vocab_size, 8) == (8, 8) and prior.dtype == np.float32
    np.testing.assert_array_equal(prior[:3], 0.0)  # <pad>, <cls>, <mask>
    np.testing.assert_array_equal(prior[ids["TP53"]], np.r_[g2v[0], np.zeros(4)] + know[1])
    np.testing.assert_array_equal(prior[ids["CD3E"]], np.r_[g2v[1], np.zeros(4)])  # no knowledge row: zeros
    np.testing.assert_array_equal(prior[ids["MYC"]], know[0])  # no gene2vec vector: zeros
    np.testing.assert_array_equal(prior[ids["GAPDH"]], 0.0)  # in neither source
    assert report["gene2vec"]["source_genes_not_in_vocab"] == 1
    assert report["gene2vec"]["examples_not_in_vocab"] == ["NOT_A_GENE"]
    assert report["gene2vec"]["vocab_genes_covered"] == 2 and report["gene2vec"]["vocab_genes_zero"] == 3
    assert report["knowledge"]["vocab_genes_covered"] == 3 and report["knowledge"]["vocab_genes_zero"] == 2
    assert report["vocab_genes_with_any_prior"] == 4 and report["vocab_genes_all_zero"] == 1


def test_alignment_uses_ensembl_column_then_aliases():
    tokenizer = ScGeneTokenizer()  # default vocabulary, with aliases
    vectors = np.eye(3, dtype=np.float32)
    aligned, filled, report = align_to_vocab(tokenizer, ["P53", "MYC", "PINX1"], vectors, ["", "", "ENSG00000254093"])
    tp53, myc, pinx1 = tokenizer.convert_genes_to_ids(["TP53", "MYC", "ENSG00000254093"])
    np.testing.assert_array_equal(aligned[[tp53, myc, pinx1]], vectors)
    assert report["matched_by_alias"] == 1 and filled.sum() == 3
    # PINX1 is a symbol of two vocabulary genes; its Ensembl id picked exactly one
    assert tokenizer.symbols.count("PINX1") == 2


def test_errors_name_the_problem(tokenizer):
    with pytest.raises(ValueError, match="more than hidden_size=8"):
        fuse_prior(tokenizer, 8, gene2vec=(["TP53"], np.ones((1, 16), dtype=np.float32)))
    with pytest.raises(ValueError, match="expected 8"):
        fuse_prior(tokenizer, 8, knowledge=(["TP53"], np.ones((1, 4), dtype=np.float32), None))
    with pytest.raises(ValueError, match="Nothing to fuse"):
        fuse_prior(tokenizer, 8)


def test_fused_prior_round_trips_through_a_saved_model(tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    prior, _ = fuse_prior(tokenizer, 8, gene2vec=(GENES, rng.normal(size=(5, 4)).astype(np.float32)))
    save_prior(tmp_path / "gene_prior.safetensors", prior)
    loaded = load_prior(tmp_path / "gene_prior.safetensors")
    np.testing.assert_array_equal(loaded, prior)

    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16)
    for model_class in (ScGeneModel, ScGeneForMaskedExpression):
        model = model_class(config)
        model.set_gene_prior(loaded)
        model.save_pretrained(tmp_path / model_class.__name__)
        back = model_class.from_pretrained(tmp_path / model_class.__name__)
        buffer = back.get_gene_prior()
        assert not buffer.requires_grad
        torch.testing.assert_close(buffer, torch.from_numpy(prior))


def test_report_compares_the_scales_of_the_two_terms(tokenizer):
    g2v = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)
    know = np.ones((1, 4), dtype=np.float32)
    _, report = fuse_prior(tokenizer, 4, gene2vec=(["TP53", "MYC"], g2v), knowledge=(["LYZ"], know, None))
    assert report["gene2vec"]["mean_row_norm"] == pytest.approx(3.0)
    assert report["knowledge"]["mean_row_norm"] == pytest.approx(2.0)
