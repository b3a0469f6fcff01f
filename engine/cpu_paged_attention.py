"""Paged decode attention on CPU, read in place from the paged KV cache.

The torch path (`engine.attention._decode`) gathers every decoding sequence's keys and values
out of the cache into new tensors for each layer, then calls SDPA: the gather copies the whole
context each layer of each step (a 4k-token sequence: ~180 MB a step for SmolLM2), so a step
slows down with every long sequence in the batch. This kernel reads each block where it lies,
one pass per (sequence, KV head) on torch's own OpenMP threads, with the query heads that share
a KV head scored together (no head repeated). The same role as the Triton kernel plays on CUDA.

It is C compiled on first use with the machine's C compiler (`cc`, or $CC) into a cache
directory ($PANTRY_KERNEL_CACHE, default ~/.cache/pantry/kernels), keyed by source, compiler
flags and CPU, and loaded with ctypes. Where no compiler works, `available()` is False and
the engine keeps the torch path; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Two passes per (sequence, KV head): scores of every position for the group's query heads,
# then softmax and the weighted sum of values. Scores live in a per-thread buffer.
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The next block lies anywhere in the cache: its rows are asked for before they are due. */
static inline void prefetch_rows(const float *row, int64_t rows, int64_t stride, int64_t dim)
{
    for (int64_t t = 0; t < rows; t++)
        for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(row + t * stride + d);
}

/* Position p's row of one KV head (`head` floats into each token), K or V by `base`; at the
   start of a block, the next block's rows are prefetched. */
static inline const float *row_at(const float *base, const int64_t *tab, int64_t p,
                                  int64_t max_blocks, int64_t block_size, int64_t block_stride,
                                  int64_t token_stride, int64_t head, int64_t dim)
{
    const int64_t blk = p / block_size, at = p % block_size;
    if (at == 0 && blk + 1 < max_blocks)
        prefetch_rows(base + tab[blk + 1] * block_stride + head, block_size, token_stride, dim);
    return base + tab[blk] * block_stride + at * token_stride + head;
}

void pantry_paged_decode(
    const float *restrict q, const float *restrict k_base, const float *restrict v_base,
    int64_t block_stride, int64_t token_stride, int64_t head_stride,
    const int64_t *table, int64_t max_blocks, const int64_t *lens,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
    float scale, int64_t window, float *restrict out)
{
    const int64_t group = heads / kv_heads;
    #pragma omp parallel
    {
        int64_t cap = 0;
        float *scores = NULL;
        #pragma omp for collapse(2) schedule(static)
        for (int64_t b = 0; b < batch; b++) {
            for (int64_t kh = 0; kh < kv_heads; kh++) {
                const int64_t len = lens[b];
                const int64_t start = (window > 0 && len > window) ? len - window : 0;
                const int64_t n = len - start;
                if (n * group > cap) {
                    free(scores);
                    cap = n * group;
                    scores = (float *)malloc(sizeof(float) * cap);
                }
                const int64_t *tab = table + b * max_blocks;
                const float *qg = q + (b * heads + kh * group) * dim;
                for (int64_t p = start; p < len; p++) {
                    const float *k = row_at(k_base, tab, p, max_blocks, block_size, block_stride,
                                            token_stride, kh * head_stride, dim);
                    for (int64_t g = 0; g < group; g++) {
                        const float *qh = qg + g * dim;
                        float s = 0.f;
                        for (int64_t d = 0; d < dim; d++) s += qh[d] * k[d];
                        scores[g * n + (p - start)] = s * scale;
                    }
                }
                for (int64_t g = 0; g < group; g++) {
                    float *sg = scores + g * n;
                    float m = -INFINITY;
                    for (int64_t i = 0; i < n; i++) m = sg[i] > m ? sg[i] : m;
                    float sum = 0.f;
                    for (int64_t i = 0; i < n; i++) { sg[i] = expf(sg[i] - m); sum += sg[i]; }
                    const float inv = 1.f / sum;
                    for (int64_t i = 0; i < n; i++) sg[i] *= inv;
                    memset(out + (b * heads + kh * group + g) * dim, 0, sizeof(float) * dim);
                }
                for (int64_t p = start; p < len; p++) {
                    const float *v = row_at(v_base, tab, p, max_blocks, block_size, block_stride,
                                            token_stride, kh * head_stride, dim);
                    for (int64_t g = 0; g < group; g++) {
                        float *o = out + (b * heads + kh * group + g) * dim;
                        const float w = scores[g * n + (p - start)];
                        for (int64_t d = 0; d < dim; d++) o[d] += w * v[d];
                    }
                }
            }
        }
        free(scores);
    }
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None


def _flags() -> list[str]:
    # -march=native: the cache key names the CPU, so a library is only loaded where built.
    return ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp",
            "-fPIC", "-shared"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> ctypes.CDLL:
    flags = _flags()
    key = hashlib.sha256("\0".join([_SOURCE, *flags, platform.machine(),
                                    _cpu_name()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PANTRY_KERNEL_CACHE",
                                Path.home() / ".cache" / "pantry" / "kernels"))
    lib = cache / f"paged_decode-{key}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or $CC) on this machine")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "paged_decode.c"
            src.write_text(_SOURCE)
            built = Path(tmp) / "out.so"
            done = subprocess.run([cc, *flags, str(src), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
            os.replace(built, lib)  # atomic: processes building at once each get a whole file
    # torch has loaded its libgomp already: the library's libgomp.so.1 resolves to that one,
    # so the kernel runs on torch's OpenMP threads, not a second pool.
    handle = ctypes.CDLL(str(lib))
    fn = handle.pantry_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64, i64, i64, i64, i64,
                   ctypes.c_float, i64, ptr]
    fn.restype = None
    return handle


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call)."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib is not None
    with _lock:
        if _lib is None and _reason is None:
            if os.environ.get("PANTRY_CPU_KERNELS", "1") == "0":
                _reason = "PANTRY_CPU_KERNELS=0"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    _reason = str(exc)
                    log.warning("CPU paged attention kernel unavailable, using torch: %s", exc)
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _reason


def paged_decode_attention_cpu(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
    scale: float, sliding_window: int | None = None,
) -> Tensor:
    """q [B, H, hd] float32; k_cache/v_cache one layer's [num_blocks, block_size, n_kv, hd]
    views of the cache (strided over blocks); block_table [B, max_blocks] int64; seq_lens [B]
    int64 keys per sequence, the new token's included -> [B, H, hd]."""
    assert _lib is not None, "call available() first"
    b, heads, dim = q.shape
    num_blocks, block_size, kv_heads, hd = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and hd == dim
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    assert heads % kv_heads == 0
    q = q.contiguous()
    table = block_table.contiguous()
    lens = seq_lens.contiguous()
    assert table.dtype == lens.dtype == torch.int64 and table.shape[0] == b
    out = torch.empty_like(q)
    _lib.pantry_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.data_ptr(), table.shape[1], lens.data_ptr(),
        b, heads, kv_heads, dim, block_size, scale, sliding_window or 0, out.data_ptr())
    return out
