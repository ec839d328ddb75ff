"""ScGene: a transformer over the genes of one cell, with a frozen prior gene embedding.

Forward order of the components below:
    gene ids ──> ScGenePriorEmbedding (frozen fp32 buffer, seed 000's gene2vec + knowledge fusion) ─┐
    values/bins ──> ScGeneExpressionEmbedding (linear: seed 000 | binned: seed 001) ────────────────┤
                                                                      ScGeneEmbeddings ─────────────┘
    "standard":    x = expression + gene  ──> ScGeneLayer × L                     (seed 000)
    "dual_branch": gene branch   H_g ──> ScGeneLayer                               (seed 001)
                   expr branch   H_e ──> regulated attention: (A_e + λ · A_reg(H_g) · tanh(s(H_g))) V_e
    heads: ScGeneModel (embeddings) | ScGeneForMaskedExpression | ScGeneForCellClassification

This file ships with every checkpoint as Hub code: it imports only torch and transformers, and
`.configuration_scgene` relatively.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple, is_tracing, logging, torch_compilable_check

from .configuration_scgene import ScGeneConfig

logger = logging.get_logger(__name__)

NUM_SPECIAL_TOKENS = 3  # <pad>, <cls>, <mask> hold ids 0, 1, 2
HUB_AUTO_MAP = {
    "AutoConfig": "configuration_scgene.ScGeneConfig",
    "AutoModel": "modeling_scgene.ScGeneModel",
    "AutoModelForMaskedLM": "modeling_scgene.ScGeneForMaskedExpression",
    "AutoModelForSequenceClassification": "modeling_scgene.ScGeneForCellClassification",
}


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ScGeneModelOutput(ModelOutput):
    """Gene-level states, the pooled cell embedding, and optional per-layer extras."""

    last_hidden_state: torch.FloatTensor | None = None  # (B, G, d)
    pooler_output: torch.FloatTensor | None = None  # (B, d)
    # L + 1 × (B, G, d): the embeddings, then each layer's output; the last is `last_hidden_state`. Dual-branch: the
    # expression branch's states (the gene branch does not depend on expression), then the fused output.
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None  # L × (B, heads, G, G), eager only (else None per layer)
    regulation: tuple[torch.FloatTensor, ...] | None = None  # L × (B, heads, G, G), signed, dual-branch only


@dataclass
class ScGeneMaskedExpressionOutput(ModelOutput):
    """Masked-expression pretraining: predicted values per gene (and bin logits when binned)."""

    loss: torch.FloatTensor | None = None  # the weighted sum of the losses below
    value_loss: torch.FloatTensor | None = None
    bin_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    regulation_loss: torch.FloatTensor | None = None  # dual-branch, with `known_edges`
    predicted_values: torch.FloatTensor | None = None  # (B, G)
    bin_logits: torch.FloatTensor | None = None  # (B, G, n_bins)
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    regulation: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ScGeneCellClassificationOutput(ModelOutput):
    """Cell classification logits."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None  # (B, num_labels)
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    regulation: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------


class ScGenePriorEmbedding(nn.Embedding):
    """The fused prior gene embedding (vocab_size, d): the model's input embedding, held in a persistent fp32 buffer
    that is never trainable.

    A buffer rather than a frozen parameter: it stays out of optimizers, PEFT and `requires_grad_()` cannot unfreeze
    it, and FSDP does not see mixed `requires_grad` in one module. An `nn.Embedding` all the same, so transformers and
    PEFT find it through `get_input_embeddings()` (e.g. to make its output require gradients under checkpointing).
    """

    def __init__(self, config: ScGeneConfig):
        prior = torch.zeros(config.vocab_size, config.hidden_size, dtype=torch.float32)
        super().__init__(config.vocab_size, config.hidden_size, _weight=prior, _freeze=True)
        del self.weight  # the parameter nn.Embedding wrapped around it: the prior is a buffer
        self.register_buffer("weight", prior)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (B, G, d) fp32


class ScGeneExpressionEmbedding(nn.Module):
    """Embeds each gene's expression.

    linear (seed 000): `Linear(1, d)(x)`.
    binned (seed 001): `W_bin · onehot(b) + alpha · x · v_cont`; bin `n_bins` is the mask bin, where the continuous
    term is dropped (the masked value carries no information).
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.encoding = config.expression_encoding
        self.mask_bin = config.n_bins
        if self.encoding == "linear":
            self.value_projection = nn.Linear(1, config.hidden_size)
        else:
            self.bin_embeddings = nn.Embedding(config.n_bins + 1, config.hidden_size)
            self.continuous_direction = nn.Parameter(torch.empty(config.hidden_size))  # v_cont
            self.continuous_scale = nn.Parameter(torch.empty(1))  # alpha

    def forward(self, expression_values: torch.Tensor, expression_bins: torch.Tensor | None) -> torch.Tensor:
        values = expression_values.unsqueeze(-1)  # (B, G, 1)
        if self.encoding == "linear":
            return self.value_projection(values)  # (B, G, d)
        values = values.masked_fill((expression_bins == self.mask_bin).unsqueeze(-1), 0.0)
        return self.bin_embeddings(expression_bins) + self.continuous_scale * values * self.continuous_direction


class ScGeneEmbeddings(nn.Module):
    """Gene identity (prior + special tokens + optional learnable embedding) and expression embeddings.

    The two are returned apart: the standard encoder adds them (seed 000: the prior acts like a positional encoding),
    the dual-branch encoder starts one branch from each (seed 001).
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.gene_prior = ScGenePriorEmbedding(config)
        self.special_tokens = nn.Embedding(NUM_SPECIAL_TOKENS, config.hidden_size)
        self.gene_embeddings = (
            nn.Embedding(config.vocab_size, config.hidden_size) if config.use_learnable_gene_embedding else None
        )
        self.expression = ScGeneExpressionEmbedding(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def gene_identity(self, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, G) ids -> (B, G, d): what each token is, independent of expression."""
        identity = self.gene_prior(input_ids).to(dtype)
        is_special = (input_ids < NUM_SPECIAL_TOKENS).unsqueeze(-1)  # (B, G, 1): the <cls>/<pad>/<mask> positions
        special = self.special_tokens(input_ids.clamp(max=NUM_SPECIAL_TOKENS - 1)).to(dtype)  # (B, G, d)
        identity = torch.where(is_special, identity + special, identity)
        if self.gene_embeddings is not None:
            identity = identity + self.gene_embeddings(input_ids)
        return identity

    def forward(self, input_ids, expression_values, expression_bins=None) -> tuple[torch.Tensor, torch.Tensor]:
        expression = self.expression(expression_values, expression_bins)  # (B, G, d)
        identity = self.gene_identity(input_ids, expression.dtype)  # (B, G, d)
        return self.dropout(identity), self.dropout(expression)


# ----------------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, G, dh)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # (B, 1, 1, G) additive
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, G, G)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, G, H, dh)
    return attn_output, attn_weights


def attention_function(config: ScGeneConfig) -> Callable:
    """The attention implementation chosen by `config._attn_implementation` (eager, sdpa, or a registered one)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)  # (B, G, H·dh) -> (B, H, G, dh)


class ScGeneAttention(nn.Module):
    """Self-attention over the genes of a cell, dispatched through the transformers attention interface.

    Projections are multi-head ("mha": q_proj, k_proj, v_proj) or multi-head latent ("mla", DeepSeek-V2: K and V from
    one low-rank latent `c_kv`, Q optionally from a low-rank latent `c_q`). Genes have no order: no rotary part.
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.latent = config.attention_type == "mla"
        d = config.hidden_size
        if self.latent and config.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(d, config.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.LayerNorm(config.q_lora_rank, eps=config.layer_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, d)
        else:
            self.q_proj = nn.Linear(d, d)
        if self.latent:
            self.kv_a_proj = nn.Linear(d, config.kv_lora_rank, bias=False)
            self.kv_a_layernorm = nn.LayerNorm(config.kv_lora_rank, eps=config.layer_norm_eps)
            self.kv_b_proj = nn.Linear(config.kv_lora_rank, 2 * d)
        else:
            self.k_proj = nn.Linear(d, d)
            self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def expand_kv(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA: latent (B, G, r_kv) -> keys and values (B, H, G, dh) each."""
        key, value = self.kv_b_proj(latent).chunk(2, dim=-1)
        return split_heads(key, self.head_dim), split_heads(value, self.head_dim)

    def project_qkv(self, hidden_states: torch.Tensor):
        """(B, G, d) -> query, key, value, each (B, H, G, dh)."""
        if hasattr(self, "q_proj"):
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        if self.latent:
            key, value = self.expand_kv(self.kv_a_layernorm(self.kv_a_proj(hidden_states)))
        else:
            key, value = (split_heads(proj(hidden_states), self.head_dim) for proj in (self.k_proj, self.v_proj))
        return split_heads(query, self.head_dim), key, value

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
        query, key, value = self.project_qkv(hidden_states)  # (B, H, G, dh)
        attn_output, attn_weights = attention_function(self.config)(
            self, query, key, value, attention_mask,
            dropout=self.dropout if self.training else 0.0, scaling=self.scaling,
        )  # (B, G, H, dh)
        return self.o_proj(attn_output.flatten(2)), attn_weights


class ScGeneRegulatedAttention(ScGeneAttention):
    """The expression branch's attention with signed regulation from the gene branch (seed 001).

    Per head h, with A = softmax(QKᵀ/√dh) over real (unpadded) genes:
        out_h = (A_expr + R_h) · V_expr,    R_h[i, j] = λ_h · A_reg[i, j] · tanh(s_h[j])
    A_expr comes from the expression states. The regulation map A_reg (which genes regulate gene i) and the regulator
    sign s_h[j] (does gene j activate, s > 0, or repress, s < 0) come from the gene branch, so R does not depend on
    expression. The effective weights A_expr + R can be negative: gene j raises or lowers gene i's update.
    Because the sign depends only on the regulator j, it folds into the values: R_h · V = λ_h · A_reg · (tanh(s_h) ⊙ V),
    so both maps run as one attention call over 2H heads (fused SDPA kernels, no G × G matrix in memory), at twice the
    attention cost of plain MHA. λ_h = `regulation_init` (small) makes the layer start close to plain attention.
    R itself is materialised only on request (`output_regulation=True`).
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__(config)
        heads, d = config.num_attention_heads, config.hidden_size
        self.regulation_proj = nn.Linear(d, 2 * d + heads)  # regulation query, key, and one sign logit per head
        self.regulation_scale = nn.Parameter(torch.empty(heads))  # λ

    def regulation_inputs(self, gene_states: torch.Tensor):
        """(Bg, G, d) -> query, key (Bg, H, G, dh) and regulator sign logits s (Bg, H, G, 1)."""
        d = self.config.hidden_size
        query, key, sign_logits = self.regulation_proj(gene_states).split([d, d, self.config.num_attention_heads], -1)
        return split_heads(query, self.head_dim), split_heads(key, self.head_dim), sign_logits.transpose(1, 2).unsqueeze(-1)

    def regulation_parts(self, gene_states, gene_attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The regulation map A_reg (Bg, H, G, G), float32, rows = targets, and each regulator's effective sign logit
        (Bg, H, G): s_h[j] times the sign of λ_h, whose sign is the sign R gives the regulator's edges."""
        query, key, sign_logits = self.regulation_inputs(gene_states)
        scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
        if gene_attention_mask is not None:
            scores = scores + gene_attention_mask
        effective_sign = sign_logits.squeeze(-1) * torch.sign(self.regulation_scale).view(1, -1, 1)
        return F.softmax(scores, dim=-1, dtype=torch.float32), effective_sign

    def signed_regulation(self, gene_states, gene_attention_mask) -> torch.Tensor:
        """R = λ · A_reg · tanh(s) = |λ| · A_reg · tanh(effective s): (Bg, H, G, G), this layer's gene × gene
        regulation."""
        regulation_map, sign_logits = self.regulation_parts(gene_states, gene_attention_mask)
        return self.regulation_scale.abs().view(1, -1, 1, 1) * regulation_map * torch.tanh(sign_logits).unsqueeze(2)

    def forward(self, hidden_states, gene_states, attention_mask, gene_attention_mask=None, output_regulation=False):
        batch_size = hidden_states.shape[0]
        query, key, value = self.project_qkv(hidden_states)  # (B, H, G, dh)
        # the gene branch may hold a single cell shared by the batch: (1, H, G, ·) -> (B, H, G, ·)
        reg_query, reg_key, sign_logits = (t.expand(batch_size, -1, -1, -1) for t in self.regulation_inputs(gene_states))
        signs = torch.tanh(sign_logits)  # (B, H, G, 1)
        attn_output, attn_weights = attention_function(self.config)(
            self,
            torch.cat([query, reg_query], dim=1),  # (B, 2H, G, dh)
            torch.cat([key, reg_key], dim=1),
            torch.cat([value, signs * value], dim=1),
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )  # (B, G, 2H, dh)
        if attn_weights is None:  # fused kernels: the two maps come back as 2H heads of output
            expression, regulated = attn_output.chunk(2, dim=2)  # (B, G, H, dh) each
            combined = expression + self.regulation_scale.view(1, 1, -1, 1) * regulated
        else:  # eager: the effective signed weights A_expr + R, and the output computed from them (same numbers)
            weights_expr, weights_reg = attn_weights.chunk(2, dim=1)
            attn_weights = weights_expr + self.regulation_scale.view(1, -1, 1, 1) * weights_reg * signs.transpose(2, 3)
            combined = torch.matmul(attn_weights, value).transpose(1, 2)  # (B, G, H, dh)
        regulation = None
        if output_regulation:
            regulation = self.signed_regulation(gene_states, gene_attention_mask).expand(batch_size, -1, -1, -1)
        return self.o_proj(combined.flatten(2)), attn_weights, regulation


# ----------------------------------------------------------------------------------------------------------------------
# Encoder layers
# ----------------------------------------------------------------------------------------------------------------------


class ScGeneFeedForward(nn.Module):
    """Position-wise FFN: down_proj(dropout(act(up_proj(x))))."""

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.dropout(self.act(self.up_proj(hidden_states))))


class ScGeneBlock(nn.Module):
    """Attention and FFN sub-layers with residuals: post-LN (seed 000, PyTorch's `TransformerEncoderLayer` default) or
    pre-LN. Extra keyword arguments go to the attention; its extra outputs (weights, regulation) are passed back."""

    def __init__(self, config: ScGeneConfig, attention: nn.Module | None = None):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attention = attention if attention is not None else ScGeneAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = ScGeneFeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def residual(self, hidden_states, sublayer, norm):
        if self.pre_norm:
            return hidden_states + self.dropout(sublayer(norm(hidden_states)))
        return norm(hidden_states + self.dropout(sublayer(hidden_states)))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **attention_kwargs):
        extras = ()

        def attend(x):
            nonlocal extras
            out, *extras = self.attention(x, attention_mask=attention_mask, **attention_kwargs)
            return out

        hidden_states = self.residual(hidden_states, attend, self.attention_norm)
        hidden_states = self.residual(hidden_states, self.feed_forward, self.feed_forward_norm)
        return hidden_states, *extras


class ScGeneLayer(ScGeneBlock, GradientCheckpointingLayer):
    """One standard encoder layer (seed 000), checkpointable as a unit."""


class ScGeneDualBranchLayer(GradientCheckpointingLayer):
    """One dual-branch layer: the gene branch is a plain block over gene identities; the expression branch is a block
    whose attention is regulated by this layer's incoming gene states."""

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.gene_block = ScGeneBlock(config)
        self.expression_block = ScGeneBlock(config, attention=ScGeneRegulatedAttention(config))

    def forward(self, gene_states, expression_states, attention_mask=None, gene_attention_mask=None,
                output_regulation=False):
        expression_states, attn_weights, regulation = self.expression_block(
            expression_states, attention_mask,
            gene_states=gene_states, gene_attention_mask=gene_attention_mask, output_regulation=output_regulation,
        )
        gene_states, _ = self.gene_block(gene_states, gene_attention_mask)
        return gene_states, expression_states, attn_weights, regulation


class ScGeneEncoder(nn.Module):
    """Stacked `ScGeneLayer`s over expression + gene identity (seed 000)."""

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.layers = nn.ModuleList([ScGeneLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )

    def forward(self, identity, expression, attention_mask, gene_attention_mask, output_hidden_states,
                output_regulation, pooling_layer=-1):
        hidden_states = expression + identity  # (B, G, d)
        # keep per-layer states only when asked: holding them costs L × (B, G, d) of memory
        all_hidden, all_attn = ([hidden_states] if output_hidden_states else []), []
        read_at = len(self.layers) + pooling_layer  # the layer whose output makes the cell embedding
        for index, layer in enumerate(self.layers):
            hidden_states, attn_weights = layer(hidden_states, attention_mask)
            if index == read_at:
                pooled_states = hidden_states
            if output_hidden_states:
                all_hidden.append(hidden_states)
            all_attn.append(attn_weights)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
            pooled_states = hidden_states if pooling_layer == -1 else self.final_norm(pooled_states)
            if output_hidden_states:
                all_hidden[-1] = hidden_states
        return hidden_states, pooled_states, all_hidden, all_attn, []


class ScGeneDualBranchEncoder(nn.Module):
    """Gene branch from the gene identity, expression branch from the expression embedding (seed 001).

    The output fuses both (expression states + gene states), so the heads know which gene each token is. The gene branch
    does not depend on expression: when the batch shares one gene panel it runs on a single row, not once per cell.
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__()
        self.layers = nn.ModuleList([ScGeneDualBranchLayer(config) for _ in range(config.num_hidden_layers)])
        pre_norm = config.norm_position == "pre"
        self.gene_final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if pre_norm else None
        self.expression_final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if pre_norm else None

    def forward(self, identity, expression, attention_mask, gene_attention_mask, output_hidden_states,
                output_regulation, pooling_layer=-1):
        gene_states, expression_states = identity, expression  # (Bg, G, d), (B, G, d) with Bg in {1, B}
        all_hidden, all_attn, all_regulation = [], [], []
        if output_hidden_states:  # the expression branch: the states each layer passes on (gradients reach them)
            all_hidden.append(expression_states)
        read_at = len(self.layers) + pooling_layer  # the layer whose output makes the cell embedding
        for index, layer in enumerate(self.layers):
            gene_states, expression_states, attn_weights, regulation = layer(
                gene_states, expression_states, attention_mask, gene_attention_mask, output_regulation
            )
            if index == read_at:
                read_states = gene_states, expression_states
            if output_hidden_states:
                all_hidden.append(expression_states)
            all_attn.append(attn_weights)
            all_regulation.append(regulation)
        hidden_states = self.fuse(gene_states, expression_states)
        pooled_states = hidden_states if pooling_layer == -1 else self.fuse(*read_states)
        if output_hidden_states:
            all_hidden[-1] = hidden_states
        return hidden_states, pooled_states, all_hidden, all_attn, all_regulation

    def regulation_parts(self, identity, gene_attention_mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's regulation map and effective sign logits (`ScGeneRegulatedAttention.regulation_parts`), from the
        gene branch alone: it does not read expression."""
        parts, gene_states = [], identity
        for layer in self.layers:
            parts.append(layer.expression_block.attention.regulation_parts(gene_states, gene_attention_mask))
            gene_states, _ = layer.gene_block(gene_states, gene_attention_mask)
        return parts

    def fuse(self, gene_states, expression_states):
        """One layer's output: expression states + gene states, each with its final LayerNorm (pre-LN)."""
        if self.gene_final_norm is not None:
            gene_states = self.gene_final_norm(gene_states)
            expression_states = self.expression_final_norm(expression_states)
        return expression_states + gene_states


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model base
# ----------------------------------------------------------------------------------------------------------------------


class ScGenePreTrainedModel(PreTrainedModel):
    config_class = ScGeneConfig
    base_model_prefix = "scgene"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ScGeneLayer", "ScGeneDualBranchLayer"]
    _keep_in_fp32_modules_strict = ["gene_prior"]  # fp32 under fp16 and bf16 alike
    _supports_sdpa = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # losses are means over cells; the Trainer scales them for accumulation
    # a pretraining checkpoint loaded as the encoder or a classifier leaves its pretraining heads behind, as intended
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)value_head\.", r"(^|\.)bin_head\.", r"(^|\.)contrastive_projection\."]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScGenePriorEmbedding):
            init.zeros_(module.weight)  # a checkpoint overwrites it; loading without one raises (from_pretrained)
        elif isinstance(module, ScGeneExpressionEmbedding) and module.encoding == "binned":
            init.normal_(module.continuous_direction, mean=0.0, std=self.config.initializer_range)
            init.ones_(module.continuous_scale)
        elif isinstance(module, ScGeneRegulatedAttention):
            init.constant_(module.regulation_scale, self.config.regulation_init)
        elif isinstance(module, ScGeneClassificationHead):
            init.zeros_(module.feature_mean)
            init.ones_(module.feature_std)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, but a checkpoint without the prior gene embedding is an error: loading
        would otherwise leave the frozen prior at zeros without a word."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing_prior = [key for key in info["missing_keys"] if key.endswith("gene_prior.weight")]
        if missing_prior:
            raise ValueError(
                f"The checkpoint has no prior gene embedding ({missing_prior[0]}): it was not saved by scgene or is "
                "corrupt. Re-save the model with `save_pretrained`, or build a prior (`scgene build-prior`) and set it "
                "with `model.set_gene_prior(matrix)` on a freshly initialised model."
            )
        mismatched = [shapes for key, *shapes in info.get("mismatched_keys", ()) if key.endswith("gene_prior.weight")]
        if mismatched:
            saved, wanted = (tuple(shape) for shape in mismatched[0])
            raise ValueError(
                f"The checkpoint's prior gene embedding is {saved} but this model needs {wanted} (vocab_size, "
                "hidden_size); ignore_mismatched_sizes would leave it at zeros. Load with the checkpoint's own "
                "vocab_size and hidden_size, or build a prior for the new vocabulary (`scgene build-prior`)."
            )
        prior = model.get_gene_prior()
        if not torch.isfinite(prior).all():
            raise ValueError("The checkpoint's prior gene embedding contains NaN or infinite values: the file is corrupt "
                             "or the prior was built from broken data. Rebuild it (`scgene build-prior`).")
        if not prior.any():
            logger.warning("The checkpoint's prior gene embedding is all zeros: it was never set before saving, so the "
                           "model has no gene identities. Set one with `model.set_gene_prior(matrix)`.")
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; when the code ships with the weights, `auto_map` names every ScGene Auto
        class, so a pretraining checkpoint also loads as `AutoModel` or `AutoModelForSequenceClassification`."""
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **HUB_AUTO_MAP}
        if not self.get_gene_prior().any():
            logger.warning("Saving a model whose prior gene embedding is all zeros (never set): it knows no gene "
                           "identities. Set the prior with `model.set_gene_prior(matrix)` first.")
        result = super().save_pretrained(save_directory, *args, **kwargs)
        # transformers writes the weights through a private temporary file (mode 0600); give them the permissions
        # of any other file the user writes, so a shared or published checkpoint can be read by others
        umask = os.umask(0)
        os.umask(umask)
        for weights in Path(save_directory).glob("model*.safetensors"):  # model.safetensors or its shards
            os.chmod(weights, 0o666 & ~umask)
        return result

    def get_input_embeddings(self) -> nn.Embedding:
        """The input embedding: the frozen prior gene embedding (`ScGenePriorEmbedding`)."""
        return self.base_model.embeddings.gene_prior

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embeddings.gene_prior = value

    def resize_token_embeddings(self, *args, **kwargs):
        raise ValueError(
            "ScGene's vocabulary is the rows of its frozen prior gene embedding: resizing would leave new genes without "
            "a prior. Build a prior for the new vocabulary (`scgene build-prior`) and create the model with its "
            "vocab_size, then `model.set_gene_prior(matrix)`."
        )

    def get_gene_prior(self) -> torch.Tensor:
        """The frozen prior gene embedding buffer, (vocab_size, hidden_size) fp32."""
        return self.base_model.embeddings.gene_prior.weight

    @torch.no_grad()
    def set_gene_prior(self, matrix) -> None:
        """Copy a (vocab_size, hidden_size) matrix, rows aligned to the tokenizer's gene ids, into the prior buffer."""
        matrix = torch.as_tensor(matrix, dtype=torch.float32)
        buffer = self.get_gene_prior()
        if tuple(matrix.shape) != tuple(buffer.shape):
            raise ValueError(
                f"The prior must be (vocab_size, hidden_size) = {tuple(buffer.shape)}, got {tuple(matrix.shape)}. "
                "Align it to the tokenizer's vocabulary (one row per id, zeros for special tokens) and build it with "
                f"hidden_size={buffer.shape[1]}."
            )
        if not torch.isfinite(matrix).all():
            raise ValueError("The prior contains NaN or infinite values.")
        buffer.copy_(matrix.to(buffer.device))


# ----------------------------------------------------------------------------------------------------------------------
# Base model (embedding / cluster mode)
# ----------------------------------------------------------------------------------------------------------------------


def check_inputs(config: ScGeneConfig, input_ids, expression_values, expression_bins, attention_mask) -> None:
    """Clear errors for inputs of the wrong shape, dtype or range."""
    if input_ids is None or expression_values is None:
        raise ValueError("ScGene needs both `input_ids` (gene ids) and `expression_values`.")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"`input_ids` must be an integer tensor (batch, genes); got {input_ids.dtype} {tuple(input_ids.shape)}.")
    if not expression_values.dtype.is_floating_point:
        raise ValueError(f"`expression_values` must be floating point (log1p expression); got {expression_values.dtype}.")
    if input_ids.shape[1] == 0:
        raise ValueError(f"The batch has no tokens (input_ids of shape {tuple(input_ids.shape)}): each cell needs at "
                         "least its <cls> token or one gene; tokenize the cells with ScGeneTokenizer.")
    torch_compilable_check(torch.isfinite(expression_values).all(), lambda: (
        "`expression_values` contain NaN or infinite values: they would make every embedding NaN. Check the input "
        "matrix (the tokenizer rejects such values) or what was computed from it."))
    named = {"expression_values": expression_values, "expression_bins": expression_bins, "attention_mask": attention_mask}
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
            raise ValueError(f"`{name}` has shape {tuple(tensor.shape)} but `input_ids` has {tuple(input_ids.shape)}.")
    torch_compilable_check(((input_ids >= 0) & (input_ids < config.vocab_size)).all(), lambda: (
        f"`input_ids` must lie in [0, {config.vocab_size}); got [{input_ids.min()}, {input_ids.max()}]."))
    if config.expression_encoding == "binned":
        if expression_bins is None or expression_bins.dtype.is_floating_point:
            raise ValueError("expression_encoding='binned' needs integer `expression_bins` (the tokenizer's bins).")
        torch_compilable_check(((expression_bins >= 0) & (expression_bins <= config.n_bins)).all(), lambda: (
            f"`expression_bins` must lie in [0, {config.n_bins}] ({config.n_bins} is the mask bin)."))


def additive_key_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, G) 1/0 -> (B, 1, 1, G) additive mask over keys, or None when nothing is padded (fastest kernels; in eager
    mode only: a traced graph keeps the mask, whatever the example batch held)."""
    if attention_mask is None or (not is_tracing(attention_mask) and bool(attention_mask.all())):
        return None
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


class ScGeneModel(ScGenePreTrainedModel):
    """The ScGene encoder: gene-level states `(B, G, d)` and a cell embedding `(B, d)` (CLS or masked mean)."""

    def __init__(self, config: ScGeneConfig):
        super().__init__(config)
        config.validate_scgene()  # again: from_pretrained(path, name=value) sets overrides after the config's checks
        self.embeddings = ScGeneEmbeddings(config)
        self.encoder = ScGeneDualBranchEncoder(config) if config.encoder_type == "dual_branch" else ScGeneEncoder(config)
        self.post_init()

    def pool(self, hidden_states, input_ids, attention_mask, expression_values=None) -> torch.Tensor:
        """The cell embedding `(B, d)`: the `<cls>` state, or the mean of the gene states, plain (`"mean"`) or weighted
        by each gene's expression value (`"weighted_mean"`; masked values, below 0, weigh nothing); plus
        `prior_readout_weight` times the prior read the same way (`pool_prior`)."""
        if self.config.pooling == "cls":
            torch_compilable_check((input_ids[:, 0] == self.config.cls_token_id).all(), (
                "pooling='cls' needs the <cls> token at position 0 of every cell: tokenize with the <cls> token added, "
                "or use a config with pooling='mean'."))
            pooled = hidden_states[:, 0]
        else:
            pooled = self.gene_mean(hidden_states, input_ids, attention_mask, expression_values)
        if self.config.prior_readout_weight:
            pooled = pooled + self.config.prior_readout_weight * self.pool_prior(input_ids, attention_mask, expression_values)
        return pooled

    def pool_prior(self, input_ids, attention_mask, expression_values=None) -> torch.Tensor:
        """The prior alone, pooled over the cell's genes `(B, d)`: their rows of the frozen prior, averaged as the gene
        states are (with `<cls>` pooling: plain mean)."""
        prior_rows = self.embeddings.gene_prior(input_ids).to(self.dtype)  # (B, G, d)
        return self.gene_mean(prior_rows, input_ids, attention_mask, expression_values)

    def gene_mean(self, states, input_ids, attention_mask, expression_values=None) -> torch.Tensor:
        """(B, G, d) -> (B, d): the mean over gene tokens (not `<cls>`, not padding), weighted by expression with
        `pooling="weighted_mean"`."""
        keep = input_ids != self.config.cls_token_id
        if attention_mask is not None:
            keep = keep & attention_mask.bool()
        keep = keep.to(states.dtype)
        if self.config.pooling == "weighted_mean":
            keep = keep * expression_values.to(states.dtype).clamp(min=0)
        keep = keep.unsqueeze(1)  # (B, 1, G)
        # (B, 1, G) @ (B, G, d): the masked sum without a (B, G, d) temporary
        return torch.bmm(keep, states).squeeze(1) / keep.sum(-1).clamp(min=1e-6)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        expression_values: torch.FloatTensor | None = None,
        expression_bins: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_regulation: bool = False,
        **kwargs,
    ) -> ScGeneModelOutput:
        check_inputs(self.config, input_ids, expression_values, expression_bins, attention_mask)
        if output_regulation and self.config.encoder_type != "dual_branch":
            raise ValueError("output_regulation=True needs encoder_type='dual_branch'.")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(f"output_attentions=True: the {self.config._attn_implementation} attention returns no "
                                "weights (None per layer). Load the model with attn_implementation='eager' for them.")

        dtype = self.dtype
        expression_values = expression_values.to(dtype)
        identity, expression = self.embeddings(input_ids, expression_values, expression_bins)  # (B, G, d) each
        attention_mask_4d = additive_key_mask(attention_mask, dtype)
        gene_attention_mask = attention_mask_4d
        if self.config.encoder_type == "dual_branch" and self.shares_gene_panel(input_ids, attention_mask):
            identity = identity[:1]  # the gene branch runs once for the whole batch
            gene_attention_mask = None if attention_mask_4d is None else attention_mask_4d[:1]

        hidden_states, pooled_states, all_hidden, all_attn, all_regulation = self.encoder(
            identity, expression, attention_mask_4d, gene_attention_mask,
            output_hidden_states, output_regulation, self.config.pooling_layer,
        )
        return ScGeneModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=self.pool(pooled_states, input_ids, attention_mask, expression_values),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            regulation=tuple(all_regulation) if output_regulation else None,
        )

    @staticmethod
    def shares_gene_panel(input_ids, attention_mask) -> bool:
        """True when every cell of the batch has the same genes (and padding) as the first. Never while tracing: a
        graph for any batch runs the gene branch per cell."""
        if is_tracing(input_ids):
            return False
        same_ids = bool((input_ids == input_ids[:1]).all())
        return same_ids and (attention_mask is None or bool((attention_mask == attention_mask[:1]).all()))


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------


def mean_per_cell(errors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`errors (B, G)` averaged over each cell's `positions (B, G)`, then over the cells that have any."""
    counts = positions.sum(dim=1)  # (B,)
    per_cell = torch.where(positions, errors, torch.zeros_like(errors)).sum(dim=1) / counts.clamp(min=1)
    has_any = (counts > 0).to(per_cell.dtype)
    return (per_cell * has_any).sum() / has_any.sum()


def regulation_prior_loss(parts: list[tuple[torch.Tensor, torch.Tensor]], known_edges: torch.Tensor) -> torch.Tensor:
    """Seed 001's biologically constrained attention: known edges pull the regulation map and signs their way.

    `known_edges (B, G, G)`: [target i, regulator j] = +1 (j activates i), -1 (represses), 0 (no known edge).
    Per layer and head: the regulation attention of each target with known regulators in the cell should fall on
    them (-log of its mass on them), and each known regulator's effective sign logit should give the edge's sign
    (binary cross-entropy, activating and repressing edges weighing the same in total: with every edge weighing the
    same, CollecTRI's 87% activating edges taught "always activate"); both averaged over layers, heads and the known
    rows / edges. 0 when no edge is known."""
    known = known_edges != 0  # (B, G, G)
    rows = known.any(dim=-1)  # (B, G): targets with a known regulator
    n_rows = rows.sum().clamp(min=1)
    activates = (known_edges > 0).float()
    represses = (known_edges < 0).float()
    n_activating, n_repressing = activates.sum(), represses.sum()
    signs_present = ((n_activating > 0).float() + (n_repressing > 0).float()).clamp(min=1)
    # per edge: 1 / (its sign's count × the signs present), so each sign present weighs 1 / signs_present in total
    edge_weights = (activates / n_activating.clamp(min=1) + represses / n_repressing.clamp(min=1)) / signs_present
    total = 0.0
    for regulation_map, sign_logits in parts:  # (B, H, G, G), (B, H, G)
        heads = regulation_map.shape[1]
        mass = (regulation_map * known.unsqueeze(1)).sum(dim=-1)  # (B, H, G)
        edge_loss = -(torch.log(mass.clamp(min=1e-6)) * rows.unsqueeze(1)).sum() / (n_rows * heads)
        edge_sign_logits = sign_logits.float().unsqueeze(2).expand_as(regulation_map)  # the regulator's, per edge
        sign_errors = F.binary_cross_entropy_with_logits(edge_sign_logits, activates.unsqueeze(1).expand_as(regulation_map),
                                                         reduction="none")
        sign_loss = (sign_errors * edge_weights.unsqueeze(1)).sum() / heads
        total = total + edge_loss + sign_loss
    return total / len(parts)


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `first` should match row i of `second` among all rows of the batch."""
    first, second = F.normalize(first.float(), dim=-1), F.normalize(second.float(), dim=-1)
    logits = first @ second.T / temperature  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ScGeneForMaskedExpression(ScGenePreTrainedModel):
    """Masked-expression pretraining (seed 000's `Linear(d, 1)` value head; plus a bin classifier when binned),
    optionally with a contrastive objective on the cell embedding.

    `labels (B, G)` hold the true values at masked positions and -100 elsewhere; the loss is `value_loss_weight` ×
    the MSE over masked positions, plus `bin_loss_weight` × cross-entropy over bins against `bin_labels` when binned,
    each averaged over a cell's masked positions, then over cells (every cell weighs the same however many genes it
    expresses, and a batch split over processes or accumulation steps gives the same loss as the whole batch),
    plus `contrastive_loss_weight` × InfoNCE between the projected cell embeddings of the (masked) input and of a
    second view of the same cells (`view_input_ids`, ... from `DataCollatorForMaskedExpression(count_views=True)`),
    plus, for the dual-branch encoder, `regulation_loss_weight` × `regulation_prior_loss` against `known_edges`
    (known edges among each cell's genes, from `DataCollatorForMaskedExpression(known_regulation=...)`).
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__(config)
        self.scgene = ScGeneModel(config)
        self.value_head = nn.Linear(config.hidden_size, 1)
        self.bin_head = nn.Linear(config.hidden_size, config.n_bins) if config.expression_encoding == "binned" else None
        self.contrastive_projection = (
            nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                          nn.Linear(config.hidden_size, config.contrastive_projection_size))
            if config.contrastive_loss_weight > 0 else None
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        expression_values=None,
        expression_bins=None,
        attention_mask=None,
        labels: torch.FloatTensor | None = None,
        bin_labels: torch.LongTensor | None = None,
        view_input_ids: torch.LongTensor | None = None,
        view_expression_values: torch.FloatTensor | None = None,
        view_expression_bins: torch.LongTensor | None = None,
        view_attention_mask: torch.Tensor | None = None,
        known_edges: torch.LongTensor | None = None,
        output_hidden_states=None,
        output_attentions=None,
        output_regulation: bool = False,
        **kwargs,
    ) -> ScGeneMaskedExpressionOutput:
        outputs = self.scgene(
            input_ids, expression_values, expression_bins, attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            output_regulation=output_regulation, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state  # (B, G, d)
        predicted_values = self.value_head(hidden_states).squeeze(-1)  # (B, G)
        bin_logits = self.bin_head(hidden_states) if self.bin_head is not None else None  # (B, G, n_bins)

        losses = {}
        if labels is not None:
            masked = labels != -100
            torch_compilable_check(masked.any(), "`labels` mark no masked position (all -100): mask some genes before "
                                   "computing a loss.")
            squared_errors = (predicted_values.float() - labels.float()).square()  # (B, G)
            losses["value_loss"] = mean_per_cell(squared_errors, masked)
            if bin_logits is not None and bin_labels is not None:
                bin_errors = F.cross_entropy(bin_logits.transpose(1, 2).float(), bin_labels, ignore_index=-100, reduction="none")
                losses["bin_loss"] = mean_per_cell(bin_errors, bin_labels != -100)
        if self.contrastive_projection is not None and labels is not None:
            if view_input_ids is None:
                raise ValueError(
                    "contrastive_loss_weight > 0 needs a second view of each cell (view_input_ids, ...): use "
                    "DataCollatorForMaskedExpression(count_views=True)."
                )
            view = self.scgene(view_input_ids, view_expression_values, view_expression_bins, view_attention_mask,
                               return_dict=True)
            # on the last layer whatever `pooling_layer` reads: the losses train the last layer
            cell = self.scgene.pool(hidden_states, input_ids, attention_mask, expression_values)  # (B, d)
            view_cell = self.scgene.pool(view.last_hidden_state, view_input_ids, view_attention_mask,
                                         view_expression_values)  # (B, d)
            losses["contrastive_loss"] = info_nce(self.contrastive_projection(cell),
                                                  self.contrastive_projection(view_cell),
                                                  self.config.contrastive_temperature)
        if self.config.regulation_loss_weight > 0 and known_edges is not None:
            identity = self.scgene.embeddings.gene_identity(input_ids, self.dtype)  # (B, G, d), as the gene branch reads
            parts = self.scgene.encoder.regulation_parts(identity, additive_key_mask(attention_mask, self.dtype))
            losses["regulation_loss"] = regulation_prior_loss(parts, known_edges)
        weights = {"value_loss": self.config.value_loss_weight, "bin_loss": self.config.bin_loss_weight,
                   "contrastive_loss": self.config.contrastive_loss_weight,
                   "regulation_loss": self.config.regulation_loss_weight}
        loss = sum(weights[name] * value for name, value in losses.items()) if losses else None
        return ScGeneMaskedExpressionOutput(
            loss=loss, **losses, predicted_values=predicted_values, bin_logits=bin_logits,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, regulation=outputs.regulation,
        )


class ScGeneClassificationHead(nn.Module):
    """Seed 000's `cls_decoder` (Linear -> ReLU -> Dropout -> Linear) on standardised features.

    Pooled embeddings share a large common offset and vary little around it, which leaves a first Linear on raw
    features badly conditioned (a full fine-tune then barely learns). `feature_mean` / `feature_std` are buffers set
    from the training cells' embeddings before fine-tuning (`set_feature_statistics`), frozen or not, and saved with
    the model; their defaults (0, 1) leave the features as they are.
    """

    def __init__(self, config: ScGeneConfig, input_size: int):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(input_size))
        self.register_buffer("feature_std", torch.ones(input_size))
        self.dense = nn.Linear(input_size, config.classifier_hidden_size)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.out_proj = nn.Linear(config.classifier_hidden_size, config.num_labels)

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Standardise with the mean and standard deviation of `features` (N, input_size), e.g. the training cells."""
        if features.ndim != 2 or features.shape[1] != self.feature_mean.shape[0] or len(features) < 2:
            raise ValueError(f"Expected at least 2 rows of {self.feature_mean.shape[0]} features, got {tuple(features.shape)}.")
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp(min=1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardised = (features - self.feature_mean) / self.feature_std
        return self.out_proj(self.dropout(self.act(self.dense(standardised))))


class ScGeneForCellClassification(ScGenePreTrainedModel):
    """Cell classification over a frozen backbone (seed 000; `freeze_backbone=False` fine-tunes everything).

    `classifier_pooling="cell"` reads the pooled cell embedding (B, d); `"gene_projection"` reproduces seed 000: each
    gene's output is projected to one number and the MLP reads the (B, num_panel_genes) vector of a fixed panel.
    """

    def __init__(self, config: ScGeneConfig):
        super().__init__(config)
        self.scgene = ScGeneModel(config)
        if config.classifier_pooling == "gene_projection":
            self.gene_projection = nn.Linear(config.hidden_size, 1)
            classifier_input = config.num_panel_genes
        else:
            self.gene_projection = None
            classifier_input = config.hidden_size
        self.classifier = ScGeneClassificationHead(config, classifier_input)
        self.post_init()
        self.set_backbone_trainable(not config.freeze_backbone)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`from_pretrained` that keeps `freeze_backbone`: loading materialises the weights as new parameters, which
        are trainable, so the freeze set in `__init__` is applied again once they are in place."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_backbone_trainable(not model.config.freeze_backbone)
        return loaded

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (seed 000's default) or unfreeze the encoder; the head always trains."""
        self.scgene.requires_grad_(trainable)

    @can_return_tuple
    def forward(
        self,
        input_ids=None,
        expression_values=None,
        expression_bins=None,
        attention_mask=None,
        labels: torch.LongTensor | None = None,
        output_hidden_states=None,
        output_attentions=None,
        output_regulation: bool = False,
        **kwargs,
    ) -> ScGeneCellClassificationOutput:
        outputs = self.scgene(
            input_ids, expression_values, expression_bins, attention_mask,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            output_regulation=output_regulation, return_dict=True,
        )
        if self.gene_projection is not None:
            if input_ids.shape[1] != self.config.num_panel_genes:
                raise ValueError(
                    f"classifier_pooling='gene_projection' reads a fixed panel of {self.config.num_panel_genes} genes, "
                    f"got {input_ids.shape[1]} tokens: tokenize with gene_selection='all' and no <cls> token."
                )
            features = self.gene_projection(outputs.last_hidden_state).squeeze(-1)  # (B, G)
        else:
            features = outputs.pooler_output  # (B, d)
        logits = self.classifier(features)  # (B, num_labels)
        # single-label (cell types), multi-label or regression, by `config.problem_type` as in transformers' heads
        loss = ForSequenceClassificationLoss(labels, logits.float(), self.config) if labels is not None else None
        return ScGeneCellClassificationOutput(
            loss=loss, logits=logits,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, regulation=outputs.regulation,
        )


__all__ = [
    "ScGenePreTrainedModel",
    "ScGeneModel",
    "ScGeneForMaskedExpression",
    "ScGeneForCellClassification",
    "ScGeneModelOutput",
    "ScGeneMaskedExpressionOutput",
    "ScGeneCellClassificationOutput",
]
