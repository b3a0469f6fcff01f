"""The quantized few-row linear against the float32 one on the same (dequantized) weights:
bit-identical outputs, for every row count the kernel unrolls, ragged output blocks, with and
without bias; and the GGUF row index finding a loaded weight's stored rows by value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from engine import cpu_linear_pool, cpu_quant_linear
from engine.gguf_file import Q4_1, Q8_0, QuantRows, RowIndex

QTYPES = {Q4_1: GGMLQuantizationType.Q4_1, Q8_0: GGMLQuantizationType.Q8_0}

pytestmark = pytest.mark.skipif(not cpu_quant_linear.available(),
                                reason="no C compiler or the CPU pool is off")


def stored(fmt: int, out: int, fan_in: int, seed: int) -> tuple[QuantRows, torch.Tensor]:
    """A weight quantized as a GGUF file stores it, and its float32 dequantization."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((out, fan_in)).astype(np.float32) * 0.05
    raw = quantize(values, QTYPES[fmt])
    weight = dequantize(raw, QTYPES[fmt]).astype(np.float32).reshape(out, fan_in)
    return QuantRows(fmt, raw.reshape(out, fan_in // 32, -1)), torch.from_numpy(weight)


@pytest.mark.parametrize("fmt", [Q4_1, Q8_0])
@pytest.mark.parametrize("out,fan_in", [(576, 576), (50, 96), (17, 32)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bit_identical_to_the_float32_kernel(fmt: int, out: int, fan_in: int,
                                             with_bias: bool) -> None:
    rows, weight = stored(fmt, out, fan_in, seed=out + fan_in)
    bias = torch.randn(out) if with_bias else None
    quant = cpu_quant_linear.pack(rows, bias)
    plain = cpu_linear_pool.pack(weight, bias)
    assert quant.out_features == out and quant.in_features == fan_in
    for n in (1, 2, 3, 4, 5, 6, 7, 13, 32):
        x = torch.randn(n, fan_in)
        got = cpu_quant_linear.linear(x, quant)
        assert torch.equal(got, cpu_linear_pool.linear(x, plain)), (fmt, n)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias),
                                   rtol=1e-4, atol=1e-5)


def test_smaller_than_the_float32_copy() -> None:
    rows, weight = stored(Q4_1, 576, 1536, seed=1)
    q4 = cpu_quant_linear.pack(rows, None).blocked.numel()
    assert q4 * 5 < cpu_linear_pool.pack(weight, None).blocked.numel() * 4
    rows8, weight8 = stored(Q8_0, 576, 1536, seed=2)
    q8 = cpu_quant_linear.pack(rows8, None).blocked.numel()
    assert q8 * 3 < cpu_linear_pool.pack(weight8, None).blocked.numel() * 4


def index_of(*weights: tuple[QuantRows, torch.Tensor]) -> RowIndex:
    index = RowIndex()
    for rows, weight in weights:
        index.add(rows.blocks.reshape(rows.blocks.shape[0], -1), QTYPES[rows.fmt],
                  weight.numpy())
    return index


def test_row_index_finds_rows_by_value_across_tensors_and_order() -> None:
    a, wa = stored(Q4_1, 8, 64, seed=3)
    b, wb = stored(Q4_1, 4, 64, seed=4)
    index = index_of((a, wa), (b, wb))
    assert len(index) == 12
    # Rows of both tensors, permuted and fused, as the loader's Q/K unpermute and fused
    # projections leave them.
    order = [5, 2, 7]
    fused = torch.cat([wa[order], wb]).numpy()
    found = index.rows_of(fused)
    assert found is not None and found.fmt == Q4_1
    assert np.array_equal(found.blocks, np.concatenate([a.blocks[order], b.blocks]))
    changed = fused.copy()
    changed[1, 3] += 1e-3
    assert index.rows_of(changed) is None  # one row not stored: none of it is
    q8, w8 = stored(Q8_0, 2, 64, seed=5)
    index8 = index_of((a, wa), (q8, w8))
    assert index8.rows_of(torch.cat([wa[:1], w8]).numpy()) is None  # two formats: no
