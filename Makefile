# Everything the project needs is installed from here (and by .ci/run, which calls `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install system-deps demo test lint bench
install: $(VENV)/.installed system-deps

# Prometheus and its Pushgateway for the monitoring tests (Debian packages; needs root + apt-get).
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus prometheus-pushgateway >/dev/null; \
	  else echo "note: install prometheus and prometheus-pushgateway for the monitoring tests"; fi; \
	fi

# torch==2.13.0 first: on our machines that is the CPU wheel on disk; the project's own range
# (torch>=2.5) is then satisfied and pulls no CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# `make demo MODEL=models/carve-tiny-qwen`: the job on another model; a Qwen-VL one reads the native-size
# sample (data/sample-qwen: 224-448 px a side) and keeps a quarter of each image's tokens
MODEL ?=
QWEN_DEMO = $(findstring qwen,$(notdir $(MODEL)))
DEMO_ARGS = $(if $(MODEL),--model $(MODEL) --output out/captions-$(notdir $(MODEL)) \
	$(if $(QWEN_DEMO),--input data/sample-qwen --keep 0.25))
demo: install
	$(PY) jobs/caption_corpus.py $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q

# ruff: lint rules and formatting as pyproject.toml sets them (`ruff format .` fixes the latter)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/bench_core.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_serve.py
