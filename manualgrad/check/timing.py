"""How much of a check's wall time went to compiling: :class:`CompileClock`.

JAX reports each stage of building a program as a time span through :mod:`jax.monitoring`:
tracing to a jaxpr, lowering to StableHLO, and XLA's compile (or the load of the executable
from the persistent compilation cache, :mod:`~manualgrad.check.cache`). The checker works in
several threads at once, and at almost every instant one of them is compiling, so the wall
time is split in proportion to the threads' time: the compile share is the time the threads
spent inside those spans (each thread's spans merged, as they nest) over the time they spent
working; the rest is running: executing, eager dispatch of built programs, drawing inputs and
comparing on the host.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from jax import monitoring

# The events of jax._src.dispatch (JAXPR_TRACE_EVENT, JAXPR_TO_MLIR_MODULE_EVENT, BACKEND_COMPILE_EVENT).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the intervals ``[start, end]``."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class CompileClock:
    """While entered, gathers each thread's spans of :data:`COMPILE_EVENTS`; :meth:`working`
    marks the threads' work. :meth:`compile_seconds` splits a wall time by their ratio."""

    def __init__(self) -> None:
        self._compiling: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
        self._working = 0.0
        self._lock = threading.Lock()

    def _listen(self, event: str, start: float, end: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self._compiling[threading.get_ident()].append((start, end))

    def __enter__(self) -> CompileClock:
        monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        monitoring.unregister_event_time_span_listener(self._listen)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Counts the time inside as one thread's work."""
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._working += time.perf_counter() - start

    def totals(self) -> tuple[float, float]:
        """``(Σ_threads |∪ compile spans|, Σ work)`` so far, in seconds."""
        with self._lock:
            return sum(union_seconds(spans) for spans in self._compiling.values()), self._working

    def compile_seconds(self, wall: float) -> float:
        """The compile share of ``wall``: ``wall · Σ_threads |∪ compile spans| / Σ work``, at most ``wall``."""
        return compile_share(wall, *self.totals())


def compile_share(wall: float, compiling: float, working: float) -> float:
    """``wall · compiling / working``, at most ``wall`` (0 without work)."""
    return wall * min(compiling / working, 1.0) if working > 0 else 0.0
