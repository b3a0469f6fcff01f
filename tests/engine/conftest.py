from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_models import VARIANTS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: make_tiny_model(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}
