"""A decoder layer's elementwise ops on CPU (float32) as C kernels, one pass each over rows
split into blocks on engine.cpu_pool:
- `add_rms_norm`: the residual add and the next RMSNorm (x += delta in place, then
  x * rsqrt(mean(x^2) + eps) * weight, the mean accumulated in float32), as vLLM fuses them;
  `rms_norm` alone for the first layer;
- `silu_mul`: silu(gate) * up straight from the fused gate/up projection's output;
- `rotary_`: rotary embedding in place on the queries and keys (engine.rope's formula).

torch runs each of these as several ops, each a pass over memory plus a dispatch and, with the
engines' OMP_WAIT_POLICY=PASSIVE, a wake of its sleeping OpenMP thread. Measured on the shared
2-core machine (bench/fused_ops.py, 2 threads, PASSIVE, kernels on/off alternated in one run;
indicative): in a 512-token SmolLM2 prefill step the kernels take ~25 ms (wall, 121 calls)
where torch's elementwise ops took ~69 ms (profiler self time); whole step 664 vs 722 ms
(medians of 5), 2048 tokens 3119 vs 3306 ms. Per call at 512 rows, us, kernel vs torch:
add + RMSNorm 46 vs 799, silu * up 161 vs 425, rotary 27 vs 385; at 1 row 4-6 vs 6-14. A
decode step: 1 stream 32.2 vs 28.5 tok/s, 8 streams 142.7 vs 139.6 (noise of +-10%). In a step
the kernels are bound by memory (the activations come from L3 or DRAM): ~3x their time on hot
caches.

The numbers are torch's: the same float32 products and sums in the same order, built without
-ffast-math and with -ffp-contract=off (no fused multiply-add), so the rotary and every
product is bit-identical to torch's ops; a norm's sum of squares is in another order (a few
ulp in the scale); silu's exp is our own (Cody-Waite reduction and a degree-7 polynomial,
within ~1 ulp of the true value; torch's own vectorized exp is an approximation too). Each row
is computed by one block in a fixed order, so results do not depend on the number of threads.
A step of few rows (a decode step) is one block: it runs on the caller, no pool handoff.

Built with gcc vector extensions: 16 floats a vector where the compiler targets AVX-512, 8
with AVX2, 4 elsewhere (lowered to scalars where the machine has no vectors). `available()` is
False where no compiler works, with PANTRY_CPU_KERNELS=0 or PANTRY_CPU_FUSED_OPS=0; callers
then keep torch's ops, as they do for CUDA, other dtypes, tensors that need gradients and
layouts the kernels do not take.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from engine import cpu_pool
from pantry.common.c_library import KernelLibrary, compile_library

# A block is at least this many elements of a row-major [rows, width] pass (~10-20 us here), so
# the pool's handoff stays small beside it; fewer elements in all run on the caller alone.
MIN_BLOCK_ELEMENTS = 32768

# -ffp-contract=off: an a * b + c stays two roundings, as in torch's separate ops; no
# -ffast-math, which would reassociate them.
C_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared"]

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
""" + cpu_pool.C_POOL_TYPES + r"""
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX2__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define INLINE static inline __attribute__((always_inline))

/* a * b + c in one rounding, where the machine has it (only inside exp: everywhere else each
   product is rounded, as in torch's separate ops). */
#if defined(__AVX512F__)
#include <immintrin.h>
INLINE vf fma_(vf a, vf b, vf c) { return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
INLINE vf clamp(vf x, vf lo, vf hi)
{
    return (vf)_mm512_min_ps(_mm512_max_ps((__m512)x, (__m512)lo), (__m512)hi);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
INLINE vf fma_(vf a, vf b, vf c) { return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
INLINE vf clamp(vf x, vf lo, vf hi)
{
    return (vf)_mm256_min_ps(_mm256_max_ps((__m256)x, (__m256)lo), (__m256)hi);
}
#else
INLINE vf fma_(vf a, vf b, vf c) { return a * b + c; }
/* a where m is all ones, else b (m from a vector comparison). */
INLINE vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
INLINE vf clamp(vf x, vf lo, vf hi) { return pick(x > hi, hi, pick(x < lo, lo, x)); }
#endif
INLINE vf ld(const float *p) { return *(const vfu *)p; }
INLINE void st(float *p, vf v) { *(vfu *)p = v; }
INLINE vf splat(float x) { return (vf){0} + x; }
static pantry_run_fn RUN = 0;
int pantry_fused_vector_width(void) { return VW; }
void pantry_fused_set_pool(pantry_run_fn run) { RUN = run; }

/* Rows [0, rows) in blocks of `per` rows: on the pool where there are several blocks. */
typedef struct { int64_t rows, per; } span_t;
static span_t split(int64_t rows, int64_t elements_per_row, int64_t min_block)
{
    int64_t per = elements_per_row > 0 ? (min_block + elements_per_row - 1) / elements_per_row
                                       : rows;
    if (per < 1) per = 1;
    int64_t blocks = (rows + per - 1) / per;
    if (blocks > 4096) per = (rows + 4095) / 4096; /* the pool counts blocks in 16 bits */
    return (span_t){rows, per};
}
static void run(pantry_block_fn fn, const void *ctx, span_t s)
{
    const int64_t blocks = (s.rows + s.per - 1) / s.per;
    if (RUN && blocks > 1) {
        RUN(fn, ctx, blocks);
    } else {
        for (int64_t b = 0; b < blocks; b++) fn(ctx, b);
    }
}

/* ---- RMSNorm, with the residual add ------------------------------------------------------ */
typedef struct {
    float *x;
    const float *delta, *w;
    float *out;
    int64_t width, per, rows;
    float eps;
} norm_t;

/* 1 / sqrt(mean + eps), as torch's rsqrt (a division by a correctly rounded sqrt). */
INLINE float inv_rms(float sum, int64_t n, float eps) { return 1.0f / sqrtf(sum / (float)n + eps); }

/* Sum of squares of x[0, n): four vector accumulators, then the lanes, then the tail. */
INLINE float sum_squares(const float *x, int64_t n)
{
    vf a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        const vf v0 = ld(x + i), v1 = ld(x + i + VW), v2 = ld(x + i + 2 * VW),
                 v3 = ld(x + i + 3 * VW);
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3;
    }
    for (; i + VW <= n; i += VW) { const vf v = ld(x + i); a0 += v * v; }
    const vf a = (a0 + a1) + (a2 + a3);
    float s = 0.f;
    for (int k = 0; k < VW; k++) s += a[k];
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

/* out = (x * r) * w: transformers' order (x * rsqrt(...), then weight * that). */
INLINE void scale_row(const float *x, const float *w, float *out, int64_t n, float r)
{
    const vf rv = splat(r);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) st(out + i, (ld(x + i) * rv) * ld(w + i));
    for (; i < n; i++) out[i] = (x[i] * r) * w[i];
}

static void norm_block(const void *ctx, int64_t blk)
{
    const norm_t *c = ctx;
    const int64_t n = c->width, end = (blk + 1) * c->per < c->rows ? (blk + 1) * c->per : c->rows;
    for (int64_t t = blk * c->per; t < end; t++) {
        float *x = c->x + t * n;
        if (c->delta) {
            const float *d = c->delta + t * n;
            int64_t i = 0;
            for (; i + VW <= n; i += VW) st(x + i, ld(x + i) + ld(d + i));
            for (; i < n; i++) x[i] = x[i] + d[i];
        }
        scale_row(x, c->w, c->out + t * n, n, inv_rms(sum_squares(x, n), n, c->eps));
    }
}

/* x, out [rows, width] and delta (NULL: none) contiguous; x += delta first, in place. */
void pantry_fused_rms_norm(float *x, const float *delta, const float *w, float *out,
                           int64_t rows, int64_t width, float eps, int64_t min_block)
{
    const span_t s = split(rows, width, min_block);
    const norm_t c = {x, delta, w, out, width, s.per, rows, eps};
    run(norm_block, &c, s);
}

/* ---- silu(gate) * up ---------------------------------------------------------------------- */
/* exp(x): n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by cephes' expf
   polynomial, times 2^n as two powers of two so that every n from the clamped range is two
   normal floats (overflow gives inf, as it should). */
INLINE vf vexp(vf x)
{
    x = clamp(x, splat(-110.f), splat(89.f));
    const vf magic = splat(12582912.f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = fma_(x, splat(1.44269504088896341f), magic) - magic;
    const vf r = fma_(n, splat(2.12194440e-4f), fma_(n, splat(-0.693359375f), x));
    vf p = splat(1.9875691500e-4f);
    p = fma_(p, r, splat(1.3981999507e-3f));
    p = fma_(p, r, splat(8.3334519073e-3f));
    p = fma_(p, r, splat(4.1665795894e-2f));
    p = fma_(p, r, splat(1.6666665459e-1f));
    p = fma_(p, r, splat(5.0000001201e-1f));
    const vf y = fma_(p, r * r, r) + splat(1.f);
    const vi k = __builtin_convertvector(n, vi), k1 = k >> 1, k2 = k - k1;
    return (y * (vf)((k1 + 127) << 23)) * (vf)((k2 + 127) << 23);
}

typedef struct {
    const float *gate, *up;
    float *out;
    int64_t width, in_stride, per, rows;
} silu_t;

static void silu_block(const void *ctx, int64_t blk)
{
    const silu_t *c = ctx;
    const int64_t n = c->width, end = (blk + 1) * c->per < c->rows ? (blk + 1) * c->per : c->rows;
    const vf one = splat(1.f);
    for (int64_t t = blk * c->per; t < end; t++) {
        const float *g = c->gate + t * c->in_stride, *u = c->up + t * c->in_stride;
        float *o = c->out + t * n;
        int64_t i = 0;
        for (; i + VW <= n; i += VW) {
            const vf gv = ld(g + i);
            st(o + i, (gv / (one + vexp(-gv))) * ld(u + i));
        }
        if (i < n) { /* the tail through one padded vector */
            float gt[VW] = {0}, et[VW];
            for (int64_t j = i; j < n; j++) gt[j - i] = -g[j];
            st(et, vexp(ld(gt)));
            for (int64_t j = i; j < n; j++) o[j] = (g[j] / (1.f + et[j - i])) * u[j];
        }
    }
}

/* gate, up: rows `in_stride` floats apart (the halves of gate_up [rows, 2 * width]); out
   [rows, width] contiguous. */
void pantry_fused_silu_mul(const float *gate, const float *up, float *out, int64_t rows,
                           int64_t width, int64_t in_stride, int64_t min_block)
{
    /* An element is an exp and a division: weighs about four of a norm's. */
    const span_t s = split(rows, 4 * width, min_block);
    const silu_t c = {gate, up, out, width, in_stride, s.per, rows};
    run(silu_block, &c, s);
}

/* ---- rotary, in place ---------------------------------------------------------------------- */
typedef struct {
    float *x;
    const float *cos, *sin;
    int64_t heads, dim, row_stride, per, rows;
} rot_t;

/* Head x [dim]: (x1, x2) -> (x1 c1 + x2 s1, x2 c2 + x1 s2), s the signed sine: engine.rope's
   x * cos + roll(x, dim / 2) * signed_sin, the same products and sums. */
static void rot_block(const void *ctx, int64_t blk)
{
    const rot_t *c = ctx;
    const int64_t half = c->dim / 2;
    const int64_t end = (blk + 1) * c->per < c->rows ? (blk + 1) * c->per : c->rows;
    for (int64_t t = blk * c->per; t < end; t++) {
        const float *cs = c->cos + t * c->dim, *sn = c->sin + t * c->dim;
        for (int64_t h = 0; h < c->heads; h++) {
            float *x = c->x + t * c->row_stride + h * c->dim;
            int64_t i = 0;
            for (; i + VW <= half; i += VW) {
                const vf a = ld(x + i), b = ld(x + half + i);
                st(x + i, a * ld(cs + i) + b * ld(sn + i));
                st(x + half + i, b * ld(cs + half + i) + a * ld(sn + half + i));
            }
            for (; i < half; i++) {
                const float a = x[i], b = x[half + i];
                x[i] = a * cs[i] + b * sn[i];
                x[half + i] = b * cs[half + i] + a * sn[half + i];
            }
        }
    }
}

/* x: rows `row_stride` floats apart, each `heads` contiguous heads of `dim`; cos, sin [rows,
   dim] contiguous. */
void pantry_fused_rotary(float *x, const float *cos, const float *sin, int64_t rows,
                         int64_t heads, int64_t dim, int64_t row_stride, int64_t min_block)
{
    const span_t s = split(rows, heads * dim, min_block);
    const rot_t c = {x, cos, sin, heads, dim, row_stride, s.per, rows};
    run(rot_block, &c, s);
}
"""


def build(flags: list[str] | None = None, *, pool: bool = True) -> ctypes.CDLL:
    """The library built with `flags` (default C_FLAGS) and, with `pool`, taking engine.cpu_pool
    (where it is available; else every call runs on the caller). Tests build it with the
    AVX2 and plain vector widths too."""
    handle = ctypes.CDLL(str(compile_library("fused_ops", _SOURCE, flags or C_FLAGS)))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    handle.pantry_fused_rms_norm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, i64]
    handle.pantry_fused_rms_norm.restype = None
    handle.pantry_fused_silu_mul.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64]
    handle.pantry_fused_silu_mul.restype = None
    handle.pantry_fused_rotary.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64]
    handle.pantry_fused_rotary.restype = None
    handle.pantry_fused_set_pool.argtypes = [ptr]
    handle.pantry_fused_set_pool.restype = None
    handle.pantry_fused_vector_width.argtypes = []
    handle.pantry_fused_vector_width.restype = ctypes.c_int
    handle.pantry_fused_set_pool(cpu_pool.run_function() if pool else None)
    return handle


_kernel = KernelLibrary("CPU fused elementwise ops", "torch's ops", build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_FUSED_OPS"))
_enabled = True


def available() -> bool:
    """Whether the kernels are built and loaded (built on the first call), not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


def set_enabled(enabled: bool) -> None:
    """Turn the kernels off (callers take torch's ops) or back on, in this process: for
    benchmarks that alternate the two paths in one run."""
    global _enabled
    _enabled = enabled


def applies(x: Tensor) -> bool:
    """Whether x (an activation of the layer) takes these kernels: float32 on CPU, no gradient
    wanted, the library loaded and enabled. Each op also needs the layouts it states."""
    return (_enabled and x.dtype == torch.float32 and x.device.type == "cpu"
            and not x.requires_grad and _kernel.available())


def _lib() -> ctypes.CDLL:
    lib = _kernel.lib
    assert lib is not None, "call applies() or available() first"
    return lib


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [rows, width] contiguous, weight [width] -> a new RMSNorm(x) * weight."""
    assert x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()
    assert weight.shape == x.shape[1:] and weight.dtype == x.dtype == torch.float32
    out = torch.empty_like(x)
    _lib().pantry_fused_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(),
                                 x.shape[0], x.shape[1], eps, MIN_BLOCK_ELEMENTS)
    return out


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x += delta in place (x, delta [rows, width] contiguous), then a new RMSNorm(x) * weight."""
    assert x.dim() == 2 and x.is_contiguous() and delta.is_contiguous()
    assert delta.shape == x.shape and weight.shape == x.shape[1:] and weight.is_contiguous()
    assert x.dtype == delta.dtype == weight.dtype == torch.float32
    out = torch.empty_like(x)
    _lib().pantry_fused_rms_norm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(),
                                 out.data_ptr(), x.shape[0], x.shape[1], eps,
                                 MIN_BLOCK_ELEMENTS)
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [rows, 2 * width] with contiguous rows (gate, then up) -> silu(gate) * up, a new
    [rows, width]."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    assert gate_up.dtype == torch.float32
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=torch.float32)
    base = gate_up.data_ptr()
    _lib().pantry_fused_silu_mul(base, base + 4 * width, out.data_ptr(), rows, width,
                                 gate_up.stride(0), MIN_BLOCK_ELEMENTS)
    return out


def rotary_takes(x: Tensor, cos: Tensor, signed_sin: Tensor) -> bool:
    """Whether `rotary_` takes these: x [rows, heads, dim] with each row's heads contiguous
    (rows at any distance: the queries and keys in the QKV projection's output), cos and
    signed_sin [rows, 1, dim] contiguous, all float32."""
    return (x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and x.shape[2] % 2 == 0 and cos.shape == signed_sin.shape == (x.shape[0], 1,
                                                                           x.shape[2])
            and cos.is_contiguous() and signed_sin.is_contiguous()
            and cos.dtype == signed_sin.dtype == torch.float32)


def rotary_(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """engine.rope.apply_rotary's result written over x (see `rotary_takes`); returns x."""
    assert rotary_takes(x, cos, signed_sin) and x.dtype == torch.float32
    rows, heads, dim = x.shape
    _lib().pantry_fused_rotary(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), rows, heads,
                               dim, x.stride(0), MIN_BLOCK_ELEMENTS)
    return x
