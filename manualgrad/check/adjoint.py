"""Seed 002's dot-product test of a hand backward, for every group of arguments a rule is linear in.

With random ``u`` (those arguments, the others fixed at the sample) and random ``y``, the hand
backward ``C†`` must satisfy ``⟨C(u), y⟩ = Σ_i ⟨u_i, C†_i(y)⟩`` (:func:`adjoint_mismatch`). No
autodiff and no reference is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from manualgrad.check.report import Finding
from manualgrad.check.trees import random_like
from manualgrad.registry import Rule


def linear_groups(rule: Rule, diff: Sequence[int]) -> list[tuple[int, ...]]:
    """The rule's groups of linear arguments that are floating in this sample (integer labels are not)."""
    return [group for group in rule.linear_in if all(i in diff for i in group)]


def draws(key: jax.Array, args: Sequence[Any], group: tuple[int, ...], output: Any) -> tuple[list[Any], Any]:
    """Random ``u`` (one per argument of the group) and ``y`` (shaped like ``output``), on the host."""
    ku, ky = jax.random.split(key)
    u = [random_like(k, args[i]) for k, i in zip(jax.random.split(ku, len(group)), group)]
    return u, random_like(ky, output)


def pair(
    forward: Callable[..., Any], pull: Callable[..., Any], primals: Sequence[Any], positions: Sequence[int], u, y
) -> tuple[Any, list[Any]]:
    """Traced: ``C(u)``, the rule's ``forward`` with the primals at ``positions`` replaced by ``u``
    (the others fixed at the sample), and the hand backward ``C†(y)``, those positions of the
    hand VJP ``pull(primals, y)`` at the same point."""
    at = list(primals)
    for k, a in zip(positions, u):
        at[k] = a
    back = pull(at, y)
    return forward(*at), [back[k] for k in positions]


def adjoint_mismatch(u: list[Any], y: Any, out: Any, back: Any) -> tuple[float, float, float]:
    """Seed 002's dot-product test: ``(⟨C(u), y⟩, Σ_i ⟨u_i, C†_i(y)⟩, relative mismatch)``.

    The inner products are taken on the host in float64, so only the rule's own round-off
    remains. The mismatch is normalised by the Cauchy–Schwarz bound of the terms,
    ``‖C(u)‖ ‖y‖ + Σ_i ‖u_i‖ ‖C†_i(y)‖``: the inner products of random vectors cancel, and
    dividing by their values instead would turn round-off into an arbitrarily large ratio at
    an unlucky draw. A wrong ``C†`` gives a mismatch of order ``1/√size``, far above it.
    """

    def leaves(t):
        return [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(t)]

    lhs = sum(np.vdot(a, b) for a, b in zip(leaves(out), leaves(y)))
    rhs = sum(np.vdot(a, b) for a, b in zip(leaves(u), leaves(back)))

    def norm(t):
        return np.sqrt(sum(np.vdot(a, a) for a in leaves(t)))

    scale = norm(out) * norm(y) + sum(norm(a) * norm(b) for a, b in zip(u, back))
    mismatch = abs(lhs - rhs) / scale if scale > 0 else 0.0
    return float(lhs), float(rhs), float(mismatch if np.isfinite(lhs - rhs) else np.inf)


def finding(
    rule: str, dtype: str, label: str, argument: str, tol: float, drawn: tuple[list[Any], Any], out: Any, back: Any
) -> Finding:
    """The ``adjoint`` finding of one group: ``drawn`` by :func:`draws`, ``(out, back)`` from :func:`pair`."""
    forward_side, backward_side, mismatch = adjoint_mismatch(drawn[0], drawn[1], out, back)
    return Finding(
        rule=rule,
        check="adjoint",
        dtype=dtype,
        sample=label,
        argument=argument,
        max_abs_error=abs(forward_side - backward_side),
        max_rel_error=mismatch,
        tolerance=tol,
        mismatches=int(not mismatch <= tol),
        size=1,
        where="⟨C(u), y⟩ against Σ ⟨u, C†(y)⟩",
        expected=forward_side,
        received=backward_side,
    )
