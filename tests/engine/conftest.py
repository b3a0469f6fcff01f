from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import VARIANTS, make_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: make_tiny_model(root / v, v, seed=i) for i, v in enumerate(VARIANTS)}
