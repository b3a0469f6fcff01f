from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.decode.engine_rig import running_pool
from tests.helpers.tiny_models import make_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("prefill_model") / "tiny-llama", "llama",
                           seed=7)


@pytest.fixture
def pool_address() -> Iterator[str]:
    with running_pool("prefill-test") as address:
        yield address
