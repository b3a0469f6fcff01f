"""The C dequantization against the gguf package's own, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine import cpu_dequant

Q4_1, Q8_0 = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


def test_builds_here() -> None:
    # CI has a C compiler: model loads must take this path there, not gguf's fallback.
    assert cpu_dequant.available(), cpu_dequant._kernel.reason


def random_blocks(qtype: GGMLQuantizationType, rows: int, blocks: int, seed: int) -> np.ndarray:
    """[rows, blocks * block bytes]: random codes; float16 scales (and minimums) finite, of
    every sign and size, subnormals and zeros among them, as real files hold."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    heads = 2 if qtype == Q4_1 else 1
    scales = (rng.standard_normal((rows, blocks, heads)) * 10.0 ** rng.integers(-9, 3, (
        rows, blocks, heads))).astype(np.float16)
    scales.reshape(-1)[::7] = 0
    scales.reshape(-1)[3::11] = np.float16(6e-8)  # the smallest float16 subnormal
    raw[:, :, : 2 * heads] = scales.view(np.uint8).reshape(rows, blocks, 2 * heads)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0])
@pytest.mark.parametrize("shape", [(1, 1), (3, 18), (64, 48)])
def test_equals_gguf_bit_for_bit(qtype: GGMLQuantizationType, shape: tuple[int, int]) -> None:
    raw = random_blocks(qtype, *shape, seed=shape[0] * 100 + shape[1])
    want = gguf_dequantize(raw, qtype)
    got = cpu_dequant.dequantize(raw, qtype)
    assert got.dtype == np.float32 and got.shape == want.shape == (shape[0], shape[1] * 32)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


def test_one_block_by_hand() -> None:
    # Q4_1: d = 0.5, m = -1; code byte i holds weight i (low nibble) and weight i + 16 (high).
    codes = np.array([(15 - i) << 4 | i for i in range(16)], np.uint8)
    raw = np.concatenate([np.array([0.5, -1.0], np.float16).view(np.uint8), codes])
    got = cpu_dequant.dequantize(raw.reshape(1, 20), Q4_1)
    assert got.tolist() == [[0.5 * q - 1.0 for q in [*range(16), *range(15, -1, -1)]]]
    # Q8_0: d = 0.25, codes -128..127 in steps of 8.
    codes8 = np.arange(-128, 128, 8, dtype=np.int8).view(np.uint8)
    raw8 = np.concatenate([np.array([0.25], np.float16).view(np.uint8), codes8])
    got8 = cpu_dequant.dequantize(raw8.reshape(1, 34), Q8_0)
    assert got8.tolist() == [[0.25 * q for q in range(-128, 128, 8)]]


def test_other_types_are_gguf_s() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(cpu_dequant.dequantize(values, GGMLQuantizationType.F32), values)
