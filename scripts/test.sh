#!/usr/bin/env bash
# The whole suite: generated-code freshness, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/gen_proto.py --check
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
