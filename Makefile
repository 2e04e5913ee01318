# `make demo` and `make test` each set up .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DeepSpeed's compiled ops (CPU shared-memory comm) are kept here between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/shardrun/torch_extensions

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/shardrun run examples/gpt-stdlib.yaml --fresh

test: setup
	$(BIN)/pytest -ra

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
