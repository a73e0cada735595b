"""Coarse finite differences: a VJP checked in its own dtype (float32 or lower), the step and the
tolerance chosen from the function's measured round-off.

The audit uses them where JAX cannot differentiate a call's primal (a ``pallas_call`` inside), no
reference is given and the call is not in float64 (:mod:`~manualgrad.check.finite_differences`
needs float64: its step and tolerance assume float64's round-off). Along :data:`DIRECTIONS`
random directions ``v`` of each argument ``x`` (standard normal entries scaled to ``x``'s root
mean square, so that steps are relative) and random output cotangents ``u``, with the function
``f`` run in its own dtype and summed in float64 on the host,

    g(t) = uᵀ f(x_t),   x_t = x + t v rounded to the dtype,

the hand VJP ``c = uᵀ ∂f`` is compared with central differences along the displacement actually
taken, ``e(t) = [g(t) − g(−t) − ⟨c, x_t − x_−t⟩] / 2t`` (0 for a right ``c`` but for truncation
and round-off; the rounding of ``x_t`` to the dtype cancels out). Following Moré and Wild,
*Estimating Computational Noise* and *Estimating Derivatives of Noisy Simulations*:

1. the noise ``σ`` of ``g``: from the fourth differences of ``g`` at :data:`NOISE_POINTS` points
   :data:`NOISE_SPACING` ulps apart, where the function's smooth part contributes nothing:
   for independent noise ``E[(Δ⁴g)²] = 70 σ²`` (70 = C(8, 4)); pooled over the directions, and at
   least the rounding of ``g``'s terms (``ε · ‖u ⊙ f‖``);
2. the curvature ``μ = |g'''|``, from ``e(2t₀) − e(t₀) = t₀² g'''/2`` at the pilot step
   ``t₀ = PILOT · ε^⅓``, and at least what the noise could hide there (``2σ / t₀³``);
3. the step ``h = (3σ/μ)^⅓``, the minimiser of the central difference's error ``μh²/6 + σ/h``;
4. allowed ``|e(h)| ≤ SAFETY · (σ/h + |e(2h) − e(h)|) + HAND_ROUNDING · ε · ⟨|c|, |x_h − x_−h|⟩ / 2h``:
   the noise at that step, the truncation as measured (three times that of ``h`` and some noise),
   and the hand VJP's own rounding in the dtype.

A hand VJP off by a fraction ``δ`` of its values makes ``|e|`` about ``δ |uᵀJv|``; the finding's
note says how small a ``δ`` the differences resolve (a few ``ε^⅔``: about 1e-4 in float32, a
tenth or more in bfloat16). Differences that resolve no better than :data:`COARSEST` fail a VJP
they catch, and pass none: where they catch nothing the finding is not applicable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.check.report import Finding
from manualgrad.check.trees import host, is_float
from manualgrad.rules.samples import generator

DIRECTIONS = 3
NOISE_POINTS = 9  # g at x + jδv, j = -4..4: five fourth differences per direction
NOISE_SPACING = 64  # δ, in ulps of the dtype: every entry's rounding moves by a small share of a step
PILOT = 4.0  # t₀ = PILOT · ε^⅓, a few times the step that balances round-off and truncation
# The noise estimate is one standard deviation, from fifteen pooled fourth differences, and the
# measured truncation one sample: four times their sum leaves a right VJP well inside.
SAFETY = 4.0
# Differences whose allowance exceeds this share of the largest derivative they estimate cannot tell a
# VJP off by that much from a right one: they fail what they catch, and pass nothing (not applicable).
COARSEST = 0.1
HAND_ROUNDING = 16  # ulps of ⟨|c|, |Δx|⟩: the hand VJP's rounding in the dtype, a few per term of a blocked sum


@dataclasses.dataclass
class _Line:
    """``g(t) = uᵀ f(x + t v)`` along one direction of argument ``i``, ``f`` in its own dtype."""

    forward: Callable[[list[Any]], Any]
    args: list[Any]
    i: int
    u: list[np.ndarray]  # the cotangent's floating leaves, in float64
    v: np.ndarray
    c: np.ndarray  # the hand VJP of argument i under u, in float64

    def at(self, t: float) -> tuple[float, np.ndarray]:
        """``g(t)`` and the displacement actually taken, ``x_t − x``, in float64."""
        x = np.asarray(self.args[self.i], np.float64)
        moved = host(x + t * self.v, jnp.result_type(self.args[self.i]))
        full = list(self.args)
        full[self.i] = moved
        leaves = [o for o in jax.tree_util.tree_leaves(self.forward(full)) if is_float(o)]
        g = sum(float(np.vdot(u, np.asarray(o, np.float64))) for u, o in zip(self.u, leaves))
        return g, np.asarray(moved, np.float64) - x

    def defect(self, t: float, eps: float) -> tuple[float, float, float, float]:
        """``(e(t), the differences' estimate, the hand's, the hand's rounding)``, each per unit step."""
        (gp, dp), (gm, dm) = self.at(t), self.at(-t)
        moved = dp - dm
        difference, hand = (gp - gm) / (2 * t), float(np.vdot(self.c, moved)) / (2 * t)
        rounding = HAND_ROUNDING * eps * float(np.vdot(np.abs(self.c), np.abs(moved))) / (2 * t)
        return difference - hand, difference, hand, rounding


def check(
    rule: str,
    label: str,
    forward: Callable[[list[Any]], Any],
    hand: Callable[[list[Any], Any], Any],
    args: list[Any],
    diff: list[int],
    names: list[str],
    dtype: str,
    key: jax.Array,
    draw: Callable[[jax.Array], Any],
) -> list[Finding]:
    """One ``finite_diff`` finding per argument ``diff`` (named ``names``): ``hand(args, u)``, the
    VJP of ``forward(args)`` for those arguments, against coarse differences along
    :data:`DIRECTIONS` random directions in ``dtype``, each with its cotangent ``u = draw(key)``."""
    eps = float(jnp.finfo(dtype).eps)
    key, *keys = jax.random.split(key, DIRECTIONS + 1)
    rng = generator(key)
    cotangents = [draw(k) for k in keys]
    pulled = [[np.asarray(c, np.float64) for c in hand(args, u)] for u in cotangents]
    findings = []
    for k, (i, name) in enumerate(zip(diff, names)):
        x = np.asarray(args[i], np.float64)
        rms = float(np.sqrt(np.mean(x**2))) if x.size else 0.0
        lines = []
        for u, c in zip(cotangents, pulled):
            z = rng.standard_normal(x.shape)
            v = z * (rms or 1.0) / max(float(np.sqrt(np.mean(z**2))), np.finfo(np.float64).tiny)
            leaves = [np.asarray(w, np.float64) for w in jax.tree_util.tree_leaves(u) if is_float(w)]
            lines.append(_Line(forward, args, i, leaves, v, c[k]))
        findings.append(_finding(rule, label, name, dtype, eps, lines))
    return findings


def _noise(lines: list[_Line], eps: float) -> float:
    """``σ``, pooled over the lines: fourth differences of ``g`` at points ``NOISE_SPACING`` ulps apart."""
    delta = NOISE_SPACING * eps
    half = NOISE_POINTS // 2
    outputs = [
        np.asarray(o, np.float64) for o in jax.tree_util.tree_leaves(lines[0].forward(lines[0].args)) if is_float(o)
    ]
    fourth, floor = [], 0.0
    for line in lines:
        g = np.array([line.at(j * delta)[0] for j in range(-half, half + 1)])
        fourth.append(np.diff(g, 4))
        floor = max(floor, eps * float(np.sqrt(sum(np.sum((u * o) ** 2) for u, o in zip(line.u, outputs)))))
    return max(float(np.sqrt(np.mean(np.concatenate(fourth) ** 2) / 70)), floor)


def _finding(rule: str, label: str, name: str, dtype: str, eps: float, lines: list[_Line]) -> Finding:
    """The lines' comparisons at the step chosen for each (:func:`_step`), as one finding."""
    sigma = _noise(lines, eps)
    rows = []
    for line in lines:
        h = _step(line, sigma, eps)
        e, difference, hand, rounding = line.defect(h, eps)
        spread = abs(line.defect(2 * h, eps)[0] - e)
        allowed = SAFETY * (sigma / h + spread) + rounding
        rows.append((abs(e), allowed, difference, hand, h))
    errors, allowed, estimates, hands, steps = map(np.array, zip(*rows))
    over = np.where(errors == 0, 0.0, errors / np.maximum(allowed, np.finfo(np.float64).tiny))
    over = np.where(np.isnan(errors) | np.isnan(allowed), np.inf, over)
    w = int(np.argmax(over))
    size = np.maximum(np.abs(estimates), np.abs(hands))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(size > 0, errors / size, errors)
        resolves = allowed[w] / size[w] if size[w] > 0 else np.inf
    coarsest = float(np.max(allowed) / max(float(np.max(size)), np.finfo(np.float64).tiny))
    if not np.any(over > 1) and not coarsest <= COARSEST:
        why = (
            f"coarse finite differences in {dtype} resolve only {coarsest:.0%} of the derivative, too coarse to pass "
            "a VJP: give the audit a reference for this function"
        )
        return Finding.not_applicable(rule, "finite_diff", dtype, label, why, argument=name)
    note = (
        f"coarse finite differences in {dtype}, uᵀJv along {len(lines)} random directions: step {steps[w]:.1e} "
        f"of the argument's rms, round-off {sigma:.1e} measured, allowed {allowed[w]:.1e} "
        f"({resolves:.1e} of the derivative)"
    )
    return Finding(
        rule=rule,
        check="finite_diff",
        dtype=dtype,
        sample=label,
        argument=name,
        max_abs_error=float(np.max(errors)),
        max_rel_error=float(np.max(relative)),
        tolerance=float(resolves),
        mismatches=int(np.sum(~(over <= 1))),
        size=len(lines),
        where=f"direction {w}",
        expected=float(estimates[w]),
        received=float(hands[w]),
        note=note,
        error_over_allowed=float(over[w]),
    )


def _step(line: _Line, sigma: float, eps: float) -> float:
    """``h = (3σ/μ)^⅓``, ``μ`` the curvature measured at the pilot step, within ``[δ, 2 t₀]``."""
    t0 = PILOT * eps ** (1 / 3)
    mu = max(2 * abs(line.defect(2 * t0, eps)[0] - line.defect(t0, eps)[0]) / t0**2, 2 * sigma / t0**3)
    return float(np.clip((3 * sigma / mu) ** (1 / 3), NOISE_SPACING * eps, 2 * t0))
