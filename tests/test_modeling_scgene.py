"""ScGene model: outputs, invariances, save/load, attention backends, gradients and errors."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from modeling_helpers import DESIGN_COMBINATIONS, N_BINS, random_cells, tiny_config, with_prior
from scgene import ScGeneConfig, ScGeneForCellClassification, ScGeneForMaskedExpression, ScGeneModel


def design(encoder_type, attention_type, expression_encoding, **overrides):
    return tiny_config(
        encoder_type=encoder_type, attention_type=attention_type, expression_encoding=expression_encoding, **overrides
    )


def pad_cells(cells: dict, length: int) -> dict:
    """Right-pad every input to `length` genes, as the collator does."""
    extra = length - cells["input_ids"].shape[1]
    padded = {name: torch.nn.functional.pad(t, (0, extra)) for name, t in cells.items()}
    padded["expression_values"] = padded["expression_values"].float()
    return padded


@pytest.mark.parametrize("encoder_type,attention_type,expression_encoding", DESIGN_COMBINATIONS)
def test_save_load_round_trip_keeps_outputs_and_prior(tmp_path, encoder_type, attention_type, expression_encoding):
    model = with_prior(ScGeneForMaskedExpression(design(encoder_type, attention_type, expression_encoding))).eval()
    cells = random_cells(3, 9)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()

    assert type(reloaded) is ScGeneForMaskedExpression
    assert reloaded.get_gene_prior().abs().sum() > 0
    assert torch.equal(reloaded.get_gene_prior(), model.get_gene_prior())
    assert not reloaded.get_gene_prior().requires_grad
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        before, after = model(**cells), reloaded(**cells)
    # identical weights; safetensors memory-maps them at unaligned addresses, which may change the BLAS kernel's
    # summation order in the last bit, so outputs are compared at fp32 round-off
    torch.testing.assert_close(after.predicted_values, before.predicted_values, atol=1e-6, rtol=0)
    if expression_encoding == "binned":
        assert before.bin_logits.shape == (3, 10, N_BINS)
        torch.testing.assert_close(after.bin_logits, before.bin_logits, atol=1e-6, rtol=0)


def test_prior_survives_meta_device_and_bf16_loading(tmp_path):
    model = with_prior(ScGeneModel(tiny_config()))
    model.save_pretrained(tmp_path)
    on_cpu_map = ScGeneModel.from_pretrained(tmp_path, device_map="cpu")
    in_bf16 = ScGeneModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(on_cpu_map.get_gene_prior(), model.get_gene_prior())
    assert in_bf16.get_gene_prior().dtype == torch.float32  # kept in fp32
    assert torch.equal(in_bf16.get_gene_prior(), model.get_gene_prior())
    assert in_bf16.embeddings.special_tokens.weight.dtype == torch.bfloat16
    assert in_bf16(**random_cells(2, 5)).last_hidden_state.dtype == torch.bfloat16


def test_base_model_and_classifier_load_from_a_pretraining_checkpoint(tmp_path):
    pretrained = with_prior(ScGeneForMaskedExpression(tiny_config())).eval()
    pretrained.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    cells = random_cells(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            base(**cells).last_hidden_state, pretrained.scgene(**cells).last_hidden_state, atol=1e-6, rtol=0
        )
    assert isinstance(classifier, ScGeneForCellClassification)
    assert torch.equal(classifier.get_gene_prior(), pretrained.get_gene_prior())


def test_checkpoint_without_prior_fails_loudly(tmp_path):
    with_prior(ScGeneModel(tiny_config())).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["embeddings.gene_prior.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no prior gene embedding"):
        ScGeneModel.from_pretrained(tmp_path)


def test_pretraining_heads_left_behind_are_not_reported_but_missing_weights_are(tmp_path):
    with_prior(ScGeneForMaskedExpression(tiny_config(contrastive_loss_weight=1.0))).save_pretrained(tmp_path)
    _, info = ScGeneModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]  # value_head, bin_head, contrastive_projection: expected to stay behind
    weights = load_file(tmp_path / "model.safetensors")
    del weights["scgene.encoder.layers.0.attention.q_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, info = ScGeneModel.from_pretrained(tmp_path, output_loading_info=True)
    assert "encoder.layers.0.attention.q_proj.weight" in info["missing_keys"]


def test_a_non_finite_prior_is_refused_and_an_unset_one_warned_about(tmp_path, caplog):
    import logging

    model = ScGeneModel(tiny_config())  # prior never set: zeros
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(tmp_path / "unset")
        ScGeneModel.from_pretrained(tmp_path / "unset")
    assert caplog.text.count("all zeros") == 2  # on saving, and on loading
    with_prior(model).save_pretrained(tmp_path / "broken")
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    weights["embeddings.gene_prior.weight"][5, 3] = float("nan")
    save_file(weights, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="prior gene embedding contains NaN"):
        ScGeneModel.from_pretrained(tmp_path / "broken")
    with pytest.raises(ValueError, match=r"prior gene embedding is \(40, 32\) but this model needs \(50, 32\)"):
        ScGeneModel.from_pretrained(tmp_path / "unset", vocab_size=50, ignore_mismatched_sizes=True)


def test_set_gene_prior_checks_shape_and_values():
    model = ScGeneModel(tiny_config())
    with pytest.raises(ValueError, match="vocab_size, hidden_size"):
        model.set_gene_prior(torch.zeros(5, 32))
    with pytest.raises(ValueError, match="NaN"):
        model.set_gene_prior(torch.full((40, 32), float("nan")))


def test_prior_is_a_buffer_not_a_parameter():
    model = with_prior(ScGeneForCellClassification(tiny_config(freeze_backbone=False)))
    names = {name for name, _ in model.named_parameters()}
    assert not any("gene_prior" in name for name in names)
    assert "scgene.embeddings.gene_prior.weight" in dict(model.named_buffers())
    model.requires_grad_(True)
    assert not model.get_gene_prior().requires_grad


@pytest.mark.parametrize("encoder_type,attention_type,expression_encoding", DESIGN_COMBINATIONS)
def test_eager_equals_sdpa(encoder_type, attention_type, expression_encoding):
    config = design(encoder_type, attention_type, expression_encoding)
    model = with_prior(ScGeneModel(config)).eval()
    cells = pad_cells(random_cells(1, 6, seed=1), 9)
    cells = {name: torch.cat([t, pad_cells(random_cells(1, 9, seed=2), 9)[name]]) for name, t in cells.items()}
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(**cells).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(**cells).last_hidden_state
    real = cells["attention_mask"].bool()
    torch.testing.assert_close(eager[real], sdpa[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder_type", ["standard", "dual_branch"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "weighted_mean"])
def test_cell_embedding_ignores_batch_mates_and_padding(encoder_type, pooling):
    model = with_prior(ScGeneModel(tiny_config(encoder_type=encoder_type, pooling=pooling))).eval()
    alone = random_cells(1, 7, seed=3)
    mates = random_cells(3, 12, seed=4)
    batch = {name: torch.cat([pad_cells(alone, 13)[name], mates[name]]) for name in alone}
    with torch.no_grad():
        single = model(**alone).pooler_output[0]
        in_batch = model(**batch).pooler_output[0]
        padded_alone = model(**pad_cells(alone, 15)).pooler_output[0]
    torch.testing.assert_close(in_batch, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_alone, single, atol=1e-5, rtol=1e-5)


def test_gene_branch_runs_once_for_a_shared_panel():
    model = with_prior(ScGeneModel(tiny_config(encoder_type="dual_branch"))).eval()
    seen_batch_sizes = []
    hook = model.encoder.layers[0].gene_block.register_forward_hook(
        lambda module, args, output: seen_batch_sizes.append(args[0].shape[0])
    )
    shared = random_cells(4, 8, seed=5, shared_panel=True)
    with torch.no_grad():
        fused = model(**shared).last_hidden_state
        one_by_one = torch.cat([model(**{k: v[i : i + 1] for k, v in shared.items()}).last_hidden_state for i in range(4)])
        model(**random_cells(4, 8, seed=6))
    hook.remove()
    assert seen_batch_sizes == [1, 1, 1, 1, 1, 4]  # shared batch: once; then 4 single cells; then a mixed batch
    torch.testing.assert_close(fused, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder_type", ["standard", "dual_branch"])
def test_gradient_checkpointing_gives_the_same_gradients(encoder_type):
    torch.manual_seed(0)
    model = with_prior(ScGeneForMaskedExpression(tiny_config(encoder_type=encoder_type, expression_encoding="binned")))
    cells = random_cells(2, 8, seed=7)
    labels = torch.full_like(cells["expression_values"], -100.0)
    labels[:, 2:4] = cells["expression_values"][:, 2:4]

    def gradients():
        model.zero_grad()
        model(**cells, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_frozen_backbone_gets_no_gradients_and_can_be_unfrozen():
    model = with_prior(ScGeneForCellClassification(tiny_config(num_labels=3)))
    cells = random_cells(4, 6, seed=8)
    model(**cells, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    assert all(p.grad is None for p in model.scgene.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())

    model.zero_grad()
    model.set_backbone_trainable(True)
    model(**cells, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    assert all(p.grad is not None for p in model.scgene.encoder.parameters())


def test_gene_projection_classifier_reads_a_fixed_panel():
    config = tiny_config(classifier_pooling="gene_projection", num_panel_genes=8, num_labels=2, pooling="mean")
    model = with_prior(ScGeneForCellClassification(config)).eval()
    assert model(**random_cells(3, 8, add_cls=False)).logits.shape == (3, 2)
    assert model.classifier.dense.in_features == 8
    with pytest.raises(ValueError, match="fixed panel of 8 genes"):
        model(**random_cells(3, 5, add_cls=False))


def test_dual_branch_regulation_is_signed_and_shaped():
    model = with_prior(ScGeneModel(tiny_config(encoder_type="dual_branch"))).eval()
    model.set_attn_implementation("eager")
    cells = pad_cells(random_cells(2, 7, seed=9), 10)
    with torch.no_grad():
        out = model(**cells, output_regulation=True, output_attentions=True)
    assert len(out.regulation) == 2
    for regulation, attention in zip(out.regulation, out.attentions):
        assert regulation.shape == (2, 4, 10, 10)
        assert (regulation < 0).any() and (regulation > 0).any()
        assert regulation[..., 8:].abs().max() == 0  # padded genes regulate nothing
        # the effective attention is plain softmax attention plus the signed regulation
        plain = attention - regulation
        assert (plain >= -1e-6).all()
        torch.testing.assert_close(plain.sum(-1), torch.ones(2, 4, 10), atol=1e-5, rtol=0)


def test_masked_expression_loss_uses_masked_positions_only():
    model = with_prior(ScGeneForMaskedExpression(tiny_config())).eval()
    cells = random_cells(2, 6, seed=10)
    labels = torch.full_like(cells["expression_values"], -100.0)
    labels[0, 3] = 2.0
    with torch.no_grad():
        out = model(**cells, labels=labels)
    expected = (out.predicted_values[0, 3] - 2.0) ** 2
    torch.testing.assert_close(out.loss, expected)
    assert out.predicted_values.shape == (2, 7) and out.bin_logits is None


def test_masked_losses_average_cells_not_tokens():
    """Cell 0 has 1 masked gene, cell 1 has 4: each cell's mean error counts once (a token mean would weigh cell 1
    four times), so the loss of a batch is the mean of its halves' losses, as DDP and gradient accumulation assume."""
    model = with_prior(ScGeneForMaskedExpression(tiny_config(expression_encoding="binned"))).eval()
    cells = random_cells(2, 6, seed=13)
    labels = torch.full_like(cells["expression_values"], -100.0)
    bin_labels = torch.full_like(cells["expression_bins"], -100)
    labels[0, 2], labels[1, 1:5] = 1.0, 2.0
    bin_labels[0, 2], bin_labels[1, 1:5] = 1, 2
    with torch.no_grad():
        out = model(**cells, labels=labels, bin_labels=bin_labels)
        halves = [model(**{name: tensor[i : i + 1] for name, tensor in cells.items()}, labels=labels[i : i + 1],
                        bin_labels=bin_labels[i : i + 1]) for i in (0, 1)]
    predicted = out.predicted_values
    expected = 0.5 * ((predicted[0, 2] - 1.0) ** 2 + ((predicted[1, 1:5] - 2.0) ** 2).mean())
    torch.testing.assert_close(out.value_loss, expected)
    for name in ("value_loss", "bin_loss"):
        torch.testing.assert_close(getattr(out, name), 0.5 * (getattr(halves[0], name) + getattr(halves[1], name)))


def test_contrastive_loss_matches_two_views_and_is_reported_apart():
    config = tiny_config(contrastive_loss_weight=0.5, contrastive_temperature=0.3, pooling="mean")
    model = with_prior(ScGeneForMaskedExpression(config)).eval()
    cells, other = random_cells(4, 6, seed=11), random_cells(4, 5, seed=12)
    labels = torch.full_like(cells["expression_values"], -100.0)
    labels[:, 2] = 1.0
    views = {f"view_{name}": tensor for name, tensor in other.items()}
    with torch.no_grad():
        out = model(**cells, labels=labels, **views)
        same = model(**cells, labels=labels, **{f"view_{name}": tensor for name, tensor in cells.items()})
        first = model.contrastive_projection(model.scgene(**cells).pooler_output)
        second = model.contrastive_projection(model.scgene(**other).pooler_output)
    logits = torch.nn.functional.normalize(first, dim=-1) @ torch.nn.functional.normalize(second, dim=-1).T / 0.3
    target = torch.arange(4)
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))
    torch.testing.assert_close(out.contrastive_loss, expected)
    torch.testing.assert_close(out.loss, out.value_loss + 0.5 * out.contrastive_loss)
    assert same.contrastive_loss < out.contrastive_loss  # identical views are the easiest positives
    with pytest.raises(ValueError, match="count_views=True"):
        model(**cells, labels=labels)


def test_loss_weights_turn_objectives_off():
    model = with_prior(ScGeneForMaskedExpression(tiny_config(value_loss_weight=0.0))).eval()
    cells = random_cells(2, 6, seed=13)
    labels = torch.full_like(cells["expression_values"], -100.0)
    labels[:, 1] = 1.0
    with torch.no_grad():
        out = model(**cells, labels=labels)
    assert out.value_loss > 0 and out.loss == 0  # computed and reported, weighted out of the total


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"contrastive_loss_weight": -1.0}, "contrastive_loss_weight"),
        ({"contrastive_temperature": 0.0}, "contrastive_temperature"),
        ({"classifier_temperature": -1.0}, "classifier_temperature must be positive"),
        ({"encoder_type": "decoder"}, "encoder_type"),
        ({"attention_type": "gqa"}, "attention_type"),
        ({"expression_encoding": "rank"}, "expression_encoding"),
        ({"hidden_size": 30}, "multiple of num_attention_heads"),
        ({"classifier_pooling": "gene_projection"}, "num_panel_genes"),
        ({"expression_encoding": "binned", "n_bins": 1}, "n_bins"),
        ({"pad_token_id": 5}, "Special token ids"),
        ({"attention_type": "mla", "kv_lora_rank": 0}, "kv_lora_rank"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'; in config.json write numbers"),
        ({"pooling_layer": 0}, "pooling_layer must be an integer from -2 .* to -1 .*, got 0"),
        ({"pooling_layer": -3}, "pooling_layer must be an integer from -2"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(encoder_type="dual_branch", attention_type="mla", q_lora_rank=8, norm_position="pre")
    config.save_pretrained(tmp_path)
    assert ScGeneConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(input_ids=c["input_ids"].float()), "integer tensor"),
        (lambda c: c.update(expression_values=c["expression_values"][:, :3]), "expression_values"),
        (lambda c: c.update(expression_values=c["expression_values"].long()), "floating point"),
        (lambda c: c.update(attention_mask=c["attention_mask"][:1]), "attention_mask"),
        (lambda c: c.update(input_ids=c["input_ids"] + 100), r"\[0, 40\)"),
        (lambda c: c.update(expression_bins=None), "expression_bins"),
        (lambda c: c.update(expression_bins=c["expression_bins"] + N_BINS), "mask bin"),
        (lambda c: c["expression_values"].__setitem__((1, 2), float("nan")), "NaN or infinite"),
        (lambda c: c.update({name: tensor[:, :0] for name, tensor in c.items()}), "no tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    model = ScGeneModel(tiny_config(expression_encoding="binned"))
    cells = random_cells(2, 5)
    change(cells)
    with pytest.raises(ValueError, match=message):
        model(**cells)


def test_cls_pooling_without_cls_token_is_an_error():
    with pytest.raises(ValueError, match="<cls>"):
        ScGeneModel(tiny_config())(**random_cells(2, 5, add_cls=False))


def test_init_covers_every_parameter_and_buffer():
    config = tiny_config(encoder_type="dual_branch", attention_type="mla", expression_encoding="binned", regulation_init=0.25)
    model = ScGeneForMaskedExpression(config)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    block = model.scgene.encoder.layers[0].expression_block
    assert torch.equal(block.attention.regulation_scale, torch.full((4,), 0.25))
    assert torch.equal(model.scgene.embeddings.expression.continuous_scale, torch.ones(1))
    assert model.get_gene_prior().abs().sum() == 0
    assert torch.equal(block.attention_norm.weight, torch.ones(32))
    assert model.value_head.weight.std() < 0.1


@pytest.mark.parametrize("encoder_type", ["standard", "dual_branch"])
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_hidden_states_on_request_and_mean_pooling(encoder_type, norm_position):
    config = tiny_config(encoder_type=encoder_type, norm_position=norm_position, pooling="mean")
    model = with_prior(ScGeneModel(config)).eval()
    cells = pad_cells(random_cells(2, 6, seed=14), 9)
    with torch.no_grad():
        out = model(**cells, output_hidden_states=True)
        plain = model(**cells)
    assert plain.hidden_states is None
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 9, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(plain.last_hidden_state, out.last_hidden_state)
    # mean pooling: the mean over real gene tokens (not <cls>, not padding)
    expected = out.last_hidden_state[:, 1:7].mean(1)
    torch.testing.assert_close(out.pooler_output, expected, atol=1e-6, rtol=1e-5)


def test_weighted_mean_pooling_weighs_gene_states_by_expression():
    model = with_prior(ScGeneModel(tiny_config(pooling="weighted_mean"))).eval()
    cells = pad_cells(random_cells(2, 6, seed=15), 9)
    with torch.no_grad():
        out = model(**cells)
    weights = cells["expression_values"][:, 1:7].clamp(min=0)  # gene tokens 1..6; <cls> and padding weigh nothing
    expected = (weights[..., None] * out.last_hidden_state[:, 1:7]).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooler_output, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["weighted_mean", "cls"])
def test_prior_readout_adds_the_prior_pooled_like_the_gene_states(pooling):
    """prior_readout_weight w: the cell embedding is the transformer's plus w x the prior rows of the cell's genes,
    pooled with the same weights (plain mean under <cls> pooling); the gene states do not change."""
    model = with_prior(ScGeneModel(tiny_config(pooling=pooling))).eval()
    cells = pad_cells(random_cells(2, 6, seed=16), 9)
    with torch.no_grad():
        plain = model(**cells)
        model.config.prior_readout_weight = 2.5
        read_out = model(**cells)
    prior_rows = model.get_gene_prior()[cells["input_ids"][:, 1:7]]  # (B, 6, d): gene tokens 1..6
    weights = (cells["expression_values"][:, 1:7].clamp(min=0) if pooling == "weighted_mean"
               else torch.ones(2, 6))
    prior_mean = (weights[..., None] * prior_rows).sum(1) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(read_out.pooler_output, plain.pooler_output + 2.5 * prior_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(read_out.last_hidden_state, plain.last_hidden_state)
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="prior_readout_weight must be a finite number"):
            tiny_config(prior_readout_weight=bad)


@pytest.mark.parametrize("encoder_type", ["standard", "dual_branch"])
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_pooling_layer_reads_an_earlier_layer_through_the_final_norm(tmp_path, encoder_type, norm_position):
    """Reading layer -2 of 3 gives what the same weights give with 2 layers read at the last one."""
    config = dict(encoder_type=encoder_type, norm_position=norm_position, pooling="mean")
    model = with_prior(ScGeneModel(tiny_config(num_hidden_layers=3, **config)))
    model.save_pretrained(tmp_path)
    second_to_last = ScGeneModel.from_pretrained(tmp_path, pooling_layer=-2).eval()
    truncated = ScGeneModel(tiny_config(num_hidden_layers=2, **config)).eval()
    truncated.load_state_dict(model.state_dict(), strict=False)  # drops layers.2
    cells = pad_cells(random_cells(3, 6, seed=15), 8)
    with torch.no_grad():
        read_early, last = second_to_last(**cells), model.eval()(**cells)
        torch.testing.assert_close(read_early.pooler_output, truncated(**cells).pooler_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(read_early.last_hidden_state, last.last_hidden_state)  # only the read-out moves
    assert not torch.allclose(read_early.pooler_output, last.pooler_output, atol=1e-3)
    assert second_to_last.config.pooling_layer == -2
    with pytest.raises(ValueError, match="pooling_layer must be an integer from -3"):
        ScGeneModel.from_pretrained(tmp_path, pooling_layer=-4)  # an override is checked like a saved value


def test_contrastive_loss_trains_the_last_layer_whatever_is_read():
    config = dict(contrastive_loss_weight=1.0, pooling="mean", num_hidden_layers=3)
    model = with_prior(ScGeneForMaskedExpression(tiny_config(**config))).eval()
    early = ScGeneForMaskedExpression(tiny_config(pooling_layer=-3, **config)).eval()
    early.load_state_dict(model.state_dict())
    cells, other = random_cells(4, 6, seed=16), random_cells(4, 6, seed=17)
    labels = torch.full_like(cells["expression_values"], -100.0)
    labels[:, 2] = 1.0
    views = {f"view_{name}": tensor for name, tensor in other.items()}
    with torch.no_grad():
        torch.testing.assert_close(early(**cells, labels=labels, **views).contrastive_loss,
                                   model(**cells, labels=labels, **views).contrastive_loss)
        assert not torch.allclose(early.scgene(**cells).pooler_output, model.scgene(**cells).pooler_output, atol=1e-3)


@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_freeze_backbone_holds_after_loading(tmp_path, freeze_backbone):
    with_prior(ScGeneForMaskedExpression(tiny_config())).save_pretrained(tmp_path / "pretrained")
    from_pretraining = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pretrained", num_labels=3, freeze_backbone=freeze_backbone
    )
    from_pretraining.save_pretrained(tmp_path / "classifier")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")
    for model in (from_pretraining, reloaded):
        assert all(p.requires_grad is not freeze_backbone for p in model.scgene.parameters())
        assert all(p.requires_grad for p in model.classifier.parameters())


def test_classifier_head_standardises_features_and_saves_the_statistics(tmp_path):
    model = with_prior(ScGeneForCellClassification(tiny_config(num_labels=3, pooling="mean"))).eval()
    cells = random_cells(5, 6, seed=14)
    with torch.no_grad():
        pooled = model.scgene(**cells).pooler_output
        raw_logits = model(**cells).logits
        model.classifier.set_feature_statistics(pooled)
        logits = model(**cells).logits
        head = model.classifier
        standardised = (pooled - pooled.mean(0)) / pooled.std(0)
        expected = head.out_proj(head.act(head.dense(standardised)))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, raw_logits)  # the statistics are used
    model.save_pretrained(tmp_path)
    reloaded = ScGeneForCellClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**cells).logits, logits)
    with pytest.raises(ValueError, match="features"):
        model.classifier.set_feature_statistics(pooled[:, :3])


def test_saved_weights_are_readable_like_any_other_file(tmp_path):
    import os
    import stat

    model = with_prior(ScGeneModel(tiny_config()))
    model.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("model_class", [ScGeneModel, ScGeneForMaskedExpression, ScGeneForCellClassification])
def test_return_dict_false_gives_the_output_as_a_tuple(model_class):
    """As every transformers model: `return_dict=False`, as an argument or in the config, returns `to_tuple()`."""
    model = with_prior(model_class(tiny_config())).eval()
    cells = random_cells(2, 6, seed=21)
    with torch.no_grad():
        expected = model(**cells).to_tuple()
        as_argument = model(**cells, return_dict=False)
        model.config.return_dict = False
        from_config = model(**cells)
    for output in (as_argument, from_config):
        assert isinstance(output, tuple) and len(output) == len(expected)
        for got, want in zip(output, expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("problem_type", ["regression", "multi_label_classification", "single_label_classification"])
def test_classifier_loss_follows_problem_type(problem_type):
    config = tiny_config(num_labels=3, problem_type=problem_type)
    model = with_prior(ScGeneForCellClassification(config)).eval()
    cells = random_cells(4, 6, seed=22)
    generator = torch.Generator().manual_seed(0)
    labels = {"regression": torch.randn(4, 3, generator=generator),
              "multi_label_classification": torch.randint(0, 2, (4, 3), generator=generator).float(),
              "single_label_classification": torch.randint(0, 3, (4,), generator=generator)}[problem_type]
    output = model(**cells, labels=labels)
    expected = {"regression": torch.nn.functional.mse_loss,
                "multi_label_classification": torch.nn.functional.binary_cross_entropy_with_logits,
                "single_label_classification": torch.nn.functional.cross_entropy}[problem_type](output.logits, labels)
    torch.testing.assert_close(output.loss, expected)

