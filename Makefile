# Two commands: `make test` and `make demo`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: test demo install bench lint clean lock test-latest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

LOCK := requirements.lock
PIP_VERSION := 26.3

# Install the CPU build of torch first, so no later step can pull a CUDA build; then exactly the locked versions of
# every dependency (requirements.lock, tested by `make test`), then the package itself without resolving anything.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet "pip==$(PIP_VERSION)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# transformers' common model tests come from the sdist of the installed transformers (tests/fetch_transformers_tests.py)
test: $(STAMP)
	$(BIN)/python tests/fetch_transformers_tests.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

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

# Refresh requirements.lock: resolve the newest versions pyproject.toml allows in a fresh venv (torch pinned to the
# CPU build) and write them down. Run `make test` after it and commit the lock with the result.
lock: | $(BIN)/python
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet "pip==$(PIP_VERSION)" "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > .venv-lock/torch-constraint.txt
	.venv-lock/bin/pip install --quiet -c .venv-lock/torch-constraint.txt -e ".[dev]"
	( echo "# Exact versions that \`make test\` installs and tests. Refresh with \`make lock\` (then run make test)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed -e 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' ) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf .venv-lock

# The suite against the newest versions the pyproject ranges allow today (a separate venv, torch kept at TORCH_SPEC).
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet "pip==$(PIP_VERSION)" "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > .venv-latest/torch-constraint.txt
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt -e ".[dev]"
	.venv-latest/bin/pip freeze --exclude-editable | diff $(LOCK) - || true
	.venv-latest/bin/python tests/fetch_transformers_tests.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv-latest/bin/python -m pytest -q -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV) .venv-lock .venv-latest build *.egg-info src/*.egg-info
