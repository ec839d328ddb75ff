"""Stands in for transformers' `tests/exporters/test_export.py`, which the source distribution does not ship.

Its mixin drives ONNX / OpenVINO / TensorRT / ExecuTorch exporters that scgene does not target; `torch.export` and
`torch.compile(fullgraph=True)` of every ScGene class are tested in `tests/test_transformers_common.py` instead.
"""


class ExportTesterMixin:
    pass
