"""Fixtures more than one test folder uses: a tiny random llama on disk and a running pool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.decode.engine_rig import running_pool
from tests.helpers.tiny_models import make_tiny_model

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
