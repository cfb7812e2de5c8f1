# llmpack developer entry points. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmpack-installed
PYTEST_ARGS ?=
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?=
SOAK_SECONDS ?= 180

.PHONY: bench-7b bench-cluster bench-speculate gpu-install gpu-standin bench-llama-server bench-served install demo test fuzz soak export-7b-shape bench-model bench-decode-paths bench-serve bench-chat bench-huge-pages bench-int4-kernel bench-step-costs gpu-check clean bench bench-variants bench-peers

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel of torch (on local disk here); never a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# `cpu`: the CPU build of ONNX Runtime (pyproject: it and `gpu` are alternatives, never both).
	# `cluster` (ray[serve]) for the Ray Serve tests; never in the `serve` extra or the bare install.
	$(BIN)/pip install -q -e ".[export,serve,cpu,dev,cluster]"
	touch $(STAMP)

install: $(STAMP)

# The shipped stories260K (a real trained tiny Llama, MIT): built, verified against PyTorch, and asked for a story.
demo: install
	$(BIN)/llm-export build --model stories260k --out artifacts/stories260k
	$(BIN)/llm-export verify artifacts/stories260k
	$(BIN)/llm-serve infer artifacts/stories260k '{"prompt": "Once upon a time", "raw": true, "max_tokens": 64, "temperature": 0}'

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The API fuzzed longer than the default suite does: schemathesis over the server's /openapi.json,
# FUZZ_EXAMPLES cases per route and phase, a fresh seed unless FUZZ_SEED is given (the output names it);
# no per-test time limit (the default suite has 300 s, pyproject).
fuzz: install
	LLMPACK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LLMPACK_FUZZ_SEED=$(FUZZ_SEED) \
	    $(BIN)/python -m pytest -q -s --timeout=0 tests/test_hostile_api.py -k schemathesis

# Mixed traffic against the demo artifact for SOAK_SECONDS (loopback only, self-terminating); exit 1 on a
# failed criterion. Writes bench/results/soak-DATE.md.
soak: install
	$(BIN)/llm-export build --model demo --out artifacts/demo
	$(BIN)/python bench/soak.py artifacts/demo --duration $(SOAK_SECONDS)

# The real size: random weights in the exact Llama-2-7b-chat shape, exported in fp16 (needs ~14 GB disk).
export-7b-shape: install
	$(BIN)/python -m llmpack.export.random_checkpoint --shape llama2-7b --dtype float16 \
	    --out artifacts/.sources/llama2-7b-shape
	/usr/bin/time -v -o artifacts/export-7b-shape.time $(BIN)/llm-export build \
	    --model artifacts/.sources/llama2-7b-shape --out artifacts/llama2-7b-shape --dtype fp16
	grep -E "Maximum resident|Elapsed" artifacts/export-7b-shape.time

# Ray Serve (the `cluster` extra): `llm-serve run` vs 1 and 2 replicas of stories260k, prefix affinity on and off
# (~5 min here, niced). Ray runs only inside a loopback-only network namespace (root; ../shared/tools/loopback-netns,
# else unshare): elsewhere it binds to the machine's other addresses. Writes bench/results/cluster-DATE.md.
NETNS := $(if $(wildcard ../shared/tools/loopback-netns),../shared/tools/loopback-netns,\
	unshare --net --fork bash -c 'ip link set lo up && exec "$$@"' netns)
bench-cluster: install
	$(BIN)/llm-export build --model stories260k --out artifacts/stories260k
	RAY_USAGE_STATS_ENABLED=0 nice -n 10 $(NETNS) $(BIN)/python bench/cluster.py artifacts/stories260k

# Benchmark model: random weights in the stories110M shape (hidden 768, 12 layers, vocab 32000), fp32.
bench-model: install
	$(BIN)/python -m llmpack.export.random_checkpoint --shape stories110m --out artifacts/.sources/stories110m-shape
	$(BIN)/llm-export build --model artifacts/.sources/stories110m-shape --out artifacts/bench-110m --graph standard

bench-decode-paths: bench-model
	$(BIN)/python bench/decode_paths.py artifacts/bench-110m

# Continuous batching under 1/4/8/16 streaming clients: the ort-fused fp32 artifact (in-place KV cache, mixed
# decode/prefill steps, prefix cache: the CPU serving path), the same without the prefix cache (every request
# computes its prompt), without either, the standard graph (left-padded batches) and the engine in process.
bench-serve: bench-model
	$(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-fp32 --graph ort-fused
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m-fused-fp32
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m-fused-fp32 --no-prefix-cache --label=-no-prefix-cache
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m-fused-fp32 --no-prefix-cache --no-mixed-steps \
	    --label=-no-prefix-cache-no-mixed-steps
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m --label=-standard
	$(BIN)/python bench/serve_bench.py artifacts/bench-110m-fused-fp32 --in-process --label=-engine

# Time to first token along a 6-turn chat, prefix cache on and off (README, prefix caching).
bench-chat: bench-model
	$(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-fp32 --graph ort-fused
	$(BIN)/python bench/chat_turns.py artifacts/bench-110m-fused-fp32

# Batch-1 decode on 4 KiB pages vs 2 MiB pages, each process its own before/after (README, huge pages).
bench-huge-pages: bench-variants
	$(BIN)/python bench/huge_pages_ab.py artifacts/bench-110m-fused-fp32 artifacts/bench-110m-fused-int4 artifacts/bench-110m

# The 4-bit MatMulNBits kernel alone by block size and zero points, in the 110M and 7B shapes (README, the
# quantization defaults); random weights made in process, nothing to download or build first.
bench-int4-kernel: install
	$(BIN)/python bench/int4_kernel.py --shape stories110m --label=-110m
	$(BIN)/python bench/int4_kernel.py --shape llama2-7b --layers 3 --rounds 5 --steps 5 --label=-7b

# Prompt-lookup speculative decoding: acceptance and decode tok/s off vs ngram (and off vs off: the noise) on
# stories260k (trained), in the engine and through `llm-serve run`; what a step checking k tokens costs against one
# decode step at bench-110m size, fp32 and int4; bench/results/speculation-*.md (~10 minutes once built).
bench-speculate: bench-model
	$(BIN)/llm-export build --model stories260k --out artifacts/stories260k
	for q in fp32 int4; do $(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-$$q \
	    --graph ort-fused $$( [ $$q = fp32 ] || echo --quant $$q ) || exit 1; done
	$(BIN)/python bench/speculation.py --acceptance artifacts/stories260k \
	    --cost artifacts/bench-110m-fused-fp32 artifacts/bench-110m-fused-int4 --batch-cost artifacts/bench-110m-fused-fp32 \
	    --served artifacts/stories260k artifacts/bench-110m-fused-fp32 artifacts/bench-110m-fused-int4

# What one step costs by prompt chunk, batch and cache capacity (README, continuous batching).
bench-step-costs: bench-model
	$(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-fp32 --graph ort-fused
	$(BIN)/python bench/step_costs.py artifacts/bench-110m-fused-fp32

# GPU machines get their own venv with the `gpu` extra, never `make install`'s: that one pins the CPU torch wheel
# and the CPU onnxruntime, which would shadow onnxruntime-gpu. --system-site-packages lets a CUDA torch already
# on the machine satisfy the export extra's pin.
GPU_VENV ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.llmpack-gpu-installed
GPU_CHECK_ARGS ?=

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q -e ".[export,serve,gpu]"
	touch $(GPU_STAMP)

gpu-install: $(GPU_STAMP)

# Each GPU backend that can run here (TensorRT, ONNX Runtime CUDA; each gated on its own) against the CPU
# reference on stories260k (the gate; --stories PATH for another copy) and the demo model (reported): parity,
# batched vs alone, TTFT, tokens/s, GPU memory; TensorRT's verbose build log and layer JSON beside the artifacts.
# Exits 2 with one line per backend when none can run. GPU_CHECK_ARGS="--stories DIR more/checkpoints".
gpu-check: gpu-install
	$(GPU_VENV)/bin/python bench/gpu_check.py $(GPU_CHECK_ARGS)

# The device KV path on a GPU without TensorRT: bench/gpu_standin.py drives the real DeviceKvBackend + CudaDevice
# with a stand-in engine (the standard graph's ops on torch CUDA tensors, at the raw device addresses) against the
# ONNX Runtime CPU backend. Installs nothing: it runs from the source tree on STANDIN_PYTHON, which must have
# torch (CUDA), numpy, onnx, onnxruntime and cuda-python, as the lent GPU machines do. ≤ 6 minutes; writes
# bench/results/gpu-standin-<date>.md.
STANDIN_PYTHON ?= python3
STANDIN_ARGS ?=
gpu-standin:
	$(STANDIN_PYTHON) bench/gpu_standin.py --device cuda $(STANDIN_ARGS)

# `make bench`: llmpack (standard and ort-fused graphs, fp32/int8/int4) and its peers on bench-110m, each in
# its own process, alternating over 5 rounds; writes bench/results/<date>.md (README "Performance on CPU").
SRC_110M := artifacts/.sources/stories110m-shape
PEERS := artifacts/.peers
GENAI := $(PEERS)/genai/bin/python

bench-variants: bench-model
	$(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-fp32 --graph ort-fused
	for q in int8 int4; do \
	    $(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-std-$$q --graph standard --quant $$q && \
	    $(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-$$q --graph ort-fused --quant $$q \
	    || exit 1; done

# Peers are dev-only: their own venv under artifacts/.peers, never a dependency of llmpack.
# onnxruntime-genai 0.18.0's builder needs onnx-ir (undeclared) and onnxruntime >= 1.31 (pinned to ours).
$(GENAI):
	$(PYTHON) -m venv $(PEERS)/genai
	$(PEERS)/genai/bin/pip install -q onnxruntime-genai==0.18.0 onnx-ir onnxruntime==1.31.1 torch==2.13.0 \
	    transformers sentencepiece protobuf

# llama.cpp through llama-cpp-python 0.3.36, compiled here from its sdist (CPU only, native, OpenMP, no BLAS;
# ~10 min on 2 busy cores, niced). The unpacked sdist also gives the HF -> GGUF converter and its gguf-py; the
# converter needs torch, transformers and sentencepiece, which go in the same venv. The stamp marks a finished install.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_SRC := $(PEERS)/llamacpp-src/llama_cpp_python-$(LLAMACPP_VERSION)
LLAMACPP_STAMP := $(PEERS)/llamacpp/.installed
LLAMACPP := $(PEERS)/llamacpp/bin/python

$(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py:
	mkdir -p $(PEERS)/llamacpp-src
	nice -n 19 $(PYTHON) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) \
	    -d $(PEERS)/llamacpp-src
	tar xzf $(PEERS)/llamacpp-src/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(PEERS)/llamacpp-src
	touch $@

$(LLAMACPP_STAMP): $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py
	test -x $(LLAMACPP) || $(PYTHON) -m venv $(PEERS)/llamacpp
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON" nice -n 19 $(PEERS)/llamacpp/bin/pip install -q \
	    $(PEERS)/llamacpp-src/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
	$(PEERS)/llamacpp/bin/pip install -q torch==2.13.0 transformers sentencepiece safetensors protobuf \
	    $(LLAMACPP_SRC)/vendor/llama.cpp/gguf-py
	touch $@

# llama.cpp's own HTTP server (and its quantizer) from the same vendored sources, for `make bench-served`: CPU only,
# native, OpenMP, no BLAS, the web UI neither built nor downloaded (LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF:
# the prebuilt one comes from a hub at configure time), no OpenSSL; ~10 min on 2 cores, niced.
LLAMA_SERVER := $(PEERS)/llamacpp-build/bin/llama-server
LLAMA_QUANTIZE := $(PEERS)/llamacpp-build/bin/llama-quantize
LLAMA_BENCH := $(PEERS)/llamacpp-build/bin/llama-bench

$(LLAMA_SERVER) $(LLAMA_QUANTIZE) $(LLAMA_BENCH) &: $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(PEERS)/llamacpp-build -DCMAKE_BUILD_TYPE=Release \
	    -DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF > /dev/null
	nice -n 19 cmake --build $(PEERS)/llamacpp-build --target llama-server llama-quantize llama-bench -j 2 > /dev/null
	touch $(LLAMA_SERVER) $(LLAMA_QUANTIZE) $(LLAMA_BENCH)

bench-llama-server: $(LLAMA_SERVER)

# GGUF q8_0 / q4_0 of bench-110m for llama-server: the sdist's converter (run with llmpack's venv, which has torch
# and transformers, and the vendored gguf-py) to f32, then llama.cpp's own llama-quantize with its defaults.
SERVED_GGUF := $(PEERS)/models/llama-server-110m

$(SERVED_GGUF)-f32.gguf: $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py | bench-model
	mkdir -p $(PEERS)/models
	PYTHONPATH=$(LLAMACPP_SRC)/vendor/llama.cpp/gguf-py nice -n 19 $(BIN)/python \
	    $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py $(SRC_110M) --outtype f32 --outfile $@.tmp && mv $@.tmp $@

$(SERVED_GGUF)-q8_0.gguf $(SERVED_GGUF)-q4_0.gguf: $(SERVED_GGUF)-%.gguf: $(SERVED_GGUF)-f32.gguf $(LLAMA_QUANTIZE)
	nice -n 19 $(LLAMA_QUANTIZE) $< $@.tmp $(subst q,Q,$*) > /dev/null && mv $@.tmp $@

# What the server costs (issue: served decode >= 0.95x the engine's own): the ort-fused fp32 / int8 / int4
# artifacts in process and through `llm-serve run`, and llama.cpp's llama-server on q8_0 / q4_0, 1 and 8 streaming
# clients, 2 rounds of 3 in-process/served pairs (~15 min here); writes bench/results/served-vs-engine-<date>.md.
bench-served: bench-model $(LLAMA_SERVER) $(SERVED_GGUF)-q8_0.gguf $(SERVED_GGUF)-q4_0.gguf
	for q in fp32 int8 int4; do $(BIN)/llm-export build --model $(SRC_110M) --out artifacts/bench-110m-fused-$$q \
	    --graph ort-fused $$( [ $$q = fp32 ] || echo --quant $$q ) || exit 1; done
	$(BIN)/python bench/served_vs_engine.py artifacts/bench-110m-fused-fp32 artifacts/bench-110m-fused-int8 \
	    artifacts/bench-110m-fused-int4 --llama-server $(LLAMA_SERVER) \
	    --gguf q8_0=$(SERVED_GGUF)-q8_0.gguf --gguf q4_0=$(SERVED_GGUF)-q4_0.gguf --rounds 2 --pairs 3

# GGUF f32 by the sdist's converter (straight from the HF checkpoint), then q8_0 and q4_0 by llama.cpp's own
# quantizer (llama_model_quantize, what the llama-quantize tool calls, with its default per-tensor choices:
# q4_0 keeps output.weight in q6_K). Each is written under a temporary name and moved in place when complete.
LLAMACPP_MODEL := $(PEERS)/models/llamacpp-110m
LLAMACPP_GGUF := $(addprefix $(LLAMACPP_MODEL)-,f32.gguf q8_0.gguf q4_0.gguf)

$(LLAMACPP_MODEL)-f32.gguf: $(LLAMACPP_STAMP) | bench-model
	mkdir -p $(PEERS)/models
	nice -n 19 $(LLAMACPP) $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py $(SRC_110M) \
	    --outtype f32 --outfile $@.tmp && mv $@.tmp $@

$(LLAMACPP_MODEL)-q8_0.gguf $(LLAMACPP_MODEL)-q4_0.gguf: $(LLAMACPP_MODEL)-%.gguf: $(LLAMACPP_MODEL)-f32.gguf
	nice -n 19 $(LLAMACPP) -c "import ctypes, sys, llama_cpp as L; p = L.llama_model_quantize_default_params(); \
	    p.ftype = L.LLAMA_FTYPE_MOSTLY_$(subst q,Q,$*); \
	    sys.exit(L.llama_model_quantize(b'$<', b'$@.tmp', ctypes.byref(p)))" && mv $@.tmp $@

# Hugging Face Optimum: optimum-onnx 0.1.0's ORTModelForCausalLM needs optimum 2.1.x and transformers < 4.58 (llmpack
# has 5.x), hence its own venv, every version pinned (~1.5 min, niced). The stamp marks a finished install.
OPTIMUM_STAMP := $(PEERS)/optimum/.installed
OPTIMUM_MODEL := $(PEERS)/models/optimum-110m-fp32

$(OPTIMUM_STAMP):
	test -x $(PEERS)/optimum/bin/python || $(PYTHON) -m venv $(PEERS)/optimum
	nice -n 19 $(PEERS)/optimum/bin/pip install -q optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 \
	    onnx==1.23.2 onnxruntime==1.31.1 torch==2.13.0 numpy==2.4.6 sentencepiece==0.2.3 protobuf==7.36.2
	touch $@

# Optimum's own exporter, fp32 with past key values (no --optimize), straight from the HF checkpoint (~45 s);
# offline, its cache under artifacts/.peers; written under a temporary name and moved in place when complete.
$(OPTIMUM_MODEL)/model.onnx: $(OPTIMUM_STAMP) | bench-model
	mkdir -p $(PEERS)/models $(PEERS)/cache/hf
	rm -rf $(OPTIMUM_MODEL).tmp $(OPTIMUM_MODEL)
	HF_HOME=$(PEERS)/cache/hf HF_HUB_OFFLINE=1 nice -n 19 $(PEERS)/optimum/bin/optimum-cli export onnx \
	    --model $(SRC_110M) --task text-generation-with-past --dtype fp32 $(OPTIMUM_MODEL).tmp
	mv $(OPTIMUM_MODEL).tmp $(OPTIMUM_MODEL)

# Its builder reads the tokenizer through transformers, which needs a tokenizer_config.json beside tokenizer.model.
bench-peers: $(GENAI) $(LLAMACPP_GGUF) $(OPTIMUM_MODEL)/model.onnx bench-model
	mkdir -p $(PEERS)/src-110m $(PEERS)/models
	ln -sf $(abspath $(SRC_110M))/* $(PEERS)/src-110m/
	echo '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}' \
	    > $(PEERS)/src-110m/tokenizer_config.json
	for p in fp32 int8 int4; do test -f $(PEERS)/models/genai-110m-$$p/model.onnx || \
	    $(GENAI) -m onnxruntime_genai.models.builder -i $(PEERS)/src-110m -o $(PEERS)/models/genai-110m-$$p \
	        -p $$p -e cpu -c $(PEERS)/cache || exit 1; done

# The real size (issue: read fewer bytes per token than llama.cpp q4_0): the random-weight Llama-2-7B-shape checkpoint
# (made if absent, fp16), llmpack int4 / int8 with default options (+ int4 block 32, what --block-size auto replaced),
# llama.cpp q4_0 / q8_0 by its own converter and quantizer, then BENCH_7B_ROUNDS alternating rounds: llm-serve bench
# against llama.cpp's own llama-bench. Writes bench/results/bench-7b-<date>.md. Disk: ~13.5 GB checkpoint +
# ~15.5 GB llmpack artifacts + ~11 GB GGUFs kept, and 13.5 GB more while the f16 GGUF exists (deleted after
# quantizing): ~55 GB at the peak. Time here: ~10 min of builds, then ~6 min a round.
BENCH_7B_ROUNDS ?= 3
SRC_7B := artifacts/.sources/llama2-7b-shape

bench-7b: install $(LLAMA_BENCH) $(LLAMA_QUANTIZE)
	$(BIN)/python -m llmpack.export.random_checkpoint --shape llama2-7b --dtype float16 --out $(SRC_7B)
	$(BIN)/python bench/bench_7b.py --source $(SRC_7B) --converter $(LLAMACPP_SRC)/vendor/llama.cpp/convert_hf_to_gguf.py \
	    --llama-quantize $(LLAMA_QUANTIZE) --llama-bench $(LLAMA_BENCH) --rounds $(BENCH_7B_ROUNDS)

bench: bench-variants bench-peers
	$(BIN)/python bench/run_all.py

clean:
	rm -rf artifacts build dist *.egg-info
