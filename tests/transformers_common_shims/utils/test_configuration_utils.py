"""Stands in for transformers' `tests/utils/test_configuration_utils.py` (not in the source distribution).

`ConfigTester` sets each of these `PreTrainedConfig` attributes to a non-default value and checks that the config
keeps it. The values are scgene's own choice.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "chunk_size_feed_forward": 7,
    "architectures": ["ScGeneModel"],
    "id2label": {0: "B cell", 1: "T cell"},
    "label2id": {"B cell": 0, "T cell": 1},
    "problem_type": "single_label_classification",
    "dtype": "float16",
}
