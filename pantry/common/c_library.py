"""C sources built into shared libraries on first use, for the layers that have hot loops in
C (the engine's kernels, the pool's hashed copies): compiled with the machine's C compiler
(`cc`, or $CC) into a cache directory ($PANTRY_KERNEL_CACHE, default ~/.cache/pantry/kernels),
keyed by source, compiler flags and CPU, so a library built with -march=native is only loaded on
the kind of CPU it was built for. The callers load the file with ctypes."""

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
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def compile_library(name: str, source: str, flags: list[str]) -> Path:
    """The shared library `name`-<key>.so built from `source` with `flags`, compiled unless
    the cache has it. Raises RuntimeError (no compiler, or it failed), OSError or
    subprocess.SubprocessError."""
    key = hashlib.sha256("\0".join([source, *flags, platform.machine(),
                                    _cpu_name()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PANTRY_KERNEL_CACHE",
                                Path.home() / ".cache" / "pantry" / "kernels"))
    lib = cache / f"{name}-{key}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or $CC) on this machine")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / f"{name}.c"
            src.write_text(source)
            built = Path(tmp) / "out.so"
            done = subprocess.run([cc, *flags, str(src), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
            os.replace(built, lib)  # atomic: processes building at once each get a whole file
    return lib


class KernelLibrary:
    """One C library: built and loaded on first use, once a process, or the reason it is not
    (a switch set to 0, no compiler, a failed build), in which case its callers keep their
    Python (torch, numpy) path."""

    def __init__(self, what: str, fallback: str, build: Callable[[], ctypes.CDLL],
                 switches: tuple[str, ...] = ("PANTRY_CPU_KERNELS",)) -> None:
        self.what = what
        self.fallback = fallback
        self.switches = switches
        self._build = build
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None

    def available(self) -> bool:
        if self.lib is not None or self.reason is not None:
            return self.lib is not None
        with self._lock:
            if self.lib is None and self.reason is None:
                off = next((s for s in self.switches if os.environ.get(s, "1") == "0"), None)
                if off is not None:
                    self.reason = f"{off}=0"
                else:
                    try:
                        self.lib = self._build()
                    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                        self.reason = str(exc)
                        log.warning("%s unavailable, using %s: %s", self.what, self.fallback,
                                    exc)
        return self.lib is not None

    def unavailable_reason(self) -> str | None:
        self.available()
        return self.reason
