"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) on the three ScGene classes.

The tests come from the source distribution of the installed transformers version (`tests/fetch_transformers_tests.py`,
run by `make test`), so a new transformers release is checked against its own contract. They run in four
configurations: the standard and the dual-branch encoder, each with multi-head and multi-head latent attention.
Every skip below names its reason.
"""

import importlib
import logging
import os
import sys
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file
from transformers.models.auto import modeling_auto

from fetch_transformers_tests import PACKAGE, tests_folder
from modeling_helpers import N_BINS, VOCAB_SIZE, random_cells, tiny_config, with_prior
from scgene import ScGeneConfig, ScGeneForCellClassification, ScGeneForMaskedExpression, ScGeneModel

FOLDER = tests_folder()
if not (FOLDER / PACKAGE).is_dir():
    raise RuntimeError(f"transformers' common tests are not at {FOLDER}: run `make test` (or "
                       f"`{sys.executable} tests/fetch_transformers_tests.py`) to fetch them.")
sys.path.insert(0, str(FOLDER))
ModelTesterMixin = importlib.import_module(f"{PACKAGE}.test_modeling_common").ModelTesterMixin
ConfigTester = importlib.import_module(f"{PACKAGE}.test_configuration_common").ConfigTester

pytestmark = pytest.mark.xdist_group("transformers_common")


class ScGeneModelTester:
    """Tiny configs and random cells in the shapes the common tests read (`batch_size`, `seq_length`, ...)."""

    def __init__(self, parent, batch_size=3, seq_length=9, is_training=True, **config_overrides):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length  # <cls> + 8 genes
        self.is_training = is_training
        self.config_overrides = config_overrides
        config = self.get_config()
        self.vocab_size = VOCAB_SIZE
        self.hidden_size = config.hidden_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_attention_heads = config.num_attention_heads
        self.num_labels = 3

    def get_config(self) -> ScGeneConfig:
        return tiny_config(num_labels=3, **self.config_overrides)

    def prepare_config_and_inputs_for_common(self):
        inputs = random_cells(self.batch_size, self.seq_length - 1, seed=0)
        inputs["attention_mask"][-1, -2:] = 0  # one padded cell
        if self.get_config().expression_encoding != "binned":
            inputs.pop("expression_bins")
        return self.get_config(), inputs


class ScGeneCommonTests(ModelTesterMixin):
    all_model_classes = (ScGeneModel, ScGeneForMaskedExpression, ScGeneForCellClassification)
    additional_model_inputs = ["expression_values", "expression_bins"]  # beside input_ids, in every forward
    config_overrides: dict = {}
    test_resize_embeddings = False  # the vocabulary is the prior's rows: resizing would detach ids from genes
    test_pruning = False
    test_torchscript = False
    test_head_masking = False
    is_encoder_decoder = False
    has_attentions = True

    @classmethod
    def setUpClass(cls):
        # transformers skips base models (no loss) by their name in MODEL_MAPPING_NAMES, which lists in-tree models
        # only; ScGeneModel is the base model AutoModel.register(ScGeneConfig, ...) maps to
        cls.enterClassContext(mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {"scgene": "ScGeneModel"}))

    def setUp(self):
        self.model_tester = ScGeneModelTester(self, **self.config_overrides)
        self.config_tester = ConfigTester(self, config_class=ScGeneConfig, hidden_size=32, num_attention_heads=4,
                                          num_hidden_layers=2, vocab_size=VOCAB_SIZE, n_bins=N_BINS)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """The common inputs, with the labels each ScGene head trains on (transformers' mappings know no ScGene)."""
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels and model_class is ScGeneForCellClassification:
            inputs["labels"] = torch.arange(len(inputs["input_ids"])) % self.model_tester.num_labels
        elif return_labels and model_class is ScGeneForMaskedExpression:
            labels = torch.full(inputs["input_ids"].shape, -100.0)
            labels[:, 1:4] = inputs["expression_values"][:, 1:4]  # three masked genes per cell
            inputs["labels"] = labels
            if "expression_bins" in inputs:
                bin_labels = torch.full(inputs["input_ids"].shape, -100)
                bin_labels[:, 1:4] = inputs["expression_bins"][:, 1:4]
                inputs["bin_labels"] = bin_labels
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_weights_reload_no_missing_tied_weights(self):
        """Replaces the common test, which loads a file without any weights and expects every key reported missing.
        ScGene's choice: a checkpoint without the prior gene embedding is refused, not loaded with zeros."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with tempfile.TemporaryDirectory() as folder:
                model_class(config).save_pretrained(folder)
                save_file({"tensor": torch.tensor([1, 2])}, os.path.join(folder, "model.safetensors"),
                          metadata={"format": "pt"})
                with pytest.raises(ValueError, match="no prior gene embedding"):
                    model_class.from_pretrained(folder)


# Mean pooling: the common tests pad on the left and draw random ids, so no <cls> token sits at position 0, which
# pooling="cls" refuses (tests/test_modeling_scgene.py covers it).
class TestStandardMHA(ScGeneCommonTests, unittest.TestCase):
    config_overrides = {"encoder_type": "standard", "attention_type": "mha", "pooling": "mean"}


class TestStandardMLA(ScGeneCommonTests, unittest.TestCase):
    config_overrides = {"encoder_type": "standard", "attention_type": "mla", "pooling": "weighted_mean",
                        "norm_position": "pre"}


class TestDualBranchMHA(ScGeneCommonTests, unittest.TestCase):
    config_overrides = {"encoder_type": "dual_branch", "attention_type": "mha", "pooling": "mean"}


class TestDualBranchMLA(ScGeneCommonTests, unittest.TestCase):
    config_overrides = {"encoder_type": "dual_branch", "attention_type": "mla", "expression_encoding": "binned",
                        "pooling": "weighted_mean", "norm_position": "pre"}


# ScGene's own checks of the same contract, where the stand-ins above leave transformers' tests out or the common
# tests cannot see a ScGene choice.

DESIGNS = [dict(tests.config_overrides) for tests in
           (TestStandardMHA, TestStandardMLA, TestDualBranchMHA, TestDualBranchMLA)]


def traced_inputs(config, batch_size, num_genes, seed):
    cells = random_cells(batch_size, num_genes, seed=seed)
    cells["attention_mask"][-1, -2:] = 0  # one padded cell
    if config.expression_encoding != "binned":
        cells.pop("expression_bins")
    return cells


@pytest.mark.parametrize("design", DESIGNS, ids=lambda design: f"{design['encoder_type']}-{design['attention_type']}")
def test_torch_export_with_dynamic_cells_and_genes_matches_eager(design):
    """`torch.export` of every class traces one graph for any number of cells and genes (no data-dependent Python
    branch in forward), and the exported program gives eager's numbers on a batch of another shape."""
    config = tiny_config(num_labels=3, **design)
    for model_class in (ScGeneModel, ScGeneForMaskedExpression, ScGeneForCellClassification):
        model = with_prior(model_class(config)).eval()
        example = traced_inputs(config, 3, 8, seed=1)
        cells, genes = torch.export.Dim("cells", min=2), torch.export.Dim("genes", min=2)
        exported = torch.export.export(model, (), kwargs=example, strict=False,
                                       dynamic_shapes={name: {0: cells, 1: genes} for name in example})
        other = traced_inputs(config, 5, 11, seed=2)
        with torch.no_grad():
            expected, got = model(**other).to_tuple(), exported.module()(**other)
        got = got.to_tuple() if hasattr(got, "to_tuple") else got
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("design", DESIGNS[::3], ids=lambda design: design["encoder_type"])
def test_torch_compile_fullgraph_matches_eager(design):
    torch._dynamo.reset()
    config = tiny_config(**design)
    model = with_prior(ScGeneModel(config)).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for seed, (batch_size, num_genes) in enumerate([(3, 8), (5, 11)]):
        cells = traced_inputs(config, batch_size, num_genes, seed)
        with torch.no_grad():
            torch.testing.assert_close(compiled(**cells).pooler_output, model(**cells).pooler_output,
                                       rtol=1e-5, atol=1e-6)


def test_traced_graph_keeps_the_value_checks_of_eager():
    """Eager mode still names bad values; the checks are compiler hints, not removed."""
    config = tiny_config(**DESIGNS[0])
    model = ScGeneModel(config).eval()
    cells = traced_inputs(config, 2, 5, seed=0)
    cells["input_ids"][0, 2] = VOCAB_SIZE
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, 40\)"):
        model(**cells)
    cells = traced_inputs(config, 2, 5, seed=0)
    cells["expression_values"][1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(**cells)


def test_lora_with_reentrant_gradient_checkpointing_trains_the_adapters():
    """PEFT + `gradient_checkpointing_enable(use_reentrant=True)`: transformers makes the input embedding's output
    require gradients (found through `get_input_embeddings()`, the frozen prior), so the LoRA weights inside
    checkpointed layers get gradients."""
    from peft import LoraConfig, get_peft_model

    config = tiny_config(num_labels=3, pooling="mean")
    model = with_prior(ScGeneForCellClassification(config))
    model.set_backbone_trainable(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    cells = traced_inputs(config, 4, 6, seed=3)
    cells.pop("expression_bins", None)
    peft_model(**cells, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    lora = {name: p.grad for name, p in peft_model.named_parameters() if "lora_B" in name}
    assert len(lora) == 2 * config.num_hidden_layers
    assert all(grad is not None and grad.abs().sum() > 0 for grad in lora.values())
    assert model.get_gene_prior().grad is None and not model.get_gene_prior().requires_grad


def test_resizing_the_vocabulary_is_refused():
    model = ScGeneModel(tiny_config())
    with pytest.raises(ValueError, match="build-prior"):
        model.resize_token_embeddings(60)


def test_output_attentions_under_sdpa_warns_and_gives_none_per_layer(caplog):
    """As transformers' models do: SDPA computes no weights, so the request is answered with None and a warning that
    names the fix (before, ScGene raised)."""
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process; the common tests may have
    config = tiny_config(pooling="mean")
    model = ScGeneModel._from_config(config, attn_implementation="sdpa").eval()
    cells = traced_inputs(config, 2, 5, seed=0)
    with caplog.at_level("WARNING"):
        attentions = model(**cells, output_attentions=True).attentions
    assert attentions == (None,) * config.num_hidden_layers
    assert "attn_implementation='eager'" in caplog.text
    eager = ScGeneModel._from_config(config, attn_implementation="eager").eval()
    assert all(weights.shape == (2, 4, 6, 6) for weights in eager(**cells, output_attentions=True).attentions)
