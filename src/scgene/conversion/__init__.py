"""Conversion of seed 000's original checkpoints to Hugging Face checkpoints.

Layout: the logic lives in the package, so that both `scgene convert` (`scgene.commands.convert`) and the
repository script `conversion/convert_scgene_original_to_hf.py` import it; the parity check it runs needs the
reference implementation of the original models, which therefore lives here too (`original.py`).

- `original`: pure-torch reference of `scBaseModel`, `scBaseModel_classification`, `scBaseModel_cluster`;
- `original_to_hf`: reading, size inference, the key table, strict loading, atomic writing;
- `parity`: fixed inputs like the original's `x`, layer-by-layer comparison, the parity report;
- `model_card`: the model card draft written next to the converted checkpoint.
"""

from scgene.conversion.original_to_hf import (
    HEAD_TABLES,
    KEY_TABLE,
    PARITY_CELLS,
    PARITY_TOLERANCE,
    ConversionError,
    ConversionResult,
    convert,
    format_parity_report,
)

__all__ = [
    "HEAD_TABLES",
    "KEY_TABLE",
    "PARITY_CELLS",
    "PARITY_TOLERANCE",
    "ConversionError",
    "ConversionResult",
    "convert",
    "format_parity_report",
]
