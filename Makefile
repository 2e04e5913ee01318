# `make demo` and `make test` each set up .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Azurite (the Azure Blob emulator the abfs:// tests start) comes from npm, kept inside the repo.
AZURITE_VERSION := 3.37.0
TOOLS := .tools
AZURITE := $(TOOLS)/.azurite-$(AZURITE_VERSION)
# Prometheus and promtool (deploy/monitoring tests, a real server for the integration tests) from the
# Debian package of this machine's release, unpacked into the repo: no root, no system install.
PROMETHEUS := $(TOOLS)/prometheus
PROMETHEUS_STAMP := $(TOOLS)/.prometheus
# Deploy tests: checkov in its own venv (its boto3 pin conflicts with constraints.txt's), and Debian's
# cloud-init with python3-configobj unpacked into .tools for `cloud-init schema`: no root, no system install.
CHECKOV_VERSION := 3.3.30
CHECKOV := $(TOOLS)/checkov
CHECKOV_STAMP := $(CHECKOV)/.installed-$(CHECKOV_VERSION)
CLOUD_INIT := $(TOOLS)/cloud-init
CLOUD_INIT_STAMP := $(TOOLS)/.cloud-init
# The MLflow tracking server the tracking tests start, in its own venv (mlflow's pyarrow pin conflicts with
# constraints.txt's; the client, mlflow-skinny, is in .venv).
MLFLOW := $(TOOLS)/mlflow
MLFLOW_STAMP := $(MLFLOW)/.installed
# DeepSpeed's compiled ops (CPU shared-memory comm) are kept between runs in
# ~/.cache/shardrun/torch_extensions/<this environment> (shardrun/trainer/extensions.py); bench/ uses it too.

.PHONY: setup demo test lint bench clean

setup: $(STAMP) $(AZURITE) $(PROMETHEUS_STAMP) $(CHECKOV_STAMP) $(CLOUD_INIT_STAMP) $(MLFLOW_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,hf,lora,mlflow,tensorboard,wandb]'
	touch $(STAMP)

$(AZURITE):
	@command -v npm >/dev/null || { echo "make: npm (Node.js 18 or newer) is needed to install Azurite $(AZURITE_VERSION) for the tests" >&2; exit 1; }
	npm install --prefix $(TOOLS) --no-audit --no-fund --ignore-scripts --loglevel=error azurite@$(AZURITE_VERSION)
	test -x $(TOOLS)/node_modules/.bin/azurite-blob
	touch $@

$(PROMETHEUS_STAMP):
	@command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "make: apt-get and dpkg (Debian or Ubuntu) are needed to fetch Prometheus for the tests; elsewhere put prometheus and promtool 2.42 or newer in $(PROMETHEUS)/usr/bin and touch $@" >&2; exit 1; }
	rm -rf $(PROMETHEUS) $(TOOLS)/deb && mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && apt-get download -qq prometheus || { echo "make: apt-get download prometheus failed: the package index may be stale or lack it (sudo apt-get update)" >&2; exit 1; }
	dpkg -x $(TOOLS)/deb/prometheus_*.deb $(PROMETHEUS)
	rm -rf $(TOOLS)/deb
	$(PROMETHEUS)/usr/bin/promtool --version
	$(PROMETHEUS)/usr/bin/prometheus --version
	touch $@

$(CHECKOV_STAMP): deploy/azure/checkov-constraints.txt
	rm -rf $(CHECKOV)
	$(PYTHON) -m venv $(CHECKOV)
	$(CHECKOV)/bin/pip install --quiet --disable-pip-version-check -c deploy/azure/checkov-constraints.txt checkov==$(CHECKOV_VERSION)
	$(CHECKOV)/bin/checkov --version
	touch $@

$(MLFLOW_STAMP): tests/mlflow-server-constraints.txt
	rm -rf $(MLFLOW)
	$(PYTHON) -m venv $(MLFLOW)
	$(MLFLOW)/bin/pip install --quiet --disable-pip-version-check -c tests/mlflow-server-constraints.txt mlflow
	$(MLFLOW)/bin/mlflow --version
	touch $@

$(CLOUD_INIT_STAMP): | $(STAMP)
	@command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "make: apt-get and dpkg (Debian or Ubuntu) are needed to fetch cloud-init for the tests; elsewhere unpack Debian's cloud-init and python3-configobj packages into $(CLOUD_INIT) and touch $@" >&2; exit 1; }
	rm -rf $(CLOUD_INIT) $(TOOLS)/deb-cloud-init && mkdir -p $(TOOLS)/deb-cloud-init
	cd $(TOOLS)/deb-cloud-init && apt-get download -qq cloud-init python3-configobj || { echo "make: apt-get download cloud-init failed: the package index may be stale or lack it (sudo apt-get update)" >&2; exit 1; }
	for deb in $(TOOLS)/deb-cloud-init/*.deb; do dpkg -x $$deb $(CLOUD_INIT); done
	rm -rf $(TOOLS)/deb-cloud-init
	PYTHONPATH=$(CLOUD_INIT)/usr/lib/python3/dist-packages $(BIN)/python $(CLOUD_INIT)/usr/bin/cloud-init --version
	touch $@

# The demo needs only the venv: no Azurite, Prometheus or checkov, so no npm or apt-get either.
demo: $(STAMP)
	$(BIN)/shardrun run examples/gpt-stdlib.yaml --fresh

# Everything but the benchmark scripts' own end-to-end checks (marker bench), which `make bench` runs.
# (Its setup steps side by side, make -j4, took as long as one after the other on 2 cores.)
test: setup
	$(BIN)/pytest -ra --durations=25 -m "not bench"

# CPU benchmarks (results appended to docs/benchmarks.md); they need the bench extra. First the scripts'
# quick end-to-end checks. `make bench GPU=1` adds bench/gpu.py on this machine's GPU (on a lent GPU
# machine, see bench/gpu.py's docstring). Each prints its table; run one alone with --help for its options.
bench: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,hf,lora,mlflow,tensorboard,wandb,bench]'
	$(BIN)/pytest -q -m bench tests/integration/test_bench_cpu.py
	$(BIN)/python bench/overhead.py --record
	$(BIN)/python bench/overhead.py --size llama --record
	$(BIN)/python bench/startup.py --record
	$(BIN)/python bench/checkpoint.py --record
	$(BIN)/python bench/data.py --record
	$(BIN)/python bench/metrics.py --record
	$(BIN)/python bench/hf_load.py --record
	$(BIN)/python bench/prepare.py --record
	$(if $(GPU),$(BIN)/python bench/gpu.py --zero-stage 0,1 --compile both --record)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info .pytest_cache
