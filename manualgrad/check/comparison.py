"""Entry-by-entry comparison of a received array (or pytree) with the expected one, as a :class:`Finding`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from manualgrad.check.report import Finding
from manualgrad.check.tolerances import relative_errors
from manualgrad.check.trees import flat, locate


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
