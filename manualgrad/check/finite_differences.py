"""Finite differences in float64 against the hand VJP, and the test for a kink between the steps.

Steps ±h and ±2h, Richardson's extrapolation (:func:`richardson`): the exact Jacobian for
arguments of at most :data:`EXACT_JACOBIAN_MAX` entries, else ``uᵀ J v`` along
:data:`FAST_DIRECTIONS` random unit directions (like ``torch.autograd.gradcheck``'s fast mode).
An entry fails beyond the ``finite_diff`` tolerance and the differences' own round-off, 80
ulps of the values differenced per step ``h``, at most :data:`~manualgrad.check.tolerances.FD_ATOL`.
Input entries and directions along which the differences straddle a kink (ReLU at 0, a
max-pooling tie: the one-sided differences disagree at the scale of the step, or the
extrapolation does not converge) are left out and counted in the finding's note; a kink that
is not detected moves the estimate by less than the tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from manualgrad.check.comparison import compare
from manualgrad.check.report import Finding
from manualgrad.check.tolerances import FD_ATOL
from manualgrad.check.trees import closure, host, is_float, locate, traced
from manualgrad.registry import Rule, Sample
from manualgrad.rules.samples import generator

# Finite differences step by ±h and ±2h, h the distance moved (directions are unit vectors).
FD_STEP = 1e-5
FD_STEPS = (1, -1, 2, -2)
# The round-off ρ of the kink statistic κ (richardson), per unit of the magnitude of the values
# differenced: each value f(x + s·h·d) carries a few ulps of it (say 4), and κ combines them
# with weights summing to at most 5/h (|T_2h − T_h|): ρ = 20 ulps / h, 4.4e-10 for values of
# order one. The estimate's own round-off is at most 1.5 · 4 ulps / h, under a third of ρ.
KAPPA_ROUNDING = 20 * float(np.finfo(np.float64).eps) / FD_STEP
# A kink left in moves the Richardson estimate by at most 5/3 κ. With kinks declared above
# κ = KINK_SHARE · tol · |estimate| + ρ and an absolute floor of ρ / KINK_SHARE, one left in
# (with the round-off) costs at most 5/3 · 1/4 of tol · |estimate| plus (5/3 + 1/3) ρ, half the
# floor: less than what fails an entry, while the floor stays under FD_ATOL (magnitudes below 5.6).
KINK_SHARE = 0.25
EXACT_JACOBIAN_MAX = 64
FAST_DIRECTIONS = 3


@dataclasses.dataclass(frozen=True)
class Differences:
    """The finite-difference check of one argument, ``arg``: the exact Jacobian (``directions``
    and ``cotangents`` ``None``: unit vectors) or ``uᵀ J v`` along :data:`FAST_DIRECTIONS`
    random unit directions ``v`` (rows of ``directions``) and cotangents ``u`` (rows of
    ``cotangents``). Each derivative is the Richardson estimate of :func:`richardson`; an input
    entry or a direction along which the differences straddle a kink is left out and counted.

    Its values are a slice of :meth:`SampleDifferences.evaluate`'s: the directions ``rows``,
    the argument's entries ``columns`` of the raveled arguments, the ``cotangent_rows``.
    """

    name: str
    arg: Any
    directions: np.ndarray | None
    cotangents: np.ndarray | None
    rows: slice
    columns: slice
    cotangent_rows: slice

    def finding(self, rule: str, label: str, dtype: str, tol: float, values: np.ndarray, hand: np.ndarray) -> Finding:
        """Compares the hand VJP with the differences, both as returned by :meth:`SampleDifferences.evaluate`."""
        steps = values[:-1].reshape(len(FD_STEPS), -1, values.shape[-1])[:, self.rows]
        f0, hand = values[-1], hand[self.cotangent_rows, self.columns]
        judged = self._random_directions if self.directions is not None else self._exact_jacobian
        received, expected, atol, note, where = judged(tol, steps, f0, hand)
        return compare(rule, "finite_diff", dtype, label, self.name, received, expected, tol, atol, note, where)

    def _exact_jacobian(self, tol, steps, f0, hand):
        """The whole Jacobian, entry by entry: ``(received, expected, atol, note, where)`` for :func:`compare`."""
        magnitude = np.maximum(np.max(np.abs(steps), axis=0), np.abs(f0))
        estimate, straddles, atol = richardson(steps, f0, magnitude, tol)
        kinks = np.any(straddles, axis=1)
        keep = ~kinks
        note = f"{int(kinks.sum())} input entries at a kink left out" if kinks.any() else ""

        def position(index):
            o, j = np.unravel_index(index, (hand.shape[0], int(keep.sum())))
            return f"d output[{o}] / d {locate(self.arg, int(np.flatnonzero(keep)[j]), self.name)}"

        return hand[:, keep], estimate.T[:, keep], np.ravel(atol.T[:, keep]), note, position

    def _random_directions(self, tol, steps, f0, hand):
        """``uᵀ J v`` along the random directions: ``(received, expected, atol, note, where)`` for :func:`compare`."""
        u = self.cotangents
        magnitude = np.abs(u) @ np.maximum(np.max(np.abs(steps), axis=(0, 1)), np.abs(f0))
        estimate, kinks, atol = richardson(np.einsum("skm,km->sk", steps, u), u @ f0, magnitude, tol)
        keep = np.flatnonzero(~kinks)
        note = f"uᵀJv along {FAST_DIRECTIONS} random directions"
        note += f", {int(kinks.sum())} crossing a kink left out" if kinks.any() else ""
        received = np.einsum("km,km->k", hand, self.directions)
        return received[keep], estimate[keep], atol[keep], note, lambda index: f"direction {int(keep[index])}"


@dataclasses.dataclass(frozen=True)
class SampleDifferences:
    """The finite-difference checks of a sample's differentiated arguments ``args`` (float64),
    one :class:`Differences` each, evaluated together inside the sample's program: one
    ``vmap`` of ``fn`` (the rule as a function of those arguments, the others fixed) over
    every step of every argument's directions, and one of its hand VJP over the cotangents,
    whatever the number of arguments.

    ``directions`` holds every argument's directions as rows over the raveled arguments (zero
    off the argument's own entries: a unit vector per entry for an exact Jacobian);
    ``cotangents`` the cotangent rows: the unit vectors of the output, shared by the exact
    Jacobians, then each random-direction argument's own.
    """

    fn: Callable[..., Any]
    pull: Callable[..., Any]  # fn's VJP: (args, cotangent) -> cotangents
    args: list[Any]
    directions: np.ndarray
    cotangents: np.ndarray
    parts: list[Differences]

    @property
    def inputs(self) -> tuple[list[Any], np.ndarray, np.ndarray]:
        return self.args, self.directions, self.cotangents

    def evaluate(self, args, directions, cotangents):
        """Traced: ``f`` at ``x + s·h·d`` for every ``s`` in :data:`FD_STEPS` and every row ``d``
        of ``directions``, then at ``x``; and the hand VJP of every cotangent row, one row each."""
        flat, unravel = ravel_pytree(list(args))
        _, unravel_output = ravel_pytree(self.fn(*args))

        def f(x):
            return ravel_pytree(self.fn(*unravel(x)))[0]

        def pulled(c):
            return ravel_pytree(self.pull(list(args), unravel_output(c)))[0]

        points = [flat[None] + s * FD_STEP * directions for s in FD_STEPS]
        return jax.vmap(f)(jnp.concatenate([*points, flat[None]])), jax.vmap(pulled)(cotangents)

    def findings(self, rule: str, label: str, dtype: str, tol: float, values: np.ndarray, hand: np.ndarray):
        """One :class:`Finding` per argument, from :meth:`evaluate`'s ``values`` and ``hand``."""
        return [part.finding(rule, label, dtype, tol, values, hand) for part in self.parts]


def richardson(steps, f0, magnitude, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Derivatives ``g'(0)`` of functions ``g`` sampled at ``s·h`` (``steps``, one ``s`` of
    :data:`FD_STEPS` per row) and at 0 (``f0``); whether each straddles a kink; and the
    absolute error each may have, from the ``magnitude`` of its values.

    With the central differences ``D_h = (g(h) − g(−h)) / 2h`` and ``D_2h``, the estimate is
    Richardson's ``(4 D_h − D_2h) / 3 = g'(0) + O(h⁴)``. Along a smooth ``g`` the
    extrapolation converges and the one-sided differences agree to second order:

        κ = max(|D_h − D_2h|, |T_2h − T_h|) = |g⁽³⁾| h² / 2 + O(h³),  about 5e-11 · |g⁽³⁾|,

    where ``T_h = (g(h) − g(0)) / h − (g(0) − g(−h)) / h`` (``h g''`` for a smooth ``g``) and
    ``T_2h = (g(2h) − 2g(0) + g(−2h)) / 4h``. A kink at ``a`` where the slope jumps by ``Δ``
    makes ``κ ≥ |Δ| / 8`` if ``|a| ≤ h`` (the first term vanishes at ``a = 0``, the second at
    ``a = 2h/3``), and for any ``|a| < 2h`` moves the estimate by at most ``5/3 κ``. So a
    kink is declared where ``κ > KINK_SHARE · tol · |estimate| + ρ``, ``ρ`` its round-off
    (:data:`KAPPA_ROUNDING` times the magnitude), and the absolute error allowed is
    ``ρ / KINK_SHARE``, at most :data:`FD_ATOL`: a kink left in costs less than what fails.
    """
    p1, m1, p2, m2 = steps
    d1, d2 = (p1 - m1) / (2 * FD_STEP), (p2 - m2) / (4 * FD_STEP)
    t1, t2 = (p1 - 2 * f0 + m1) / FD_STEP, (p2 - 2 * f0 + m2) / (4 * FD_STEP)
    estimate = (4 * d1 - d2) / 3
    kappa = np.maximum(np.abs(d1 - d2), np.abs(t2 - t1))
    rounding = KAPPA_ROUNDING * magnitude
    return estimate, kappa > KINK_SHARE * tol * np.abs(estimate) + rounding, np.minimum(FD_ATOL, rounding / KINK_SHARE)


def finite_differences(
    rule: Rule,
    sample: Sample,
    diff: list[int],
    names: list[str],
    key: jax.Array,
    shared: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
) -> SampleDifferences:
    """The finite-difference checks of a sample, one per differentiable argument, in float64.

    ``shared``: the rule's forward and VJP ``(primals, cotangent) ↦ cotangents`` as functions of
    the arguments ``diff``, the others fixed at the sample (:func:`~manualgrad.check.trees.traced`); used
    where the sample is in float64 already, so that the differences reuse their traces."""
    args = jax.tree_util.tree_map(lambda a: host(a, np.float64) if is_float(a) else a, sample.args)
    if shared is None or not all(a.dtype == np.float64 for a in jax.tree_util.tree_leaves(sample.args) if is_float(a)):
        shared = traced(closure(rule.fn, args, diff))
    primals = [args[i] for i in diff]
    sizes = [sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(p)) for p in primals]
    m = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(jax.eval_shape(shared[0], *primals)))
    cotangents = [np.eye(m)] if any(n <= EXACT_JACOBIAN_MAX for n in sizes) else []
    parts, blocks, row, cotangent_row = [], [], 0, sum(map(len, cotangents))
    for k, name, primal, n, column in zip(
        jax.random.split(key, len(diff)), names, primals, sizes, np.cumsum([0, *sizes])
    ):
        if n <= EXACT_JACOBIAN_MAX:
            own, u, block, cotangent_rows = None, None, np.eye(n), slice(0, m)
        else:
            own, u = _random_directions(k, n, m)
            block, cotangent_rows = own, slice(cotangent_row, cotangent_row + len(u))
            cotangents.append(u)
            cotangent_row += len(u)
        rows, columns = slice(row, row + len(block)), slice(int(column), int(column) + n)
        parts.append(Differences(name, primal, own, u, rows, columns, cotangent_rows))
        blocks.append(block)
        row += len(block)
    directions = np.zeros((row, sum(sizes)))
    for part, block in zip(parts, blocks):
        directions[part.rows, part.columns] = block
    return SampleDifferences(*shared, primals, directions, np.concatenate(cotangents or [np.zeros((0, m))]), parts)


def _random_directions(key: jax.Array, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """:data:`FAST_DIRECTIONS` random unit directions in the ``n`` entries of an argument, and as
    many standard normal cotangents of the ``m`` entries of the output."""
    rng = generator(key)
    draws = [(rng.standard_normal(n), rng.standard_normal(m)) for _ in range(FAST_DIRECTIONS)]
    return np.stack([d / np.linalg.norm(d) for d, _ in draws]), np.stack([c for _, c in draws])
