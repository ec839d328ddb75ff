"""Stands in for transformers' `tests/generation/test_utils.py` (not in the source distribution). ScGene does not
generate; `ModelTesterMixin` only checks that a tester of a non-generating model does not inherit this mixin."""


class GenerationTesterMixin:
    pass
