#!/usr/bin/env bash
# The whole suite: generated-code freshness, lint and types, then pytest (unit and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/mypy kvstore engine prefill decode conductor pantry connectors
.venv/bin/lint-imports
.venv/bin/python -m pytest -q "$@"
