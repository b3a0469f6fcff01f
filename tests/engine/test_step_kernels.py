"""The per-step fast paths against the formulas they replace: rotary by one roll with a signed
sine, oneDNN linear on a reordered weight with dense input and output (and the pool's copy for
few rows: tests/engine/test_cpu_linear_pool.py), fused RMSNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.model import RMSNorm
from engine.packed_linear import PackedLinear, can_pack, pack_linears
from engine.rope import apply_rotary, rotary_factors


def _transformers_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for x [T, heads, hd], cos/sin [T, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def test_rotary_is_bit_identical_to_rotate_half() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, 64, generator=gen)
    angles = torch.randn(7, 32, generator=gen) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    ours = apply_rotary(x, *rotary_factors(cos, sin, x.dtype))
    assert torch.equal(ours, _transformers_rotary(x, cos, sin))
    # The queries and keys of a layer rotated together equal each rotated alone.
    q, k = x[:, :9], x[:, 9:]
    c, s = rotary_factors(cos, sin, x.dtype)
    assert torch.equal(ours[:, :9], apply_rotary(q, c, s))
    assert torch.equal(ours[:, 9:], apply_rotary(k, c, s))


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(576, 960), (960, 576)])  # wide, narrow
@pytest.mark.parametrize("few_rows", [True, False])
def test_packed_linear_matches_f_linear(rows: int, bias: bool, fan_in: int, fan_out: int,
                                        few_rows: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(rows, fan_in)
    want = F.linear(x, linear.weight, linear.bias).detach()
    packed = PackedLinear(linear, few_rows=few_rows)
    got = packed(x)
    assert got.shape == (rows, fan_out)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Leading dimensions are kept, and a non-contiguous input is read correctly.
    wide = torch.randn(2, rows, fan_in + 624)[..., 7:fan_in + 7]
    torch.testing.assert_close(packed(wide),
                               F.linear(wide, linear.weight, linear.bias).detach(),
                               atol=1e-5, rtol=1e-5)
    # A 2-D input that is not contiguous takes the copying path, not the direct call.
    strided = torch.randn(rows, 2 * fan_in)[:, ::2]
    assert strided.dim() == 2 and not strided.is_contiguous()
    torch.testing.assert_close(packed(strided),
                               F.linear(strided, linear.weight, linear.bias).detach(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
def test_pack_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model.modules()].count("PackedLinear") == 2
    lean = nn.Sequential(nn.Linear(8, 16))
    assert pack_linears(lean, few_rows=False) == 1
    assert isinstance(lean[0], PackedLinear) and lean[0].few_rows is None
    assert pack_linears(lean, few_rows=True) == 0  # already packed: nothing left to replace


def test_rms_norm_fused_matches_the_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    x = torch.randn(5, 576) * 3
    want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=1e-6)
    # Other dtypes keep the explicit float32 path (and its rounding).
    xb = x.to(torch.bfloat16)
    xf = xb.float()
    want_b = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        torch.bfloat16)
    torch.testing.assert_close(norm(xb), want_b, atol=0, rtol=0)
