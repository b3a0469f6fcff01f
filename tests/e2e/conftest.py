from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.local_system import LocalSystem, start_local, stop_local
from tests.helpers.tiny_models import make_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test here starts or talks to real processes: `make test-fast` deselects them all.
    for item in items:
        if E2E_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e_models")
    return {arch: make_tiny_model(root / f"tiny-{arch}", arch, seed=7) for arch in
            ("llama", "qwen2")}


def _system(tmp_path_factory: pytest.TempPathFactory, model: str, name: str,
            *extra: str, stop_with: signal.Signals = signal.SIGTERM) -> Iterator[LocalSystem]:
    system = start_local(model, tmp_path_factory.mktemp(name), *extra)
    try:
        yield system
    finally:
        stop_local(system, stop_with)


@pytest.fixture(scope="session")
def llama_system(tmp_path_factory: pytest.TempPathFactory,
                 tiny_dirs: dict[str, Path]) -> Iterator[LocalSystem]:
    yield from _system(tmp_path_factory, str(tiny_dirs["llama"]), "sys-llama",
                       "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB")


@pytest.fixture(scope="session")
def qwen2_system(tmp_path_factory: pytest.TempPathFactory,
                 tiny_dirs: dict[str, Path]) -> Iterator[LocalSystem]:
    yield from _system(tmp_path_factory, str(tiny_dirs["qwen2"]), "sys-qwen2",
                       "--kv-cache-bytes", "16MiB", "--pool-bytes", "64MiB",
                       stop_with=signal.SIGINT)


@pytest.fixture(scope="session")
def smollm2_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    yield from _system(tmp_path_factory, "smollm2", "sys-smollm2",
                       "--kv-cache-bytes", "256MiB", "--pool-bytes", "512MiB",
                       "--max-model-len", "2048")
