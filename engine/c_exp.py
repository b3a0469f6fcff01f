"""The exponential the engine's C kernels share, as C pasted into their sources (they are built
and loaded by pantry.common.c_library)."""

from __future__ import annotations

# C the kernels share, pasted into their sources after they define `vf` / `vi` (float and int32
# vectors of one width), `splat` and `INLINE`.
C_EXP = r"""
/* e^r for |r| <= ln2 / 2, within ~1 ulp: Cephes' polynomial. */
INLINE vf exp_reduced(vf r)
{
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    return p * (r * r) + r + splat(1.f);
}

/* e^x for x <= 0 (a score minus its maximum), exactly 0 below -87 (and for -inf, a masked
   score): x = n ln2 + r, 2^n written into the exponent bits. libm's expf would be one call
   per score. */
INLINE vf exp_nonpositive_bits(vf x)
{
    const vf lo = splat(-87.f);
    const vi under = x < lo;
    x = (vf)(((vi)x & ~under) | ((vi)lo & under));
    /* y - 0.5 <= 0, so truncating it rounds y to nearest. */
    const vi n = __builtin_convertvector(x * splat(1.44269504088896341f) - splat(0.5f), vi);
    const vf fn = __builtin_convertvector(n, vf);
    const vf p = exp_reduced(x - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f));
    return (vf)((vi)(p * (vf)((n + 127) << 23)) & ~under);
}
"""
