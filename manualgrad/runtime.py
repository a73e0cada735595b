"""Process-wide settings that the command line applies before the first JAX computation.

A program that uses the library directly calls :func:`reuse_host_memory` itself if it wants it.
"""

from __future__ import annotations

import os
import platform

from manualgrad.errors import ManualgradError

# glibc's malloc settings that keep a freed block's pages for the next step (see host_memory)
REUSE_HOST_MEMORY = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
_MALLOPT = {"MALLOC_ARENA_MAX": -8, "MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1}  # M_ARENA_MAX, ...
_applied: list[str] = []


class HostMemoryError(ManualgradError, OSError):
    """glibc refused one of the malloc settings."""


def reuse_host_memory() -> bool:
    """Sets :data:`REUSE_HOST_MEMORY` in this process through glibc's ``mallopt``, unless the
    environment sets any of them (or ``GLIBC_TUNABLES``) or the C library is not glibc; True if set.

    Call it before the process's first JAX computation: XLA:CPU's pool threads take their malloc
    arenas when they first allocate, and ``M_ARENA_MAX`` bounds only the arenas made after it
    (``manualgrad bench`` measures the step with it). The main heap then keeps its freed pages
    (no trimming): the process stays at its peak memory.
    ``manualgrad``'s command line calls it first thing; a program using the library calls it itself.
    """
    import ctypes

    if _applied or platform.libc_ver()[0] != "glibc" or _from_environment():
        return bool(_applied)
    mallopt = ctypes.CDLL(None).mallopt
    for name, value in REUSE_HOST_MEMORY.items():
        if mallopt(_MALLOPT[name], int(value)) != 1:
            raise HostMemoryError(f"reuse_host_memory: glibc's mallopt refused {name}={value}")
        _applied.append(f"{name}={value}")
    return True


def host_memory() -> str:
    """The ``malloc`` settings this process runs with: those of :data:`REUSE_HOST_MEMORY` that the
    environment sets, as ``NAME=value`` (and ``GLIBC_TUNABLES``), else those
    :func:`reuse_host_memory` set (``mallopt NAME=value ...``), else ``"defaults"``.

    XLA:CPU allocates a step's temporaries as one block on every execution. Asked for by a pool
    thread, a block larger than a glibc thread arena's 64 MB heap is mapped afresh and unmapped
    when freed, so each step faults in its zeroed pages again. One arena (the main heap, which
    grows without bound), no mapped chunks and no trimming keep the block's pages between steps
    (``manualgrad bench`` prints the setting in its header).
    """
    return _from_environment() or (f"mallopt {' '.join(_applied)}" if _applied else "defaults")


def _from_environment() -> str:
    """The settings of :data:`REUSE_HOST_MEMORY` (and ``GLIBC_TUNABLES``) the environment gives, as ``NAME=value``."""
    names = [*REUSE_HOST_MEMORY, "GLIBC_TUNABLES"]
    return " ".join(f"{name}={os.environ[name]}" for name in names if name in os.environ)
