"""Building the engine's C kernels: compiled on first use with the machine's C compiler (`cc`,
or $CC) into a cache directory ($PANTRY_KERNEL_CACHE, default ~/.cache/pantry/kernels), keyed
by source, compiler flags and CPU, so a library built with -march=native is only loaded on the
kind of CPU it was built for. The callers load the file with ctypes."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


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
