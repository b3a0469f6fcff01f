"""The per-step fast paths against the formulas they replace: rotary by one roll with a signed
sine, oneDNN linear on a reordered weight with dense input and output (and its one-row copy),
fused RMSNorm."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.model import RMSNorm
from engine.packed_linear import PackedLinear, can_pack, one_row_pays, pack_linears
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
@pytest.mark.parametrize("one_row", [True, False])
def test_packed_linear_matches_f_linear(rows: int, bias: bool, fan_in: int, fan_out: int,
                                        one_row: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, fan_out, bias=bias)
    x = torch.randn(rows, fan_in)
    want = F.linear(x, linear.weight, linear.bias).detach()
    packed = PackedLinear(linear, one_row=one_row)
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


@pytest.fixture
def threads() -> Iterator[Callable[[int], None]]:
    """Sets torch's thread count for the test; the count before is put back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_takes_its_own_weight_copy(bias: bool, threads: Callable[[int], None]) -> None:
    """One row goes through the second copy where it pays (one thread): a wide layer's
    transposed weight by MKL, a narrow one's plain weight by oneDNN; more rows, one row with the
    copy dropped, and one row on two threads, through the reordered weight. Each is
    bit-identical to that same call made by hand."""
    torch.manual_seed(0)
    threads(1)
    assert one_row_pays()
    for fan_in, fan_out in ((576, 960), (960, 576)):
        linear = nn.Linear(fan_in, fan_out, bias=bias)
        packed, bare = PackedLinear(linear), PackedLinear(linear, one_row=False)
        w = linear.weight.detach()
        b = None if linear.bias is None else linear.bias.detach()
        assert bare.one_row is None and packed.one_row is not None
        assert packed.wide == (fan_out > fan_in)
        one, eight = torch.randn(1, fan_in), torch.randn(8, fan_in)
        if packed.wide:
            assert packed.one_row.shape == (fan_in, fan_out) and packed.one_row.is_contiguous()
            by_hand = torch.mm(one, w.t().contiguous()) if b is None else torch.addmm(
                b, one, w.t().contiguous())
        else:
            assert torch.equal(packed.one_row, w)
            by_hand = torch.ops.mkldnn._linear_pointwise(one, w, b, "none", [], "")
        assert torch.equal(packed(one), by_hand)
        torch.testing.assert_close(by_hand, F.linear(one, w, b), atol=1e-5, rtol=1e-5)
        reordered = torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
        for x, module in ((eight, packed), (one, bare)):
            assert torch.equal(module(x), torch.ops.mkldnn._linear_pointwise(
                x, reordered, b, "none", [], ""))
        threads(2)
        assert not one_row_pays()
        assert torch.equal(packed(one), torch.ops.mkldnn._linear_pointwise(
            one, reordered, b, "none", [], ""))
        threads(1)


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
def test_one_row_copies_are_made_where_they_pay(threads: Callable[[int], None]) -> None:
    def copies() -> list[bool]:
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        pack_linears(model)
        return [isinstance(m, PackedLinear) and m.one_row is not None for m in model]

    threads(2)
    assert copies() == [False, False]
    threads(1)
    assert copies() == [True, True]


@pytest.mark.skipif(not can_pack(nn.Linear(2, 2)), reason="oneDNN is not available")
def test_pack_linears_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4)))
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model.modules()].count("PackedLinear") == 2
    lean = nn.Sequential(nn.Linear(8, 16))
    assert pack_linears(lean, one_row=False) == 1
    assert isinstance(lean[0], PackedLinear) and lean[0].one_row is None
    assert pack_linears(lean, one_row=True) == 0  # already packed: nothing left to replace


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
