from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import cpu_pool
from tests.helpers.pool_threads import pool_size_restored
from tests.helpers.tiny_models import VARIANTS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: make_tiny_model(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def pool_threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """The C kernels' pool resized to 1, then 2 threads, and put back after."""
    with pool_size_restored():
        cpu_pool.set_threads(request.param)
        yield request.param
