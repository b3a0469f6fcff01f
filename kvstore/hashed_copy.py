"""Copies that checksum what they move: a batch of copies in one C call, without the GIL.

A pull moves hundreds of 0.7 MB blocks out of a node's shared-memory segment, and a prefill's
store as many in. Done as one numpy copy per block plus one xxh3 pass per block (before a
store's copy, after a read's), each costs the decode step beside it twice:
- memory traffic: the copy reads the source, reads the destination's lines in (a plain store
  writes a line only after reading it) and writes them back; the hash reads the block again.
  A decode step streams its weights from DRAM, so it slows while the bytes move;
- the GIL (a pull runs in the decode engine's process): every block's copy and hash releases
  it and takes it back, and each time it is contended the loop can wait for a puller thread
  that another process has the core of.

Here each object moves in one pass: 16 KB at a time into a buffer that stays in L1, hashed
there (xxh3's streaming state, so the digest is the one-shot digest of the whole payload, of
the bytes exactly as they were stored), then streamed out with non-temporal stores, which write
lines without reading them and leave the caches to the step. A batch is one call with the GIL
released. The digests are xxh3-64 from the `xxhash` package's own library (its exported C
functions, looked up by ctypes), so they are the digests the writers put in the headers.
bench/pull_copy.py measures both against the numpy copies and separate hashes.

Without a C compiler, or with PANTRY_HASHED_COPY=0, `available()` is False and callers keep
their numpy copy and Python check.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np
import xxhash
import xxhash._xxhash

from pantry.common.c_library import KernelLibrary, compile_library

# Bytes per pass through the L1 buffer: its lines stay cached between the copy in, the hash
# and the copy out.
CHUNK = 16 * 1024

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

typedef void *(*create_fn)(void);
typedef int (*free_fn)(void *);
typedef int (*reset_fn)(void *);
typedef int (*update_fn)(void *, const void *, size_t);
typedef uint64_t (*digest_fn)(const void *);

static create_fn x_create;
static free_fn x_free;
static reset_fn x_reset;
static update_fn x_update;
static digest_fn x_digest;

void hashed_copy_init(create_fn c, free_fn f, reset_fn r, update_fn u, digest_fn d)
{
    x_create = c; x_free = f; x_reset = r; x_update = u; x_digest = d;
}

/* n bytes to dst, with non-temporal stores where dst is 16-byte aligned. */
static void store_out(uint8_t *dst, const uint8_t *src, size_t n)
{
#if defined(__SSE2__)
    if (((uintptr_t)dst & 15) == 0) {
        size_t k = 0;
        for (; k + 64 <= n; k += 64) {
            __m128i a = _mm_load_si128((const __m128i *)(src + k));
            __m128i b = _mm_load_si128((const __m128i *)(src + k + 16));
            __m128i c = _mm_load_si128((const __m128i *)(src + k + 32));
            __m128i d = _mm_load_si128((const __m128i *)(src + k + 48));
            _mm_stream_si128((__m128i *)(dst + k), a);
            _mm_stream_si128((__m128i *)(dst + k + 16), b);
            _mm_stream_si128((__m128i *)(dst + k + 32), c);
            _mm_stream_si128((__m128i *)(dst + k + 48), d);
        }
        memcpy(dst + k, src + k, n - k);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* For each i < n: len[i] bytes from src[i] to dst[i]; where hash[i], digests[i] is the xxh3-64
   of those bytes. Returns 0, or -1 when no hash state could be allocated (nothing copied). */
int hashed_copy(int64_t n, uint8_t *const *src, uint8_t *const *dst, const int64_t *len,
                const uint8_t *hash, uint64_t *digests)
{
    _Alignas(64) uint8_t buf[CHUNK];
    void *state = x_create();
    if (!state) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (!hash[i]) {
            memcpy(dst[i], src[i], (size_t)len[i]);
            continue;
        }
        x_reset(state);
        for (int64_t off = 0; off < len[i]; off += CHUNK) {
            size_t c = (size_t)(len[i] - off < CHUNK ? len[i] - off : CHUNK);
            memcpy(buf, src[i] + off, c);
            x_update(state, buf, c);
            store_out(dst[i] + off, buf, c);
        }
        digests[i] = x_digest(state);
    }
#if defined(__SSE2__)
    _mm_sfence();  /* the streamed lines are visible before the caller reads or publishes them */
#endif
    x_free(state);
    return 0;
}
"""


def _build() -> ctypes.CDLL:
    source = f"#define CHUNK {CHUNK}\n{_SOURCE}"
    lib = ctypes.CDLL(str(compile_library("hashed_copy", source, ["-O2", "-fPIC", "-shared"])))
    # The extension module Python loaded (and never unloads): the functions stay where they are.
    xx = ctypes.CDLL(xxhash._xxhash.__file__)
    names = ("XXH3_createState", "XXH3_freeState", "XXH3_64bits_reset", "XXH3_64bits_update",
             "XXH3_64bits_digest")
    lib.hashed_copy_init.argtypes = [ctypes.c_void_p] * len(names)
    lib.hashed_copy_init.restype = None
    lib.hashed_copy_init(*(ctypes.cast(getattr(xx, n), ctypes.c_void_p) for n in names))
    lib.hashed_copy.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
    lib.hashed_copy.restype = ctypes.c_int
    return lib


_LIBRARY = KernelLibrary("the pool's hashed copy", "numpy copies and Python checks", _build,
                         switches=("PANTRY_HASHED_COPY",))


def available() -> bool:
    return _LIBRARY.available()


def address(view: memoryview) -> int:
    """Where a buffer's bytes start (writable or not)."""
    return int(np.frombuffer(view, np.uint8).ctypes.data)


def copy(sources: Sequence[int], targets: Sequence[memoryview],
         hashed: Sequence[bool]) -> list[int | None]:
    """Each target filled with its nbytes from the address sources[i] (which the caller keeps
    mapped and in range); the xxh3-64 of the bytes copied where hashed[i], else None. One C
    call, with the GIL released. Only when `available()`."""
    lib = _LIBRARY.lib
    assert lib is not None, "hashed_copy.copy without available()"
    n = len(targets)
    assert len(sources) == n == len(hashed)
    src = np.array(sources, np.uint64)
    dst = np.array([address(t) for t in targets], np.uint64)
    lens = np.array([t.nbytes for t in targets], np.int64)
    want = np.array(hashed, np.uint8)
    out = np.zeros(n, np.uint64)
    if lib.hashed_copy(n, src.ctypes.data, dst.ctypes.data, lens.ctypes.data, want.ctypes.data,
                       out.ctypes.data):
        raise MemoryError("no memory for an xxh3 state")
    return [int(d) if h else None for d, h in zip(out.tolist(), hashed, strict=True)]
