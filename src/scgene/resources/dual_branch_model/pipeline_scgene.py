"""`pipeline("cell-embedding")`: a ScGene checkpoint's cell embeddings through the Hugging Face pipeline API.

    from transformers import pipeline
    embedder = pipeline("cell-embedding", model="org/scgene", trust_remote_code=True)
    table = embedder(adata)  # DataFrame: one row per cell (index: obs_names), one column per embedding dimension

The pipeline runs `scgene.embed` on the whole AnnData (or .h5ad path), so the cells are batched under the same token
budget and the numbers are the same. A checkpoint published with `scgene push` carries this file and names it in
`config.custom_pipelines`, so the task also works where scgene is not installed.
"""

from __future__ import annotations

import pandas as pd
from transformers import Pipeline

from .inference import embed
from .tokenization_scgene import opened

TASK = "cell-embedding"


class CellEmbeddingPipeline(Pipeline):
    """Cell embeddings (the model's `pooler_output`) of every cell of an AnnData, as a DataFrame indexed by cell."""

    _load_feature_extractor = True  # the ScGene tokenizer is a feature extractor
    _load_tokenizer = False
    _load_image_processor = False
    _load_processor = False

    def _sanitize_parameters(self, max_tokens_per_batch=None, batch_size=None, **tokenize_kwargs):
        """Keyword arguments of a call: `max_tokens_per_batch`, `batch_size` and tokenizer settings (`max_length`,
        `gene_selection`, `layer`, `use_raw`, ...), as for `scgene.embed`."""
        batching = {"max_tokens_per_batch": max_tokens_per_batch, "batch_size": batch_size}
        return {}, {key: value for key, value in batching.items() if value is not None} | tokenize_kwargs, {}

    def preprocess(self, adata):
        """The whole AnnData (or path) is one input: `scgene.embed` reads and batches it."""
        with opened(adata) as cells:
            names = cells.obs_names.copy()
        return {"adata": adata, "obs_names": names}

    def _forward(self, inputs, **embed_kwargs):
        embeddings = embed(inputs["adata"], self.model, tokenizer=self.feature_extractor, key_added=None,
                           device=self.device, progress=False, **embed_kwargs)
        return {"embeddings": embeddings, "obs_names": inputs["obs_names"]}

    def postprocess(self, outputs):
        return pd.DataFrame(outputs["embeddings"], index=outputs["obs_names"])
