"""Conversion of the three original ScGene models (seed 000) to HF checkpoints, with parity and clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scgene.cli import main as scgene_main
from scgene.commands import convert as convert_command
from scgene.conversion import PARITY_CELLS, PARITY_TOLERANCE, ConversionError, convert
from scgene.conversion.original import ScBaseModel, ScBaseModelClassification, ScBaseModelCluster
from scgene.conversion.original_to_hf import infer_sizes, load_checkpoint, read_gene_embedding
from scgene.conversion.parity import memory_efficient_reference, parity_inputs, reference_outputs

NUM_GENES, HIDDEN, LAYERS, HEADS, FFN = 12, 16, 2, 4, 32
CLASSIFIER_HIDDEN, NUM_CLASSES = 8, 5
GENES = [f"ENSG{index:011d}" for index in range(1, NUM_GENES + 1)]
HF_CLASSES = {
    "pretraining": "ScGeneForMaskedExpression",
    "classifier": "ScGeneForCellClassification",
    "cluster": "ScGeneModel",
}


def make_original(kind: str) -> torch.nn.Module:
    """A tiny original model with non-trivial weights (larger than the default init, so errors would show)."""
    torch.manual_seed({"pretraining": 0, "classifier": 1, "cluster": 2}[kind])
    common = dict(feature_dim=HIDDEN, num_layers=LAYERS, num_heads=HEADS, dim_feedforward=FFN)
    if kind == "classifier":
        model = ScBaseModelClassification(NUM_GENES, num_classes=NUM_CLASSES, hidden_dim=CLASSIFIER_HIDDEN, **common)
    else:
        model = (ScBaseModel if kind == "pretraining" else ScBaseModelCluster)(**common)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model.eval()


def gene_embedding(seed: int = 0) -> torch.Tensor:
    return torch.randn(NUM_GENES, HIDDEN, generator=torch.Generator().manual_seed(seed))


def write_inputs(directory, kind: str, layout: str, embedding_format: str):
    """Save an original checkpoint (in `layout`), its gene embedding and the gene list; return their paths."""
    model = make_original(kind)
    state_dict = model.state_dict()
    if layout == "bare":
        payload = state_dict
    elif layout == "nested_with_config":
        payload = {"state_dict": state_dict, "config": {"nhead": HEADS, "feature_dim": HIDDEN}, "epoch": 3}
    else:  # saved from DataParallel, under "model_state_dict"
        payload = {"model_state_dict": {f"module.{key}": value for key, value in state_dict.items()}}
    checkpoint = directory / f"{kind}.pt"
    torch.save(payload, checkpoint)
    embedding = gene_embedding()
    prior = directory / f"prior.{embedding_format}"
    if embedding_format == "npy":
        np.save(prior, embedding.numpy())
    elif embedding_format == "pt":
        torch.save(embedding, prior)
    else:
        save_file({"gene_embedding": embedding}, prior)
    genes = directory / "genes.txt"
    genes.write_text("\n".join(GENES) + "\n")
    return model, checkpoint, prior, genes


# kind -> (checkpoint layout, gene embedding format): every layout and format is exercised once
CASES = {
    "pretraining": ("bare", "npy"),
    "classifier": ("nested_with_config", "pt"),
    "cluster": ("data_parallel", "safetensors"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the three original models once; kind -> (original model, result, output dir)."""
    results = {}
    for kind, (layout, embedding_format) in CASES.items():
        directory = tmp_path_factory.mktemp(kind)
        model, checkpoint, prior, genes = write_inputs(directory, kind, layout, embedding_format)
        num_heads = None if layout == "nested_with_config" else HEADS
        result = convert(checkpoint, prior, directory / "hf", genes=genes, num_heads=num_heads)
        results[kind] = (model, result, directory / "hf")
    return results


@pytest.mark.parametrize("kind", list(CASES))
def test_reference_models_have_the_original_keys_and_shapes(kind):
    model = make_original(kind)
    keys = set(model.state_dict())
    assert "linear_in.weight" in keys and "transformer_encoder.layers.1.self_attn.in_proj_weight" in keys
    assert ("linear_out.weight" in keys) == (kind != "cluster")
    assert ("cls_decoder.3.weight" in keys) == (kind == "classifier")
    x, embedding = parity_inputs(NUM_GENES, num_cells=3), gene_embedding()
    expected_shape = {"pretraining": (3, NUM_GENES), "classifier": (3, NUM_CLASSES), "cluster": (3, NUM_GENES, HIDDEN)}
    with torch.no_grad():
        assert tuple(model(x, embedding).shape) == expected_shape[kind]
        torch.testing.assert_close(model.layer_outputs(x, embedding)[-1], model.encode(x, embedding))
    assert infer_sizes(model.state_dict()).kind == kind


@pytest.mark.parametrize("kind", list(CASES))
def test_reference_models_are_pytorch_defaults_as_seed_000_describes(kind):
    """Batch-first post-LN ReLU encoder layers, no final norm; the classifier's MLP over a frozen backbone."""
    model = make_original(kind)
    encoder = model.transformer_encoder
    assert isinstance(encoder, torch.nn.TransformerEncoder) and encoder.norm is None and len(encoder.layers) == LAYERS
    for layer in encoder.layers:
        assert isinstance(layer, torch.nn.TransformerEncoderLayer)
        assert layer.self_attn.batch_first and not layer.norm_first
        assert layer.activation is torch.nn.functional.relu and layer.norm1.eps == 1e-5
    assert (model.linear_in.in_features, model.linear_in.out_features) == (1, HIDDEN)
    if kind != "cluster":
        assert (model.linear_out.in_features, model.linear_out.out_features) == (HIDDEN, 1)
    if kind == "classifier":
        assert [type(module) for module in model.cls_decoder] == [
            torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear
        ]
        assert model.cls_decoder[0].in_features == NUM_GENES and model.cls_decoder[3].out_features == NUM_CLASSES
        trainable = {name.split(".")[0] for name, parameter in model.named_parameters() if parameter.requires_grad}
        assert trainable == {"cls_decoder"}
    # the encoder adds the gene embedding to linear_in(x.unsqueeze(-1)), like a positional encoding
    x, embedding = parity_inputs(NUM_GENES, num_cells=2), gene_embedding()
    with torch.no_grad():
        outputs = reference_outputs(model, x, embedding)
        torch.testing.assert_close(outputs["embeddings"], model.linear_in(x.unsqueeze(-1)) + embedding)
        torch.testing.assert_close(outputs["hidden states"], model.encode(x, embedding))


@pytest.mark.parametrize("kind", list(CASES))
def test_reference_fast_path_gives_the_same_numbers(kind):
    """The parity check runs the original on PyTorch's standard path (memory-efficient attention); in eval mode
    without grad the original's users get the fast path: both agree far inside the tolerance."""
    model, embedding = make_original(kind), gene_embedding()
    x = parity_inputs(NUM_GENES, num_cells=6)
    enabled = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        fast = model(x, embedding)
        with memory_efficient_reference():
            assert not torch.backends.mha.get_fastpath_enabled()
            standard = model(x, embedding)
    assert torch.backends.mha.get_fastpath_enabled() == enabled
    assert (fast - standard).abs().max().item() <= PARITY_TOLERANCE / 10


def test_parity_inputs_look_like_the_originals_x():
    """Fixed, log1p of counts normalised to 1e4, varied depth, and with the two extreme cells at the end."""
    x = parity_inputs(2000, num_cells=8)
    torch.testing.assert_close(x, parity_inputs(2000, num_cells=8), rtol=0, atol=0)
    assert x.shape == (8, 2000) and x.dtype == torch.float32 and bool((x >= 0).all())
    normalised = torch.expm1(x[:-2].double()).sum(dim=1)
    torch.testing.assert_close(normalised, torch.full((6,), 1e4, dtype=torch.float64), rtol=1e-4, atol=0)
    nonzero = (x[:-2] > 0).float().mean(dim=1)
    assert nonzero[0] < 0.1 and nonzero[-1] > 0.3 and bool((nonzero.diff() > 0).all())  # shallow to deep cells
    assert bool((x[-2] == 0).all())  # an empty cell
    assert (x[-1] > 0).sum() == 1 and x[-1].max().item() == pytest.approx(np.log1p(1e4))  # one counted gene


@pytest.mark.parametrize("kind", list(CASES))
def test_conversion_reproduces_the_original(converted, kind):
    _, result, out_dir = converted[kind]
    assert result.kind == kind
    final = "logits" if kind == "classifier" else "predictions" if kind == "pretraining" else "hidden states"
    assert {"embeddings", "layer 1", "layer 2", "hidden states", final} == set(result.parity)
    assert max(result.parity.values()) <= PARITY_TOLERANCE

    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == [HF_CLASSES[kind]]
    assert config["vocab_size"] == 3 + NUM_GENES and config["num_attention_heads"] == HEADS
    assert (config["encoder_type"], config["norm_position"], config["hidden_act"]) == ("standard", "post", "relu")
    if kind == "classifier":
        assert config["classifier_pooling"] == "gene_projection" and config["num_panel_genes"] == NUM_GENES
        assert len(config["id2label"]) == NUM_CLASSES and config["freeze_backbone"] is True
    assert (out_dir / "model.safetensors").exists()

    assert (result.parity_cells, result.num_genes) == (PARITY_CELLS, NUM_GENES)
    card = (out_dir / "README.md").read_text()
    assert f"`{kind}.pt`" in card and "## Parity" in card and final in card
    assert f"{PARITY_CELLS} cells x all {NUM_GENES} panel genes" in card
    for name, diff in result.parity.items():
        assert f"| {name} | {diff:.3e} |" in card
    assert not [path for path in out_dir.parent.iterdir() if path.name.startswith(".hf.")]  # no staging left over


def test_saved_tokenizer_makes_the_original_inputs(converted):
    """The user path of the model card: raw counts -> saved tokenizer -> converted model == original on log1p x."""
    import anndata

    from scgene import ScGeneForMaskedExpression, ScGeneTokenizer

    original, _, out_dir = converted["pretraining"]
    counts = np.random.default_rng(0).poisson(2.0, size=(3, NUM_GENES)).astype(np.float32)
    adata = anndata.AnnData(counts)
    adata.var_names = GENES
    batch = ScGeneTokenizer.from_pretrained(out_dir)(adata, return_tensors="pt")
    assert batch["input_ids"].tolist() == [list(range(3, 3 + NUM_GENES))] * 3
    model = ScGeneForMaskedExpression.from_pretrained(out_dir).eval()
    x = torch.from_numpy(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4))
    with torch.no_grad():
        got, expected = model(**batch).predicted_values, original(x, gene_embedding())
    assert (got - expected).abs().max().item() <= PARITY_TOLERANCE


def test_tokenizer_target_sum_is_the_one_given(tmp_path, capsys):
    """The seed's `sc.pp.normalize_total` names no target: `--target-sum` sets the panel tokenizer's."""
    from scgene import ScGeneTokenizer

    _, checkpoint, prior, genes = write_inputs(tmp_path, "cluster", "bare", "npy")
    args = ["--checkpoint", str(checkpoint), "--gene-embedding", str(prior), "--genes", str(genes)]
    assert cli_main([*args, "--out", str(tmp_path / "hf"), "--num-heads", str(HEADS), "--target-sum", "5000"]) == 0
    assert ScGeneTokenizer.from_pretrained(tmp_path / "hf").target_sum == 5000
    assert "normalises each cell to 5000 counts" in (tmp_path / "hf" / "README.md").read_text()
    assert cli_main([*args, "--out", str(tmp_path / "bad"), "--num-heads", str(HEADS), "--target-sum", "0"]) == 1
    assert "Cannot build the panel tokenizer: target_sum must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_reload_in_a_fresh_process(converted, tmp_path):
    """Each converted checkpoint, loaded by a new interpreter with its tokenizer, gives the original's outputs."""
    x = parity_inputs(NUM_GENES, num_cells=3, seed=7)
    np.save(tmp_path / "x.npy", x.numpy())
    dirs = {kind: str(out_dir) for kind, (_, _, out_dir) in converted.items()}
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, torch
        import scgene
        from scgene.tokenization_scgene import ScGeneTokenizer

        dirs, genes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        for kind, path in dirs.items():
            model = getattr(scgene, {HF_CLASSES!r}[kind]).from_pretrained(path).eval()
            ids = ScGeneTokenizer.from_pretrained(path).convert_genes_to_ids(genes)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids] * len(x)), expression_values=x)
            value = {{"pretraining": "predicted_values", "classifier": "logits", "cluster": "last_hidden_state"}}[kind]
            np.save({str(tmp_path)!r} + f"/{{kind}}.npy", getattr(out, value).numpy())
        """
    )
    subprocess.run(
        [sys.executable, "-c", script, json.dumps(dirs), json.dumps(GENES)], check=True, timeout=300
    )
    for kind, (original, _, _) in converted.items():
        with torch.no_grad():
            expected = original(x, gene_embedding())
        got = torch.from_numpy(np.load(tmp_path / f"{kind}.npy"))
        assert (expected - got).abs().max().item() <= PARITY_TOLERANCE, kind


def test_wrong_shape_is_named(tmp_path):
    model, checkpoint, prior, genes = write_inputs(tmp_path, "pretraining", "bare", "npy")
    state_dict = model.state_dict()
    state_dict["transformer_encoder.layers.1.norm1.weight"] = torch.ones(HIDDEN + 1)
    torch.save(state_dict, checkpoint)
    with pytest.raises(ConversionError, match=r"(?s)Shape mismatch.*layers\.1\.norm1\.weight.*\(17,\).*\(16,\)"):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=HEADS)
    assert not (tmp_path / "hf").exists()


def test_missing_key_is_named_as_in_the_checkpoint(tmp_path):
    model, checkpoint, prior, genes = write_inputs(tmp_path, "classifier", "bare", "npy")
    state_dict = model.state_dict()
    del state_dict["cls_decoder.3.bias"], state_dict["transformer_encoder.layers.1.linear2.bias"]
    torch.save(state_dict, checkpoint)
    missing = r"Missing keys .*scBaseModel_classification.*\['cls_decoder\.3\.bias', 'transformer_encoder\.layers\.1\."
    with pytest.raises(ConversionError, match=missing):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=HEADS)


def test_checkpoint_prefixes_are_stripped(tmp_path):
    """`module.` (DataParallel), `model.` (a Lightning module attribute) or both, in front of every key."""
    state_dict = make_original("cluster").state_dict()
    for prefix in ("module.", "model.", "model.module."):
        torch.save({"state_dict": {prefix + key: value for key, value in state_dict.items()}}, tmp_path / "c.pt")
        loaded, _ = load_checkpoint(tmp_path / "c.pt")
        assert sorted(loaded) == sorted(state_dict), prefix


def test_gene_embedding_saved_as_the_batched_forward_input(tmp_path):
    """The original's forward takes `gene_embedding` as (batch, input_dim, feature_dim): one matrix repeated."""
    embedding = gene_embedding()
    torch.save(embedding.expand(4, -1, -1).clone(), tmp_path / "batched.pt")
    torch.testing.assert_close(read_gene_embedding(tmp_path / "batched.pt"), embedding, rtol=0, atol=0)
    varying = embedding.expand(2, -1, -1).clone()
    varying[1, 0, 0] += 1.0
    torch.save(varying, tmp_path / "varying.pt")
    with pytest.raises(ConversionError, match="differs between the cells"):
        read_gene_embedding(tmp_path / "varying.pt")


def test_gene_embedding_of_the_wrong_size_is_refused(tmp_path):
    _, checkpoint, _, genes = write_inputs(tmp_path, "classifier", "bare", "npy")
    np.save(tmp_path / "short.npy", np.zeros((NUM_GENES - 1, HIDDEN), dtype=np.float32))
    with pytest.raises(ConversionError, match="11 genes but the classifier's cls_decoder.0 reads input_dim=12"):
        convert(checkpoint, tmp_path / "short.npy", tmp_path / "hf", genes=genes, num_heads=HEADS)
    (tmp_path / "genes.txt").write_text("\n".join(GENES[:-1]))
    with pytest.raises(ConversionError, match="gene list has 11 genes but the gene embedding has 12 rows"):
        convert(checkpoint, tmp_path / "prior.npy", tmp_path / "hf", genes=genes, num_heads=HEADS)


def test_unknown_key_is_named(tmp_path):
    model, checkpoint, prior, genes = write_inputs(tmp_path, "cluster", "bare", "npy")
    state_dict = model.state_dict()
    state_dict["transformer_encoder.norm.weight"] = torch.ones(HIDDEN)
    torch.save(state_dict, checkpoint)
    unknown = r"Unexpected keys .*scBaseModel_cluster.*transformer_encoder\.norm\.weight"
    with pytest.raises(ConversionError, match=unknown):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=HEADS)
    assert not (tmp_path / "hf").exists()


def test_num_heads_is_asked_for_only_when_it_cannot_be_inferred(tmp_path):
    _, checkpoint, prior, genes = write_inputs(tmp_path, "pretraining", "bare", "npy")
    with pytest.raises(ConversionError, match="Cannot infer the number of attention heads.*Pass --num-heads"):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes)
    with pytest.raises(ConversionError, match="positive divisor of feature_dim=16"):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=3)
    _, checkpoint, prior, genes = write_inputs(tmp_path, "pretraining", "nested_with_config", "npy")
    with pytest.raises(ConversionError, match="contradicts the checkpoint's stored config"):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=2)


def test_unsafe_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "module.pt"
    torch.save(make_original("cluster"), checkpoint)  # a pickled nn.Module, not a state_dict
    with pytest.raises(ConversionError, match=r"(?s)weights_only=True.*Unsupported global.*re-save it"):
        convert(checkpoint, tmp_path / "prior.npy", tmp_path / "hf", num_heads=HEADS)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", "truncated"])
def test_corrupt_checkpoint_is_named(tmp_path, content):
    checkpoint = tmp_path / "original.pt"
    torch.save(make_original("cluster").state_dict(), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:300] if content == "truncated" else content)
    with pytest.raises(ConversionError, match=r"Cannot read .*original.pt with torch.load .*complete file written by "
                                              r"torch.save"):
        convert(checkpoint, tmp_path / "prior.npy", tmp_path / "hf", num_heads=HEADS)


def test_failed_parity_writes_nothing_and_existing_output_is_kept(tmp_path):
    _, checkpoint, prior, genes = write_inputs(tmp_path, "pretraining", "bare", "npy")
    with pytest.raises(ConversionError, match="does not reproduce the original"):
        convert(checkpoint, prior, tmp_path / "hf", num_heads=HEADS, tolerance=-1.0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["genes.txt", "pretraining.pt", "prior.npy"]
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(checkpoint, prior, tmp_path / "hf", genes=genes, num_heads=HEADS)


def cli_main(argv: list[str]) -> int:
    """`scgene convert ...` through the real `scgene` command line."""
    return scgene_main(["convert", *argv])


def test_command_and_script_print_the_parity_report(tmp_path, capsys):
    _, checkpoint, prior, _ = write_inputs(tmp_path, "cluster", "bare", "npy")
    args = ["--checkpoint", str(checkpoint), "--gene-embedding", str(prior), "--out", str(tmp_path / "hf")]
    assert cli_main(args) == 1
    assert "Pass --num-heads" in capsys.readouterr().err
    assert cli_main(args + ["--num-heads", str(HEADS), "--parity-cells", "5"]) == 0
    report = capsys.readouterr().out
    assert "max abs diff" in report and "hidden states" in report and "FAIL" not in report
    assert f"5 fixed cells x all {NUM_GENES} panel genes" in report
    assert not [path for path in (tmp_path / "hf").iterdir() if "tokenizer" in path.name]  # no gene list, no tokenizer
    script = Path(__file__).parents[1] / "conversion" / "convert_scgene_original_to_hf.py"
    run = subprocess.run(
        [sys.executable, str(script), *args, "--num-heads", str(HEADS), "--overwrite"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "hidden states" in run.stdout and f"{PARITY_CELLS} fixed cells" in run.stdout


def test_parity_cells_default_is_the_one_in_the_help():
    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    assert f"default {PARITY_CELLS}," in parser.format_help()
