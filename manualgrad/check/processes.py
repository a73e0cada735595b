"""``manualgrad check`` in several processes: :func:`check`.

Checking is Python-bound once XLA's builds are cheap or cached: tracing, transforming and
lowering each sample's program hold the interpreter lock, so the checker's threads take turns
and a second core idles. The command checks its (registered, built-in) rules' samples in
:data:`PROCESSES` fresh Python processes instead, one rule at a time each (the rules with the
most differentiated arguments first: the recurrences and norms build the largest programs, and
a large one left for last keeps one process working alone), in the calling process's settings
(``XLA_FLAGS`` is inherited, the persistent cache passed on). The findings
are those of :func:`~manualgrad.check.checker.check`, in its order: the samples, their keys
and their programs are the same. Only the command itself (``python -m manualgrad``, the
``manualgrad`` script) does so: a program of yours that changed a rule before calling
``manualgrad.cli.main`` has rules a fresh process would not see, and is checked in threads,
as :func:`manualgrad.check` always is (a function or rule object cannot be sent to another process).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from manualgrad import registry
from manualgrad.check import cache, checker
from manualgrad.check.errors import CheckError
from manualgrad.check.report import Finding, Report
from manualgrad.check.timing import CompileClock, compile_share
from manualgrad.check.tolerances import CHECKS, TOLERANCES, fast_compile_options

PROCESSES = os.cpu_count() or 1


def check(
    names: Sequence[str],
    *,
    dtype: str = "float64",
    seed: int = 0,
    cache_dir: pathlib.Path | None = None,
    processes: int = PROCESSES,
) -> Report:
    """Every check of the registered rules ``names`` in ``dtype``, the rules spread over
    ``processes`` processes that keep their programs in ``cache_dir`` (``None``: no cache);
    :func:`manualgrad.check` in threads where this process is not the :func:`command`.
    Its ``compile_seconds`` is the wall time times the processes' compile time over their work."""
    if not command():
        return checker.check(list(names), dtype=dtype, seed=seed)
    if dtype not in TOLERANCES:
        raise CheckError(f"check: dtype must be one of {sorted(TOLERANCES)}, got {dtype!r}")
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # a forked JAX runtime may hang
    with _ctrl_c_ignored():  # the workers start with SIGINT ignored: a terminal's Ctrl-C stops the command alone
        pool = context.Pool(processes, initializer=cache.use, initargs=(cache_dir,))
    with pool:  # leaving terminates the workers, on Ctrl-C too
        order = sorted(names, key=lambda name: -len(registry.get(name).differentiable))
        done = dict(zip(order, pool.starmap(_check_rule, [(name, dtype, seed) for name in order], chunksize=1)))
    done = [done[name] for name in names]
    seconds = time.perf_counter() - start
    compiling, working = (sum(column) for column in zip(*(totals for _, totals in done)))
    return Report(dtype, [f for found, _ in done for f in found], seconds, compile_share(seconds, compiling, working))


@contextlib.contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored within the block (in the main thread; elsewhere signals are not ours): a
    process started then inherits it, and Python keeps an ignored SIGINT ignored at start-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def command() -> bool:
    """This process is the ``manualgrad`` command, whose rules are those a fresh process imports."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name == "manualgrad.__main__"
    return pathlib.Path(getattr(main, "__file__", "") or "").name == "manualgrad"


def _check_rule(name: str, dtype: str, seed: int) -> tuple[list[Finding], tuple[float, float]]:
    """In a worker: the findings of every sample of rule ``name``, and the clock's totals."""
    with CompileClock() as clock:
        with clock.working():
            jobs = checker.jobs([registry.get(name)], dtype, seed)
            found = [f for job in jobs for f in checker.check_job(*job, dtype, CHECKS, fast_compile_options())]
    return found, clock.totals()
