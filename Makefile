# Two commands do everything: `make demo` and `make test`. Both share `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pantry-setup-done

.PHONY: setup demo test test-fast proto proto-check lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) -m pantry.cli.demo

test: setup
	bash scripts/test.sh

# Everything but the end-to-end systems and the real-model tests: about half a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not slow"

proto: setup
	$(PY) scripts/gen_proto.py

proto-check: setup
	$(PY) scripts/gen_proto.py --check

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kvstore engine prefill decode conductor pantry
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/ttft_prefix.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
