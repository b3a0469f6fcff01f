"""Tests that resize engine.cpu_pool put it back as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine import cpu_pool


@contextmanager
def pool_size_restored() -> Iterator[None]:
    """The pool's size after the block is what it was before, however the block resized it,
    and no far helper left running."""
    before = cpu_pool.threads()
    try:
        yield
    finally:
        cpu_pool.set_threads(before)
        cpu_pool.set_far_helpers(0)
