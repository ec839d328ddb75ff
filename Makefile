# Two commands: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo install bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Install the CPU build of torch first, so the package's torch range is already satisfied and pip
# never pulls a CUDA build; then the package with its dev extras.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 tests

# The main job on the PBMC 3k data shipped in tests/data: vocabulary, tokenize, build the prior, pretrain,
# classify cell types (frozen backbone) against a logistic-regression baseline. Outputs in outputs/demo.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python examples/demo.py --out outputs/demo

bench: $(STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/coexpression.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/corpus.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench conversion scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
