"""The fused elementwise kernels against the torch formulas they replace (rows 1 to 1000,
SmolLM2's widths and odd ones), on the AVX-512, AVX2 and plain vector builds, in place where
they say so, bit-identical on one and two pool threads; the model's fused forward against its
torch path; and the switch that turns them off in a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_fused_ops as fused
from engine import cpu_pool
from engine.config import ModelConfig
from engine.model import CausalLM, RMSNorm
from engine.rope import apply_rotary, apply_rotary_, rotary_factors

pytestmark = pytest.mark.skipif(not fused.available(),
                                reason=f"no fused CPU ops: {fused.unavailable_reason()}")

ROOT = Path(__file__).resolve().parents[2]
ROWS = [1, 7, 512, 1000]
WIDTHS = [576, 1536, 577, 33, 7]  # SmolLM2's hidden and intermediate sizes, odd ones


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Distance in float32 units in the last place (ordered so that it counts across zero)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return (ordered(got) - ordered(want)).abs()


def _rms_formula(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm in float32."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_matches_the_formula(rows: int, width: int) -> None:
    gen = _gen(rows * 1000 + width)
    x, delta = torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen)
    weight = torch.randn(width, generator=gen)
    summed = x + delta
    stream = x.clone()
    normed = fused.add_rms_norm(stream, delta, weight, 1e-5)
    assert torch.equal(stream, summed)  # x += delta, in place, bit for bit
    # Only the sum of squares is in another order: a few ulp of the row's scale.
    torch.testing.assert_close(normed, _rms_formula(summed, weight, 1e-5), rtol=2e-6, atol=2e-6)
    plain = fused.rms_norm(summed, weight, 1e-6)
    assert torch.equal(summed, stream)  # the plain norm leaves its input alone
    torch.testing.assert_close(plain, F.rms_norm(summed, (width,), weight, 1e-6), rtol=2e-6,
                               atol=2e-6)
    # Small integers: every order of the sum is exact, so the result is torch's, bit for bit.
    ints = torch.randint(-8, 9, (rows, width), generator=gen).float()
    assert torch.equal(fused.rms_norm(ints, weight, 1e-5), _rms_formula(ints, weight, 1e-5))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_matches_torch(rows: int, width: int) -> None:
    gen = _gen(rows * 1000 + width)
    gate_up = torch.randn(rows, 2 * width, generator=gen) * 6
    gate, up = gate_up.chunk(2, dim=-1)
    got = fused.silu_mul(gate_up)
    assert got.shape == (rows, width) and got.is_contiguous()
    exact = (gate.double() / (1 + torch.exp(-gate.double())) * up.double()).float()
    # Within 3 ulp of the float64 value (torch's own is within 2), 4 of torch's float32.
    assert _ulps(got, exact).max().item() <= 3
    assert _ulps(got, F.silu(gate) * up).max().item() <= 4


def test_silu_mul_edges_and_row_stride() -> None:
    gate = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -88.5, 89.5, -89.5, float("inf"),
                         float("-inf"), float("nan"), 1e-30, -1e-30, 20.0, -20.0, 3.0, -3.0])
    up = torch.full_like(gate, 2.0)
    # gate and up as the halves of a wider row: the kernel takes the rows' stride
    wide = torch.zeros(2, 3 * gate.numel())
    wide[:, : 2 * gate.numel()] = torch.cat((gate, up))
    got = fused.silu_mul(wide[:, : 2 * gate.numel()])
    want = F.silu(gate) * up
    for row in got:
        assert torch.equal(row.isnan(), want.isnan())
        ok = ~want.isnan()
        assert _ulps(row[ok], want[ok]).max().item() <= 1
        assert torch.equal(row[ok].signbit(), want[ok].signbit())  # -0.0 where torch has it
    assert got[0, 2].item() == 200.0 and got[0, 8].item() == float("inf")


def _rotary_case(rows: int, heads: int, kv_heads: int, dim: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    angles = torch.randn(rows, dim // 2, generator=gen) * 100
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = rotary_factors(emb.cos(), emb.sin(), torch.float32)
    return qkv, cos, sin


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 6), (3, 1, 34),
                                                        (2, 2, 128)])
@pytest.mark.parametrize("rows", ROWS)
def test_rotary_in_place_is_bit_identical(rows: int, heads: int, kv_heads: int,
                                          dim: int) -> None:
    qkv, cos, sin = _rotary_case(rows, heads, kv_heads, dim, rows + dim)
    before = qkv.clone()
    qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
    want = apply_rotary(qk, cos, sin)
    assert fused.rotary_takes(qk, cos, sin)
    assert fused.rotary_(qk, cos, sin) is qk
    assert torch.equal(qk, want)
    # The values beside the rotated heads are untouched.
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], before[:, (heads + kv_heads) * dim:])


def test_rotary_dispatch_keeps_torch_where_the_kernel_does_not_take() -> None:
    qkv, cos, sin = _rotary_case(5, 4, 2, 8, 1)
    qk = qkv[:, :48].view(5, 6, 8)
    want = apply_rotary(qk, cos, sin)
    # heads not contiguous in a row: a new tensor from torch, the input untouched
    spread = qkv.view(5, 8, 8)[:, ::2][:, :4]
    assert not fused.rotary_takes(spread, cos[:, :, :8], sin[:, :, :8])
    kept = spread.clone()
    assert torch.equal(apply_rotary_(spread, cos, sin), apply_rotary(kept, cos, sin))
    assert torch.equal(spread, kept)
    # double: torch
    as_double = qk.double()
    out = apply_rotary_(as_double, cos.double(), sin.double())
    assert out.data_ptr() != as_double.data_ptr()
    # the kernel's case: in place, the same values
    assert apply_rotary_(qk, cos, sin).data_ptr() == qk.data_ptr()
    assert torch.equal(qk, want)


def _all_kernels() -> list[torch.Tensor]:
    """Each kernel on 1000 rows (several blocks), its outputs."""
    gen = _gen(7)
    x, delta = torch.randn(1000, 576, generator=gen), torch.randn(1000, 576, generator=gen)
    weight = torch.randn(576, generator=gen)
    gate_up = torch.randn(1000, 3072, generator=gen) * 4
    qkv, cos, sin = _rotary_case(1000, 9, 3, 64, 7)
    plain = fused.rms_norm(x, weight, 1e-5)
    normed = fused.add_rms_norm(x, delta, weight, 1e-5)
    fused.rotary_(qkv[:, :768].view(1000, 12, 64), cos, sin)
    return [plain, x, normed, fused.silu_mul(gate_up), qkv]


def test_results_do_not_depend_on_pool_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cpu_pool.threads() if cpu_pool.available() else 1
    runs = []
    try:
        for threads in (1, 2):
            if cpu_pool.available():
                cpu_pool.set_threads(threads)
            runs.append(_all_kernels())
    finally:
        if cpu_pool.available():
            cpu_pool.set_threads(before)
    monkeypatch.setattr(fused, "MIN_BLOCK_ELEMENTS", 1 << 40)  # one block: the caller alone
    runs.append(_all_kernels())
    for other in runs[1:]:
        for got, want in zip(other, runs[0], strict=True):
            assert torch.equal(got, want)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(),
                    reason="the narrower builds are x86 flags: an AVX2 machine builds them")
@pytest.mark.parametrize(("flags", "width"), [
    (["-mno-avx512f"], 8),                                   # AVX2 + FMA
    (["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-avx"], 4),  # SSE: the plain path
])
def test_narrower_vector_builds_agree(flags: list[str], width: int) -> None:
    lib = fused.build(fused.C_FLAGS + flags, pool=False)
    assert lib.pantry_fused_vector_width() == width
    gen = _gen(width)
    x, delta = torch.randn(37, 577, generator=gen), torch.randn(37, 577, generator=gen)
    weight = torch.randn(577, generator=gen)
    gate_up = torch.randn(37, 2 * 77, generator=gen) * 6
    qkv, cos, sin = _rotary_case(37, 3, 1, 34, width)
    saved = fused._kernel.lib
    try:
        fused._kernel.lib = lib
        stream = x.clone()
        normed = fused.add_rms_norm(stream, delta, weight, 1e-5)
        silu = fused.silu_mul(gate_up)
        qk = qkv[:, :136].view(37, 4, 34)
        want_rot = apply_rotary(qk, cos, sin)
        fused.rotary_(qk, cos, sin)
    finally:
        fused._kernel.lib = saved
    assert torch.equal(stream, x + delta)
    torch.testing.assert_close(normed, _rms_formula(x + delta, weight, 1e-5), rtol=2e-6,
                               atol=2e-6)
    gate, up = gate_up.chunk(2, dim=-1)
    exact = (gate.double() / (1 + torch.exp(-gate.double())) * up.double()).float()
    assert _ulps(silu, exact).max().item() <= 3
    assert torch.equal(qk, want_rot)


def _tiny_model() -> CausalLM:
    config = ModelConfig(architecture="llama", vocab_size=97, hidden_size=72,
                         intermediate_size=136, num_layers=3, num_heads=6, num_kv_heads=2,
                         head_dim=12, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                         attention_bias=False, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_ids=(0,))
    torch.manual_seed(0)
    model = CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_rms_norm_module_takes_the_kernel_and_keeps_torch_elsewhere() -> None:
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    gen = _gen(3)
    x, delta = torch.randn(9, 64, generator=gen), torch.randn(9, 64, generator=gen)
    with torch.inference_mode():
        stream = x.clone()
        same, normed = norm.add_forward(stream, delta)
        assert same is stream and torch.equal(stream, x + delta)  # added in place
        torch.testing.assert_close(normed, _rms_formula(x + delta, norm.weight, 1e-5),
                                   rtol=2e-6, atol=2e-6)
        fused.set_enabled(False)
        try:
            stream = x.clone()
            summed, normed_torch = norm.add_forward(stream, delta)
        finally:
            fused.set_enabled(True)
        assert torch.equal(stream, x) and torch.equal(summed, x + delta)  # a new sum
        assert torch.equal(normed_torch, F.rms_norm(x + delta, (64,), norm.weight, 1e-5))
    # Wanting gradients: torch's ops, nothing written in place.
    stream = x.clone().requires_grad_()
    summed, _ = norm.add_forward(stream, delta)
    assert summed is not stream and torch.equal(stream.detach(), x)


@pytest.mark.parametrize("fuse", [False, True], ids=["separate", "fused-projections"])
def test_model_forward_matches_the_torch_path(fuse: bool) -> None:
    from engine.attention_batch import AttentionBatch
    from engine.kv_cache import PagedKVCache

    model = _tiny_model()
    if fuse:
        model.fuse_projections()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=_gen(5))

    def run() -> torch.Tensor:
        kv = PagedKVCache(num_layers=cfg.num_layers, num_blocks=4, block_size=16,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                          dtype=torch.float32, device="cpu")
        batch = AttentionBatch.build(query_lens=[40], context_lens=[0],
                                     block_tables=[(0, 1, 2)], block_size=16,
                                     device=torch.device("cpu"), sliding_window=None)
        with torch.inference_mode():
            return model(ids, torch.arange(40), batch, kv).clone()

    fused_out = run()
    fused.set_enabled(False)
    try:
        torch_out = run()
    finally:
        fused.set_enabled(True)
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused_out, torch.zeros_like(fused_out))


def test_switched_off_in_a_real_process() -> None:
    script = textwrap.dedent("""
        import torch
        from engine import cpu_fused_ops
        from engine.model import RMSNorm
        assert not cpu_fused_ops.available()
        print(cpu_fused_ops.unavailable_reason())
        x = torch.ones(3, 8)
        with torch.inference_mode():
            summed, normed = RMSNorm(8, 1e-5).add_forward(x, torch.ones(3, 8))
        assert summed is not x and torch.equal(x, torch.ones(3, 8))
        print(summed[0, 0].item())
    """)
    env = {**os.environ, "PANTRY_CPU_FUSED_OPS": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PANTRY_CPU_FUSED_OPS=0", "2.0"]
