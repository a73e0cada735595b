"""JAX's persistent compilation cache for ``manualgrad check``, and fast XLA:CPU builds for its eager ops.

Checking is compile-bound, and a run checks the same programs as the last one unless a rule
changed: ``manualgrad check`` keeps the executables XLA builds in :func:`directory`
(``$XDG_CACHE_HOME/manualgrad/jax``, by default ``~/.cache/manualgrad/jax``; or
``$MANUALGRAD_CACHE_DIR``), so a second run loads them instead of compiling. JAX keys each
entry by the program's HLO, the compile options and the jaxlib version, so a changed rule
(a student's backward, say) is compiled afresh and nothing stale is run. ``--no-cache`` or
``MANUALGRAD_NO_CACHE=1`` turns it off; a cache directory the user configured for JAX
(``jax_compilation_cache_dir``) is used as it is. The cache grows with every new program:
deleting the directory is safe.

The library's :func:`~manualgrad.check.check` leaves both alone: JAX's cache, like XLA's
flags, is one setting per process, and JAX decides whether to use it at the process's first
compile, which is why the command line sets them before it computes anything.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import pathlib
from collections.abc import Iterator

import jax
import jaxlib

from manualgrad.check.tolerances import FAST_COMPILE

DIRECTORY_VARIABLE = "MANUALGRAD_CACHE_DIR"
OFF_VARIABLE = "MANUALGRAD_NO_CACHE"
# Every program is written, the check's eager ops too: reading one back costs less than building
# even the smallest.
MIN_COMPILE_SECONDS = 0.0
# jaxlib releases whose XLA is known to take every flag of FAST_COMPILE (tried on 0.10.2): XLA
# aborts the process on an unknown flag in XLA_FLAGS, so elsewhere eager ops keep XLA's default build.
FAST_FLAGS_JAXLIB = ("0.10.",)


def directory(enabled: bool = True) -> pathlib.Path | None:
    """Where ``manualgrad check`` caches compiled programs; ``None`` when ``enabled`` is false
    or ``MANUALGRAD_NO_CACHE`` is set to anything but ``""`` or ``"0"``."""
    if not enabled or os.environ.get(OFF_VARIABLE, "") not in ("", "0"):
        return None
    if os.environ.get(DIRECTORY_VARIABLE):
        return pathlib.Path(os.environ[DIRECTORY_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "manualgrad" / "jax"


@contextlib.contextmanager
def command_settings(enabled: bool = True) -> Iterator[pathlib.Path | None]:
    """The settings of ``manualgrad check`` while inside: the cache of :func:`directory`
    (``enabled`` false: none), unless JAX already has a cache directory, and
    :func:`fast_eager_builds`. Yields the cache directory in use. Enter it before the
    process's first computation; on leaving, ``XLA_FLAGS`` and JAX's settings are restored
    (what JAX and XLA read at the first compile stays in force in this process)."""
    flags = os.environ.get("XLA_FLAGS")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    path = directory(enabled)
    try:
        if saved["jax_compilation_cache_dir"]:
            path = pathlib.Path(saved["jax_compilation_cache_dir"])
        else:
            use(path)
        fast_eager_builds()
        yield path
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        if flags is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = flags


def use(path: pathlib.Path | None) -> None:
    """Keeps every program this process builds in JAX's persistent cache at ``path`` (``None``: none)."""
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)


def fast_eager_builds() -> bool:
    """Appends :data:`~manualgrad.check.tolerances.FAST_COMPILE` to ``XLA_FLAGS``, so that the
    ops the ``vjp`` check dispatches eagerly (and the rules' own ``jax.jit`` functions called
    eagerly) build as fast as the checker's programs, which pass the same options to
    ``jax.jit``: about half of an eager op's build time. XLA reads ``XLA_FLAGS`` once, at the
    process's first compile, so this is for a process that has computed nothing yet; returns
    whether the flags were set: not on a jaxlib outside :data:`FAST_FLAGS_JAXLIB`, nor where
    JAX may pick an accelerator (the checker's programs keep XLA's default build there too)."""
    if not jaxlib.__version__.startswith(FAST_FLAGS_JAXLIB) or not _cpu_only():
        return False
    flags = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_COMPILE.items())
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    return True


def _cpu_only() -> bool:
    """JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator plugin is installed.
    (Asking JAX would start its backend, which reads ``XLA_FLAGS``.)"""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))
