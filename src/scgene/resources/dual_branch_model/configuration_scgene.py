"""ScGene model configuration.

This file ships with every checkpoint as Hub code: it imports only transformers.
"""

from transformers import PreTrainedConfig

ENCODER_TYPES = ("standard", "dual_branch")
ATTENTION_TYPES = ("mha", "mla")
EXPRESSION_ENCODINGS = ("linear", "binned")
NORM_POSITIONS = ("post", "pre")
POOLING_MODES = ("cls", "mean", "weighted_mean")
CLASSIFIER_POOLINGS = ("cell", "gene_projection")


class ScGeneConfig(PreTrainedConfig):
    r"""
    Configuration of an ScGene model: a transformer over the genes of one cell, each gene token being the sum of a
    frozen prior gene embedding (seed 000's gene2vec + knowledge fusion, used like a positional encoding) and an
    expression embedding.

    Design switches:
        encoder_type (`"standard"` | `"dual_branch"`): seed 000's stacked encoder layers, or seed 001's gene branch +
            expression branch whose attention also receives signed regulatory attention from the gene branch.
        attention_type (`"mha"` | `"mla"`): multi-head attention, or multi-head latent attention (low-rank compressed
            K/V with `kv_lora_rank`, optional low-rank Q with `q_lora_rank`; no rotary embeddings: genes have no order).
        expression_encoding (`"linear"` | `"binned"`): `Linear(1, d)` on the value (seed 000), or
            `W_bin · onehot(bin) + alpha · value · v_cont` over `n_bins` bins (seed 001; bin `n_bins` is the mask bin).
        norm_position (`"post"` | `"pre"`): post-LN as in the seed (and `torch.nn.TransformerEncoderLayer`), or pre-LN.
        pooling (`"cls"` | `"mean"` | `"weighted_mean"`): the cell embedding is the `<cls>` token, the masked mean of
            gene tokens, or their mean weighted by expression (as the prior-only baseline weighs the prior rows).
        pooling_layer (`-1`, `-2`, ...): which layer's output the cell embedding is read from: the last (`-1`) or an
            earlier one (`-2` is the second-to-last, as Geneformer reads it), with the encoder's final LayerNorm applied.
            The pretraining losses always train the last layer, so this is a read-out choice that can be changed on a
            trained checkpoint (`from_pretrained(path, pooling_layer=-2)`).
        prior_readout_weight: the cell embedding adds this multiple of the prior read the same way (the prior rows of the
            cell's genes, pooled with the same weights): a residual read-out that keeps what the frozen prior says about
            the cell, which the transformer can lose on cells unlike its corpus. 0 (the default) reads the transformer
            alone; `scgene.fit_prior_readout_weight` sets it so that both parts spread cells equally. A read-out
            choice, like `pooling_layer`.
        classifier_pooling (`"cell"` | `"gene_projection"`): the classifier reads the pooled cell embedding, or (seed
            000 exactly) the `(batch, num_panel_genes)` vector made by projecting each gene's output to one number.
        classifier_temperature: the classifier's calibration temperature: `scgene.annotate`'s probabilities are
            `softmax(logits / classifier_temperature)` (the logits stay raw). The fine-tuning script fits it on held-out
            cells, so that a confidence threshold ("Unknown" below it) means what it says.
        value_loss_weight, bin_loss_weight, contrastive_loss_weight: the pretraining objectives' weights; the
            contrastive one pulls together the cell embeddings of two count-downsampled views of the same cell and
            apart from other cells, so the embedding keeps the cell's identity rather than its sequencing depth.
        regulation_loss_weight: dual-branch only: the weight of seed 001's biologically constrained attention, a loss
            that pulls each layer's regulation map toward known regulator -> target edges and the regulators' signs
            toward the edges' signs (`regulation_prior_loss`; the edges come from the collator's `known_regulation`).

    Example:

    ```python
    >>> from scgene import ScGeneConfig, ScGeneModel
    >>> config = ScGeneConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    >>> model = ScGeneModel(config)
    ```
    """

    model_type = "scgene"

    # vocabulary: ids 0, 1, 2 are <pad>, <cls>, <mask>; genes follow
    vocab_size: int = 26087  # the default human vocabulary shipped in src/scgene/resources (3 special + 26,084 genes)
    pad_token_id: int = 0
    cls_token_id: int = 1
    mask_token_id: int = 2
    # transformer shape
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    norm_position: str = "post"
    # design switches
    encoder_type: str = "standard"
    attention_type: str = "mha"
    expression_encoding: str = "linear"
    n_bins: int = 51
    mask_value: float = -1.0
    use_learnable_gene_embedding: bool = False
    # multi-head latent attention
    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    # dual-branch signed regulation: the per-head scale λ of the regulation map starts here
    regulation_init: float = 0.1
    # heads
    pooling: str = "cls"
    pooling_layer: int = -1
    prior_readout_weight: float = 0.0
    classifier_pooling: str = "cell"
    num_panel_genes: int | None = None
    classifier_hidden_size: int = 128
    classifier_dropout: float = 0.1
    classifier_temperature: float = 1.0
    freeze_backbone: bool = True
    # pretraining objectives (each loss is reported apart): masked value MSE, masked bin cross-entropy, and an
    # InfoNCE between the pooled embeddings of two count-downsampled views of each cell (0 = off)
    value_loss_weight: float = 1.0
    bin_loss_weight: float = 1.0
    contrastive_loss_weight: float = 0.0
    # dual-branch only: known regulator -> target edges pull the regulation map and signs (seed 001's biologically
    # constrained attention weights; 0 = off)
    regulation_loss_weight: float = 0.0
    contrastive_temperature: float = 0.02
    contrastive_projection_size: int = 64

    def __post_init__(self, **kwargs):
        self.validate_scgene()
        super().__post_init__(**kwargs)

    def validate_scgene(self):
        """Raise a clear error for impossible or unknown combinations."""
        choices = {
            "encoder_type": ENCODER_TYPES,
            "attention_type": ATTENTION_TYPES,
            "expression_encoding": EXPRESSION_ENCODINGS,
            "norm_position": NORM_POSITIONS,
            "pooling": POOLING_MODES,
            "classifier_pooling": CLASSIFIER_POOLINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ScGeneConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "n_bins")
        for name in sizes:  # e.g. "64" from a hand-edited config.json, or 0
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                quoted = "; in config.json write numbers without quotes" if isinstance(value, str) else ""
                raise ValueError(f"ScGeneConfig.{name} must be a positive integer, got {value!r}{quoted}.")
        weight = self.prior_readout_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(f"ScGeneConfig.prior_readout_weight must be a finite number >= 0, got {weight!r}.")
        layer = self.pooling_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.num_hidden_layers <= layer <= -1:
            raise ValueError(
                f"ScGeneConfig.pooling_layer must be an integer from -{self.num_hidden_layers} (the first layer) to -1 "
                f"(the last), got {layer!r}."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}); choose e.g. hidden_size={self.num_attention_heads * 64}."
            )
        special = {"pad_token_id": self.pad_token_id, "cls_token_id": self.cls_token_id, "mask_token_id": self.mask_token_id}
        if sorted(special.values()) != [0, 1, 2]:
            raise ValueError(f"Special token ids must be 0, 1 and 2 (pad, cls, mask in any order), got {special}.")
        if self.vocab_size <= 3:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed the 3 special tokens.")
        if self.expression_encoding == "binned" and self.n_bins < 2:
            raise ValueError(f"expression_encoding='binned' needs n_bins >= 2, got {self.n_bins}.")
        if self.attention_type == "mla":
            ranks = {"kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank}
            for name, rank in ranks.items():
                if rank is not None and not 0 < rank:
                    raise ValueError(f"attention_type='mla' needs a positive {name}, got {rank}.")
        if self.classifier_pooling == "gene_projection" and not self.num_panel_genes:
            raise ValueError(
                "classifier_pooling='gene_projection' reads one number per gene of a fixed panel: "
                "set num_panel_genes to the panel size (the original model's input_dim)."
            )
        for name in ("value_loss_weight", "bin_loss_weight", "contrastive_loss_weight", "regulation_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns that loss off), got {getattr(self, name)}.")
        if self.regulation_loss_weight > 0 and self.encoder_type != "dual_branch":
            raise ValueError("regulation_loss_weight > 0 constrains the dual-branch encoder's regulation map: set "
                             "encoder_type='dual_branch', or regulation_loss_weight=0.")
        for name in ("contrastive_temperature", "classifier_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["ScGeneConfig"]
