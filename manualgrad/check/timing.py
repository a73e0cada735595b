"""How much of a check's wall time went to compiling: :class:`CompileClock`.

JAX reports each stage of building a program as a time span through :mod:`jax.monitoring`:
tracing to a jaxpr, lowering to StableHLO, and XLA's compile (or the load of the executable
from the persistent compilation cache, :mod:`~manualgrad.check.cache`). The checker builds
programs in several threads at once, so the spans overlap; their union is the wall time
during which something was being compiled, and the rest of the wall time is running:
executing, eager dispatch of cached programs, drawing inputs and comparing on the host.
"""

from __future__ import annotations

import threading
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
    """While entered, gathers the spans of :data:`COMPILE_EVENTS` (any thread's);
    :attr:`seconds` is the wall time they cover, :func:`union_seconds`."""

    def __init__(self) -> None:
        self._spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def _listen(self, event: str, start: float, end: float, **_: Any) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self._spans.append((start, end))

    def __enter__(self) -> CompileClock:
        monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        monitoring.unregister_event_time_span_listener(self._listen)

    @property
    def seconds(self) -> float:
        with self._lock:
            return union_seconds(self._spans)
