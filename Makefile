# Everything the project needs is installed from here (and by .ci/run, which calls `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench
install: $(VENV)/.installed

# torch==2.13.0 first: on our machines that is the CPU wheel on disk; the project's own range
# (torch>=2.5) is then satisfied and pulls no CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m tokencarve.demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_core.py
