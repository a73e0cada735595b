"""Entry-by-entry comparison of a received array (or pytree) with the expected one, as a :class:`Finding`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.check import golden
from manualgrad.check.report import Finding
from manualgrad.check.tolerances import relative_errors
from manualgrad.check.trees import flat, is_float, locate


def compare(
    rule: str,
    check: str,
    dtype: str,
    label: str,
    argument: str,
    received: Any,
    expected: Any,
    tol: float,
    atol: Any,
    note: str = "",
    where: Callable[[int], str] | None = None,
) -> Finding:
    """Entry-by-entry relative error (:func:`~manualgrad.check.tolerances.relative_errors`);
    ``where(flat index)`` names the worst entry.

    An entry counts as a mismatch when its relative error exceeds ``tol`` and its absolute
    error exceeds ``atol`` (round-off of values of order one: entries that should be 0 but
    come out as 1e-17 are not failures). The reported relative error is the largest over the
    entries larger than ``atol``; NaN anywhere is a mismatch.
    """
    a, n = flat(received), flat(expected)
    found = functools.partial(
        Finding, rule=rule, check=check, dtype=dtype, sample=label, argument=argument, tolerance=tol
    )
    if a.shape != n.shape:
        return found(
            max_abs_error=np.inf,
            max_rel_error=np.inf,
            mismatches=max(a.size, n.size),
            size=n.size,
            where="shape",
            note=f"received {a.size} entries, expected {n.size}",
            error_over_allowed=np.inf,
        )
    if a.size == 0:
        return found(max_abs_error=0.0, max_rel_error=0.0, mismatches=0, size=0, note=note, error_over_allowed=0.0)
    abs_err, rel = relative_errors(a, n, atol)
    mismatch = (rel > tol) & ~(abs_err <= atol)
    with np.errstate(divide="ignore", invalid="ignore"):  # atol may be 0; an exact entry is 0 over allowed
        over = np.where(abs_err == 0, 0.0, np.minimum(rel / tol, abs_err / atol))  # > 1 exactly at a mismatch
    over = np.where(np.isnan(abs_err), np.inf, over)
    worst = int(np.argmax(np.where(mismatch, np.inf, rel))) if mismatch.any() else int(np.argmax(rel))
    return found(
        max_abs_error=float(np.nanmax(abs_err)),
        max_rel_error=float(rel[worst]),
        mismatches=int(mismatch.sum()),
        size=int(n.size),
        where=where(worst) if where else locate(expected, worst, argument),
        expected=float(n[worst]),
        received=float(a[worst]),
        note=note,
        error_over_allowed=float(np.max(over)),
    )


def compare_golden(
    rule: str,
    check: str,
    label: str,
    argument: str,
    received: Any,
    reference: Any,
    gold: Any,
    golden_error: float = 0.0,
    note: str = "",
) -> Finding:
    """The function's value ``received`` and the reference's ``reference``, both in the function's
    dtype, against the ``gold`` (:mod:`~manualgrad.check.golden`): the function's error
    ``err_fn``, the reference's ``err_ref``, passed when ``err_fn`` is within
    :func:`~manualgrad.check.golden.judge`'s allowance for the dtype of ``received`` (its least
    precise floating leaf), widened by ``golden_error`` where the golden has an error of its own.
    The worst entry is named; ``max_rel_error`` and ``tolerance`` are ``err_fn`` and the
    allowance over the golden's scale."""
    dtype = least_precise(received)
    err_fn, err_ref, scale = golden.max_error(received, gold), golden.max_error(reference, gold), golden.scale_of(gold)
    passed, allowed = golden.judge(err_fn, err_ref, dtype, scale, golden_error=golden_error)
    a, n = flat(received), flat(gold)
    shaped = a.shape == n.shape and a.size > 0
    worst = int(np.nanargmax(np.where(np.isnan(a - n), np.inf, np.abs(a - n)))) if shaped else 0
    per_scale = 1 / scale if scale > 0 else np.inf
    return Finding(
        rule=rule,
        check=check,
        dtype=dtype,
        sample=label,
        argument=argument,
        max_abs_error=err_fn,
        max_rel_error=err_fn * per_scale if err_fn > 0 else 0.0,
        tolerance=allowed * per_scale if allowed > 0 else 0.0,
        mismatches=int(not passed),
        size=int(n.size),
        where=locate(gold, worst, argument) if shaped else "shape",
        expected=float(n[worst]) if shaped else 0.0,
        received=float(a[worst]) if shaped else 0.0,
        note=note,
        error_over_allowed=err_fn / allowed if allowed > 0 else (0.0 if err_fn == 0 else np.inf),
        err_ref=err_ref,
        allowed=allowed,
    )


def least_precise(tree: Any) -> str:
    """The name of the least precise floating dtype among ``tree``'s leaves (float64 where none)."""
    dtypes = [np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree) if is_float(x)]
    return max(dtypes, key=lambda d: float(jnp.finfo(d).eps), default=np.dtype(np.float64)).name
