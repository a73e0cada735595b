"""Diagnoses: which usual mistake explains a wrong hand VJP?

When a rule's hand cotangent for one argument disagrees with the reference's, :func:`diagnose`
computes the wrong answers the usual mistakes would give and names every one that explains
the numbers to round-off (the checker's ``vjp`` tolerance) while the right answer does not:

* from the right answer ``E``, for every rule (:mod:`manualgrad.check.generic_mistakes`): ``E``
  transposed, ``E`` times a usual constant, or else the constant fitted by least squares;
  and, for a backward whose output has the wrong shape (:func:`diagnose_raw`), a broadcast
  axis not summed, ``E`` transposed or its axes permuted, ``E`` reshaped wrongly;
* from the rule's reference at transformed inputs, per rule: ``Rule.mistakes``
  (:mod:`manualgrad.rules.mistakes`: ``σ'`` at the output, the kernel not flipped, padding off by
  one, the stride not dilated into ``G``, ...).

A random error is explained by none of them: "no known mistake explains it".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.check import generic_mistakes as generic
from manualgrad.check.tolerances import ATOL, TOLERANCES, fast_compile_options
from manualgrad.check.trees import flat
from manualgrad.registry import Rule
from manualgrad.rules import mistakes

NO_EXPLANATION = "no known mistake explains it"
# The least-squares constant says something only when the argument has more entries than it.
MIN_FITTED_SIZE = 3


def vjp(fn, primal, g):
    """``fn``'s VJP for ``primal`` under ``g``: JAX's autodiff, applied to references only."""
    return jax.vjp(fn, primal)[1](g)[0]


def diagnose(rule: Rule, args: tuple[Any, ...], argument: int, received: Any, g: Any, dtype: str) -> str:
    """What ``received``, the hand cotangent of ``args[argument]`` under the output cotangent
    ``g``, is: ``"your gradient equals ..."`` for every usual mistake that explains it, or
    :data:`NO_EXPLANATION`."""
    tol = _tolerance(dtype)
    right, candidates = _evaluate(rule, args, argument, g)
    found = [text for text, c in candidates if _explains(c, received, tol) and not _explains(c, right, tol)]
    if not found:
        fitted = _fitted_constant(right, received, tol)
        found = [fitted] if fitted else []
    return "your gradient equals " + "; or ".join(found) if found else NO_EXPLANATION


def diagnose_array(received: Any, right: Any, args: Any, dtype: str, extra: Iterable[tuple[str, Any]] = ()) -> str:
    """What ``received`` is, a gradient whose right value is ``right``, where no rule is known (a
    whole network's intermediate): ``"your gradient equals ..."`` for each candidate of ``extra``
    (``(text, wrong answer)``) and each generic mistake (:mod:`manualgrad.check.generic_mistakes`; the
    usual batch sizes read from ``args``) that explains it; of the wrong shape, the first shape
    mistake that does; else :data:`NO_EXPLANATION`."""
    tol = _tolerance(dtype)
    received, right = np.asarray(received, np.float64), np.asarray(right, np.float64)
    if received.shape != right.shape:
        found = [t for t, fixed in generic.shape_mistakes(received, right.shape) if _explains(fixed, right, tol)][:1]
    else:
        pairs = [*extra, *generic.candidates(args, right)]
        found = [t for t, c in pairs if _explains(c, received, tol) and not _explains(c, right, tol)]
        found = found or [f for f in [_fitted_constant(right, received, tol)] if f]
    return "your gradient equals " + "; or ".join(found) if found else NO_EXPLANATION


class WrongShape(NamedTuple):
    """A raw cotangent of the wrong shape, and what it is."""

    received: tuple[int, ...]
    expected: tuple[int, ...]
    diagnosis: str


def diagnose_raw(rule: Rule, args: tuple[Any, ...], g: Any, dtype: str) -> dict[int, WrongShape]:
    """Runs the rule's backward directly, outside ``custom_vjp`` (which rejects a cotangent of
    the wrong shape before anyone sees it), and diagnoses each argument whose raw cotangent
    has the wrong shape (:func:`manualgrad.check.generic_mistakes.shape_mistakes`), or says :data:`NO_EXPLANATION`."""
    fn = rule.fn
    nondiff = getattr(fn, "nondiff_argnums", ())
    try:
        _, residuals = fn.fwd(*args)
        raw = fn.bwd(*[args[i] for i in nondiff], residuals, g)
    except Exception:  # a backward that cannot run at all has nothing to diagnose
        return {}
    if not isinstance(raw, (tuple, list)):
        return {}
    primal = [j for j in range(len(args)) if j not in nondiff]
    out = {}
    tol = _tolerance(dtype)
    for i, cotangent in zip(primal, raw):
        if (
            i not in rule.differentiable
            or not hasattr(cotangent, "shape")
            or jnp.shape(cotangent) == jnp.shape(args[i])
        ):
            continue
        right = np.asarray(mistakes.reference_vjp(rule.reference, args, i, g, vjp))
        received = np.asarray(cotangent)
        found = next(
            (text for text, fixed in generic.shape_mistakes(received, right.shape) if _explains(fixed, right, tol)),
            NO_EXPLANATION,
        )
        out[i] = WrongShape(
            received.shape, right.shape, found if found == NO_EXPLANATION else "your gradient equals " + found
        )
    return out


def _evaluate(rule: Rule, args, argument: int, g) -> tuple[Any, list[tuple[str, Any]]]:
    """The right answer and every candidate, computed in one compiled program (one compile
    instead of one per candidate); the arrays of ``args`` are traced, everything else static."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
    texts: list[str] = []

    def program(arrays, g):
        full = list(leaves)
        for i, a in zip(traced, arrays):
            full[i] = a
        a = jax.tree_util.tree_unflatten(treedef, full)
        right = mistakes.reference_vjp(rule.reference, a, argument, g, vjp)
        pairs = list(_candidates(rule, a, argument, right, g))
        texts[:] = [text for text, _ in pairs]
        return right, [c for _, c in pairs]

    compiled = jax.jit(program, compiler_options=fast_compile_options())
    right, values = compiled([leaves[i] for i in traced], g)
    return right, list(zip(texts, values))


def _candidates(rule: Rule, args, argument: int, right, g) -> Iterator[tuple[str, Any]]:
    for mistake in rule.mistakes:
        if mistake.argument == argument:
            try:
                yield from mistake.candidates(vjp, args, g)
            except (ValueError, TypeError):  # candidates that do not apply to this sample's shapes: none further
                pass
    yield from generic.candidates(args, right)


def _fitted_constant(right, received, tol) -> str:
    e, r = flat(right), flat(received)
    if e.shape != r.shape or e.size < MIN_FITTED_SIZE or not np.any(np.abs(e) > tol[1]) or not np.all(np.isfinite(r)):
        return ""
    c = float(np.vdot(r, e) / np.vdot(e, e))
    if _explains(c * e, r, tol) and not _explains(c * e, e, tol):
        return f"{c:.4g} × the right one: off by a constant factor"
    return ""


def _explains(candidate, received, tol) -> bool:
    """``received`` equals ``candidate`` entry by entry to round-off, on the entries where the
    candidate is defined (finite; ``σ⁻¹`` is not everywhere), of which some must be non-zero
    when not all are defined."""
    c, r = flat(candidate), flat(received)
    defined = np.isfinite(c)
    if c.shape != r.shape or not defined.any():
        return False
    c, r = c[defined], r[defined]
    if not defined.all() and not np.any(np.abs(c) > tol[1]):
        return False
    err = np.abs(c - r)
    return bool(np.all((err <= tol[1]) | (err <= tol[0] * np.maximum(np.abs(c), np.abs(r)))))


def _tolerance(dtype: str) -> tuple[float, float]:
    """Round-off, as the checker's ``vjp`` check counts it: (relative, absolute)."""
    return TOLERANCES[dtype]["vjp"], ATOL[dtype]
