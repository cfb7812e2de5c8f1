# llmpack developer entry points. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmpack-installed
PYTEST_ARGS ?=

.PHONY: install demo test export-7b-shape bench-model bench-decode-paths bench-serve gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch (on local disk here); never a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/llm-export build --model demo --out artifacts/demo
	$(BIN)/llm-export verify artifacts/demo
	$(BIN)/llm-serve infer artifacts/demo '{"prompt": "Tell me a story about a llama.", "max_tokens": 32, "temperature": 0}'

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real size: random weights in the exact Llama-2-7b-chat shape, exported in fp16 (needs ~14 GB disk).
export-7b-shape: install
	$(BIN)/python -m llmpack.export.random_checkpoint --shape llama2-7b --dtype float16 \
	    --out artifacts/.sources/llama2-7b-shape
	/usr/bin/time -v -o artifacts/export-7b-shape.time $(BIN)/llm-export build \
	    --model artifacts/.sources/llama2-7b-shape --out artifacts/llama2-7b-shape --dtype fp16
	grep -E "Maximum resident|Elapsed" artifacts/export-7b-shape.time

# Benchmark model: random weights in the stories110M shape (hidden 768, 12 layers, vocab 32000), fp32.
bench-model: install
	$(BIN)/python -m llmpack.export.random_checkpoint --shape stories110m --out artifacts/.sources/stories110m-shape
	$(BIN)/llm-export build --model artifacts/.sources/stories110m-shape --out artifacts/bench-110m

bench-decode-paths: bench-model
	$(BIN)/python bench/decode_paths.py artifacts/bench-110m

bench-serve: bench-model
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m

# On a machine with an NVIDIA GPU, TensorRT and onnxruntime-gpu (see README, GPU): engines for the demo and
# stories260k models, parity of each backend with the CPU reference, TTFT, tokens/s and GPU memory.
# Anywhere else it exits 2 with one line saying what is missing.
gpu-check: install
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf artifacts build dist *.egg-info
