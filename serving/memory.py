"""Give freed heap memory back to the OS after a model version is released.

glibc keeps freed memory in per-thread arenas; onnxruntime sessions and their thread pools
free tens of MB at once, which would otherwise stay in the process and look like a leak
across load/unload cycles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _libc = ctypes.CDLL(_name)
        _libc.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _libc = None


def release_freed_memory() -> None:
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
