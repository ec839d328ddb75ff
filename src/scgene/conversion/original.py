"""A faithful, pure-torch reference of seed 000's three original models, used to check conversions.

The attribute names (and so the `state_dict` keys) are those of the original checkpoints:

- `linear_in`: `Linear(1, d)` applied to `x.unsqueeze(-1)`, `x` being `(batch, input_dim)` log1p expression;
- the gene embedding (the fused prior, `(input_dim, d)` or `(batch, input_dim, d)`) is a forward *input*, added like a
  positional encoding;
- `transformer_encoder`: `nn.TransformerEncoder` of `nn.TransformerEncoderLayer(batch_first=True)` (post-LN, ReLU,
  PyTorch defaults), no final norm;
- `linear_out`: `Linear(d, 1)`, one number per gene (pretraining and classifier only);
- `cls_decoder`: `Sequential(Linear(input_dim, h), ReLU, Dropout, Linear(h, num_classes))` (classifier only).
"""

from __future__ import annotations

import torch
from torch import nn


class ConversionError(ValueError):
    """The checkpoint, gene embedding or gene list cannot be converted; the message says why and what to do."""


class OriginalBackbone(nn.Module):
    """`linear_in` + gene embedding + `transformer_encoder`, shared by the three models."""

    def __init__(self, feature_dim: int, num_layers: int, num_heads: int, dim_feedforward: int, dropout: float = 0.1):
        super().__init__()
        self.linear_in = nn.Linear(1, feature_dim)
        layer = nn.TransformerEncoderLayer(
            feature_dim, num_heads, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True
        )
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def encode(self, x: torch.Tensor, gene_embedding: torch.Tensor) -> torch.Tensor:
        """Encoder output `(batch, input_dim, d)`."""
        hidden = self.linear_in(x.unsqueeze(-1)) + gene_embedding
        return self.transformer_encoder(hidden)

    def layer_outputs(self, x: torch.Tensor, gene_embedding: torch.Tensor) -> list[torch.Tensor]:
        """The embedding output followed by each encoder layer's output, for layer-by-layer comparisons."""
        outputs = [self.linear_in(x.unsqueeze(-1)) + gene_embedding]
        for layer in self.transformer_encoder.layers:
            outputs.append(layer(outputs[-1]))
        return outputs


class ScBaseModel(OriginalBackbone):
    """Pretraining model (`scBaseModel`): returns the reconstructed expression `(batch, input_dim)`."""

    def __init__(self, feature_dim: int, num_layers: int, num_heads: int, dim_feedforward: int, dropout: float = 0.1):
        super().__init__(feature_dim, num_layers, num_heads, dim_feedforward, dropout)
        self.linear_out = nn.Linear(feature_dim, 1)

    def forward(self, x: torch.Tensor, gene_embedding: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.encode(x, gene_embedding)).squeeze(-1)


class ScBaseModelClassification(ScBaseModel):
    """Classifier (`scBaseModel_classification`): `cls_decoder` over the `(batch, input_dim)` vector made by
    `linear_out`; the backbone is frozen."""

    def __init__(
        self,
        input_dim: int,
        feature_dim: int,
        num_layers: int,
        num_heads: int,
        dim_feedforward: int,
        num_classes: int,
        hidden_dim: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__(feature_dim, num_layers, num_heads, dim_feedforward, dropout)
        for parameter in self.parameters():
            parameter.requires_grad = False
        self.cls_decoder = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
        )

    def forward(self, x: torch.Tensor, gene_embedding: torch.Tensor) -> torch.Tensor:
        return self.cls_decoder(super().forward(x, gene_embedding))


class ScBaseModelCluster(OriginalBackbone):
    """Cluster / embedding model (`scBaseModel_cluster`): no `linear_out`; returns the encoder output."""

    def forward(self, x: torch.Tensor, gene_embedding: torch.Tensor) -> torch.Tensor:
        return self.encode(x, gene_embedding)
