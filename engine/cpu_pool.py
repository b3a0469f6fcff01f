"""A thread pool of our own for the engine's C kernels on CPU.

The engines run torch with OMP_WAIT_POLICY=PASSIVE (prefill shares the cores: spinning OpenMP
threads would steal its cycles), so torch's second OpenMP thread sleeps after every op and a
futex wake (tens of us) comes before it helps with the next. A decode step is ~121 small
matmuls of 50-300 us and a layer's elementwise ops take tens to hundreds of us: that wake is a
large share of each. This pool is the calling thread plus one helper pthread per extra core
(`set_threads`):
- a helper spins (pause, yielding the core every few us to anything else runnable) for SPIN_US
  after the last job it saw, then sleeps on a futex: within a step, whose kernels follow each
  other within tens of us, it never sleeps; between steps it does not burn the core;
- a job is `blocks` calls of one C function, fn(ctx, b), claimed one at a time by
  compare-and-swap, by the caller and the helpers alike. The caller never waits for a helper
  that has claimed nothing (a helper descheduled by prefill on its core leaves every block to
  the caller), only for blocks a helper has claimed and not finished.

Far helpers (`set_far_helpers`) are threads on CPUs the caller's engine does not compute on:
a decode engine confined to its own CPU while prefill computes (engine.cpu_split) runs its
pool as the caller alone, plus one far helper per CPU of prefill's. A far helper never spins:
it sleeps until a job posted through `run_function(far=True)` (the paged decode kernel's over
a long context) wakes it, claims blocks like any helper, and sleeps again. Prefill gives up
its core only while that work waits, and the caller never waits for a far helper that prefill
keeps off its core. Switched off, they stay asleep, to come back on at the next switch.
Beside prefill's work, a 4k-token sequence then adds 10 ms to a decode step rather than 23.5
(bench/long_context_decode.py --beside-prefill).

Between jobs an idle helper can read a posted range into cache (`prefetch`): with
PANTRY_CPU_READ_AHEAD=1 decode's linears post the weight the step reads next, so the memory
works while the caller runs Python (engine.packed_linear.read_ahead_in_order says when that pays).

A kernel library takes the pool's run function once (`run_function()`, a C address) and its
entry points call it with a context on their own stack: no Python per block, and the ctypes
call into the kernel releases the GIL. Each kernel writes every output element from one block,
so results do not depend on the number of threads or on who claimed what.

`available()` is False where no compiler works, with PANTRY_CPU_KERNELS=0 (every C kernel off)
or PANTRY_CPU_POOL=0; the kernels then run their blocks on the caller, or their callers keep
torch. The helpers are plain pthreads: they never block interpreter shutdown (the process
exits around them), and a forked child, which has none, runs its jobs on the caller alone.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from torch import Tensor

from engine.cpu_pool_source import C_POOL_TYPES as C_POOL_TYPES  # for kernel libraries' C
from engine.cpu_pool_source import C_THREAD_SCRATCH as C_THREAD_SCRATCH
from engine.cpu_pool_source import SOURCE
from pantry.common.c_library import KernelLibrary, compile_library

# How long an idle helper spins before it sleeps. A step's matmuls come tens of us apart;
# measured 8 streams, 20 / 200 / 1000 us: the longer the window, the faster the matmuls but the
# slower the attention kernel (torch's OpenMP thread then waits for the helper's core); 200 us
# was the best step.
SPIN_US = 200

# The flags every kernel library is built with. -march=native: the cache key names the CPU,
# so a library is only loaded where built.
C_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-pthread", "-fPIC",
           "-shared"]

_lock = threading.Lock()
_threads = 0  # the pool's size once started; 0 before


def _build() -> ctypes.CDLL:
    handle = ctypes.CDLL(str(compile_library("cpu_pool", SOURCE, C_FLAGS)))
    handle.pantry_pool_resize.argtypes = [ctypes.c_int, ctypes.c_int64]
    handle.pantry_pool_resize.restype = ctypes.c_int
    handle.pantry_pool_helped.argtypes = []
    handle.pantry_pool_helped.restype = ctypes.c_int64
    handle.pantry_pool_prefetched.argtypes = []
    handle.pantry_pool_prefetched.restype = ctypes.c_int64
    handle.pantry_pool_prefetch.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    handle.pantry_pool_prefetch.restype = ctypes.c_int
    handle.pantry_pool_far.argtypes = [ctypes.c_int]
    handle.pantry_pool_far.restype = ctypes.c_int
    handle.pantry_pool_far_tid.argtypes = [ctypes.c_int]
    handle.pantry_pool_far_tid.restype = ctypes.c_int
    handle.pantry_pool_far_helped.argtypes = []
    handle.pantry_pool_far_helped.restype = ctypes.c_int64
    return handle


_kernel = KernelLibrary("CPU thread pool", "the caller alone",
                        _build, ("PANTRY_CPU_KERNELS", "PANTRY_CPU_POOL"))


def available() -> bool:
    """Whether the pool is built and loaded (built on the first call) and not switched off."""
    return _kernel.available()


def unavailable_reason() -> str | None:
    return _kernel.unavailable_reason()


def set_threads(threads: int) -> None:
    """The pool becomes the calling thread plus `threads - 1` helpers (1: the caller alone)."""
    global _threads
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert threads >= 1
    lib.pantry_pool_resize(threads, SPIN_US * 1000)
    _threads = threads


def threads() -> int:
    """The pool's size, started if it is not: torch's thread count, at most the CPUs this
    process may run on (a helper sharing the caller's only core would just take turns)."""
    if not _threads:
        with _lock:
            if not _threads:
                set_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))
    return _threads


def helped_blocks() -> int:
    """Blocks the helpers have computed since the library was loaded (the rest: callers)."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_pool_helped())


_prefetching: Tensor | None = None  # the range posted last, kept alive while a helper may read it


def prefetch(tensor: Tensor) -> None:
    """Idle helpers read `tensor` (contiguous, on the CPU) into cache until the next job starts:
    what a memory-bound kernel reads next comes from cache for the part they reached. Nothing
    is computed; results never depend on it."""
    global _prefetching
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    if lib.pantry_pool_prefetch(tensor.data_ptr(), tensor.numel() * tensor.element_size()):
        _prefetching = tensor


def prefetched_chunks() -> int:
    """Chunks of 64 KiB the helpers have read ahead since the library was loaded."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_pool_prefetched())


def set_far_helpers(count: int) -> list[int]:
    """`count` far helpers switched on (0: off; they stay, asleep, and the same ones come back
    on); returns their kernel thread ids, for the caller to place on the CPUs they are to use
    (new ones start on the caller's)."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    assert count >= 0
    started = lib.pantry_pool_far(count)
    return [int(lib.pantry_pool_far_tid(i)) for i in range(started)]


def far_helped_blocks() -> int:
    """Blocks the far helpers have computed since the library was loaded."""
    lib = _kernel.lib
    assert lib is not None, "call available() first"
    return int(lib.pantry_pool_far_helped())


def run_function(far: bool = False) -> int | None:
    """The C address of `pantry_pool_run` (a `pantry_run_fn`) with the pool started, for a
    kernel library's `*_set_pool`; None where the pool is unavailable. `far`:
    `pantry_pool_run_far`, which also wakes the far helpers (for jobs large enough to pay
    for waking a thread on another engine's CPU)."""
    if not available():
        return None
    threads()
    lib = _kernel.lib
    assert lib is not None
    fn = lib.pantry_pool_run_far if far else lib.pantry_pool_run
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address is not None
    return address
