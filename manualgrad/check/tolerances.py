"""What counts as agreement: the checks, their tolerances, the relative errors, the compiler options.

Errors are relative, entry by entry (:func:`relative_errors`): ``|a − n| / max(|a|, |n|)``, 0
where both are 0. An entry fails when that exceeds the dtype's tolerance (:data:`TOLERANCES`)
*and* its absolute error exceeds round-off (:data:`ATOL`, ten ulps of 1; for finite
differences their own round-off, at most :data:`FD_ATOL`, :mod:`~manualgrad.check.finite_differences`):
the sample inputs are of order one, so an entry that should be 0 and comes out as 1e-17 is
not a failure. Two summaries of a whole gradient sit beside it: :func:`relative_error`, the
largest entry's error over the largest entry (training's cross-check, the comparison tables,
``explain``), and :func:`relative_l2` (the benchmark).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CHECKS = ("forward", "vjp", "finite_diff", "adjoint", "jit", "vmap", "grad_of_grad")
# The adjoint mismatch is normalised by the Cauchy–Schwarz bound of its terms (see
# adjoint_mismatch), so its round-off is a small multiple of the dtype's epsilon whatever the
# cancellation: 1e-13 is 450 ulps of float64; 1e-6 is 8 ulps of float32.
TOLERANCES = {
    "float64": {
        "forward": 1e-12,
        "vjp": 1e-12,
        "finite_diff": 1e-6,
        "adjoint": 1e-13,
        "jit": 1e-12,
        "vmap": 1e-12,
        "grad_of_grad": 1e-12,
    },
    "float32": {
        "forward": 1e-5,
        "vjp": 1e-5,
        "finite_diff": 1e-6,
        "adjoint": 1e-6,
        "jit": 1e-5,
        "vmap": 1e-5,
        "grad_of_grad": 1e-5,
    },
}
ATOL = {"float64": 10 * float(np.finfo(np.float64).eps), "float32": 10 * float(np.finfo(np.float32).eps)}
FD_ATOL = 1e-8
# XLA:CPU builds the sample programs several times faster without LLVM's optimisation passes
# and with its older loop emitters, and faster again as one LLVM module rather than split into
# parts built in parallel (each part pays for its own LLVM set-up, and the checker's threads keep
# the cores busy anyway; ``manualgrad bench --check-rules`` times the check). Only code generation changes: the
# computation, and so every check, is the same; results may differ from a default build by round-off.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
}


@functools.cache
def fast_compile_options() -> dict[str, Any] | None:
    """:data:`FAST_COMPILE` on the CPU backend where this jaxlib knows those options, else ``None``."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.sin, compiler_options=FAST_COMPILE).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return FAST_COMPILE


def relative_errors(received: np.ndarray, expected: np.ndarray, atol: Any) -> tuple[np.ndarray, np.ndarray]:
    """Entry by entry, on flat float64 arrays ``a`` (received) and ``n`` (expected): the absolute
    errors ``|a − n|`` and the relative ones ``|a − n| / max(|a|, |n|)``, 0 where that scale is at
    most ``atol`` (round-off), ``inf`` where either entry is NaN."""
    abs_err = np.abs(received - expected)
    scale = np.maximum(np.abs(received), np.abs(expected))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > atol, abs_err / scale, 0.0)
    return abs_err, np.where(np.isnan(received) | np.isnan(expected), np.inf, rel)


def relative_error(received: Any, expected: Any) -> float:
    """The worst leaf of two pytrees by the max-entry norm, in float64 on the host:
    ``max over leaves of max_i |a_i − b_i| / max_i |b_i|`` (``b`` expected; the denominator at
    least float64's smallest normal number)."""
    tiny = np.finfo(np.float64).tiny
    pairs = zip(jax.tree_util.tree_leaves(received), jax.tree_util.tree_leaves(expected))
    return max(
        (
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
            / max(float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)), tiny)
            for a, b in pairs
        ),
        default=0.0,
    )


def relative_l2(received: Any, expected: Any) -> float:
    """``‖a − b‖₂ / ‖b‖₂`` over all leaves of two pytrees together, in float64 (``b`` expected):
    round-off, not the odd ReLU that flips at its kink."""
    a = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(received)]
    b = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(expected)]
    diff = sum(float(np.sum((p - q) ** 2)) for p, q in zip(a, b))
    return (diff / max(sum(float(np.sum(q**2)) for q in b), 1e-300)) ** 0.5
