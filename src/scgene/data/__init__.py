"""Training-side data utilities (not shipped to the Hub): collators and the `datasets` export."""

from .collators import (
    DataCollatorForCellClassification,
    DataCollatorForMaskedExpression,
    KnownRegulation,
    pad_features,
)
from .export import export_dataset

__all__ = ["DataCollatorForCellClassification", "DataCollatorForMaskedExpression", "KnownRegulation", "export_dataset", "pad_features"]
