"""Fixtures more than one test folder uses: a tiny random llama on disk and a running pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU the engine's Triton kernels are tested on CPU tensors under Triton's interpreter
# (tests/engine/test_triton_kernels.py). Triton picks it when it is imported, and the imports
# below import it (through the engine), so it is switched on first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.decode.engine_rig import running_pool  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402

# No model hub is ever reached: everything loads from files the tests make or ship.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("engine_model") / "tiny-llama", "llama",
                           seed=7)


@pytest.fixture
def pool_address(request: pytest.FixtureRequest) -> Iterator[str]:
    with running_pool(request.node.path.parent.name) as address:
        yield address
