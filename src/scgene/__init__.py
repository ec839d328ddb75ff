"""scgene: the ScGene single-cell foundation model for Hugging Face Transformers.

Importing the package registers ScGene with the Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForMaskedLM`,
`AutoModelForSequenceClassification`, and `AutoFeatureExtractor` for the tokenizer), and marks the classes so that `save_pretrained` writes the model code and an
`auto_map` next to the weights: a checkpoint then also loads with `trust_remote_code=True` where scgene is not installed.
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_scgene import ScGeneConfig
from .evaluation import evaluate
from .gene_regulation import collectri, regulation, transcription_factors
from .inference import (
    DEFAULT_CHECKPOINT,
    DEFAULT_REGULATION_CHECKPOINT,
    annotate,
    embed,
    embed_genes,
    gene_prior,
)
from .label_transfer import transfer_labels
from .modeling_scgene import (
    ScGeneCellClassificationOutput,
    ScGeneForCellClassification,
    ScGeneForMaskedExpression,
    ScGeneMaskedExpressionOutput,
    ScGeneModel,
    ScGeneModelOutput,
    ScGenePreTrainedModel,
)
from .perturbation import PerturbationResult, adapt_to_cells, perturb
from .pipeline_scgene import TASK as PIPELINE_TASK
from .pipeline_scgene import CellEmbeddingPipeline
from .prior_readout import fit_prior_readout_weight, fit_prior_readout_weight_on_tokens
from .regulation_probe import prior_regulation
from .screen_prediction import ScreenPrediction, predict_from_screen
from .tokenization_scgene import ScGeneTokenizer

__version__ = "0.1.0"

AutoConfig.register(ScGeneConfig.model_type, ScGeneConfig, exist_ok=True)
for auto_class, model_class in (
    (AutoModel, ScGeneModel),
    (AutoModelForMaskedLM, ScGeneForMaskedExpression),
    (AutoModelForSequenceClassification, ScGeneForCellClassification),
):
    auto_class.register(ScGeneConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)
ScGeneConfig.register_for_auto_class()
# the tokenizer turns numbers (an AnnData) into a BatchFeature, the feature-extractor pattern (as for audio)
AutoFeatureExtractor.register(ScGeneConfig, ScGeneTokenizer, exist_ok=True)
ScGeneTokenizer.register_for_auto_class("AutoFeatureExtractor")
# pipeline("cell-embedding", model=...) with scgene imported; published checkpoints also carry it (scgene.hub)
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=CellEmbeddingPipeline, pt_model=AutoModel)

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_REGULATION_CHECKPOINT",
    "embed",
    "annotate",
    "fit_prior_readout_weight",
    "fit_prior_readout_weight_on_tokens",
    "transfer_labels",
    "regulation",
    "prior_regulation",
    "collectri",
    "transcription_factors",
    "perturb",
    "adapt_to_cells",
    "PerturbationResult",
    "predict_from_screen",
    "ScreenPrediction",
    "embed_genes",
    "gene_prior",
    "evaluate",
    "ScGeneConfig",
    "ScGeneTokenizer",
    "ScGenePreTrainedModel",
    "ScGeneModel",
    "ScGeneForMaskedExpression",
    "ScGeneForCellClassification",
    "ScGeneModelOutput",
    "ScGeneMaskedExpressionOutput",
    "ScGeneCellClassificationOutput",
    "CellEmbeddingPipeline",
]
