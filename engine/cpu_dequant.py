"""GGUF's Q4_1 and Q8_0 blocks dequantized in C, bit for bit as the `gguf` package's numpy code
dequantizes them.

Loading SmolLM2's GGUF spent 1.9 of its 4.2 s there: gguf applies its numpy code to groups of
16 rows at a time, and a whole-tensor numpy version is no faster (2.6 s against 2.5: five
passes over 540 MB of float32). One pass in C writes each weight once.

Every weight is the same float32 operations in the same order as gguf's: Q4_1 `(d * q) + m`,
Q8_0 `q * d`, with d and m the block's float16 scale and minimum widened to float32. Built
without -ffast-math and with contraction off, so no FMA fuses the multiply and the add: the
engine's quantized kernels (engine.cpu_quant_linear) and the float32 weights agree exactly
because both are these values. `PANTRY_CPU_DEQUANT=0` (or no compiler) keeps gguf's code.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from pantry.common.c_library import KernelLibrary, compile_library

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

static float half(const uint8_t *p)
{
    _Float16 f;
    memcpy(&f, p, 2);
    return (float)f;
}

void pantry_dequant_q4_1(const uint8_t *src, float *dst, int64_t blocks)
{
    for (int64_t b = 0; b < blocks; b++, src += 20, dst += 32) {
        const float d = half(src), m = half(src + 2);
        for (int i = 0; i < 16; i++) {
            const uint8_t q = src[4 + i];
            dst[i] = d * (float)(q & 15) + m;
            dst[i + 16] = d * (float)(q >> 4) + m;
        }
    }
}

void pantry_dequant_q8_0(const uint8_t *src, float *dst, int64_t blocks)
{
    for (int64_t b = 0; b < blocks; b++, src += 34, dst += 32) {
        const float d = half(src);
        for (int i = 0; i < 32; i++)
            dst[i] = (float)(int8_t)src[2 + i] * d;
    }
}
"""

# Exact IEEE arithmetic: no -ffast-math, and no multiply-add contracted into an FMA.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"]
_FUNCTIONS = {GGMLQuantizationType.Q4_1: "pantry_dequant_q4_1",
              GGMLQuantizationType.Q8_0: "pantry_dequant_q8_0"}


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("dequant", _SOURCE, _FLAGS)))
    for name in _FUNCTIONS.values():
        fn = getattr(handle, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
    return handle


_kernel = KernelLibrary("CPU GGUF dequantization", "gguf's numpy dequantization", _build,
                        ("PANTRY_CPU_KERNELS", "PANTRY_CPU_DEQUANT"))


def available() -> bool:
    return _kernel.available()


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """As `gguf.quants.dequantize(data, qtype)`: `data` a tensor's stored bytes ([..., row
    bytes] uint8) or values; Q4_1 and Q8_0 here, every other type by gguf."""
    name = _FUNCTIONS.get(qtype)
    if name is None or not available():
        return gguf_dequantize(data, qtype)
    lib = _kernel.lib
    assert lib is not None
    weights, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    assert raw.shape[-1] % block_bytes == 0, (raw.shape, qtype)
    out = np.empty((*raw.shape[:-1], raw.shape[-1] // block_bytes * weights), np.float32)
    getattr(lib, name)(raw.ctypes.data, out.ctypes.data, raw.size // block_bytes)
    return out
