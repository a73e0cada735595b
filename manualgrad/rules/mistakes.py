"""The usual mistakes of a backward rule, as the wrong answers they give: ``Rule.mistakes``.

Every wrong answer is computed from the rule's plain-``jnp`` reference — its VJP (by JAX) at
transformed inputs: the kernel flipped, ``σ`` applied to ``z``, the padding shifted, the
stride set to 1 — or from the right answer (the kernel taps reversed). None runs a hand
backward, so :mod:`manualgrad.check.diagnose` finds a mistake without knowing how it was made.
The rule families attach these builders to their rules; the mistakes every rule can make
(transposed, a constant factor, the sign, a broadcast axis not summed) live in
:mod:`manualgrad.check.diagnose`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp

from manualgrad.registry import VJP, Mistake
from manualgrad.rules.windows import Geometry


def replace(args: tuple[Any, ...], i: int, value: Any) -> tuple[Any, ...]:
    return (*args[:i], value, *args[i + 1 :])


def reference_vjp(reference: Callable[..., Any], args: tuple[Any, ...], i: int, g: Any, vjp: VJP) -> Any:
    """The right answer: the reference's VJP for argument ``i`` at ``args``."""
    return vjp(lambda a: reference(*replace(args, i, a)), args[i], g)


def elementwise(reference: Callable[..., Any], inverse: Callable[[Any], Any] | None = None) -> tuple[Mistake, ...]:
    """An activation ``F = σ(z)``: ``σ'`` at the wrong point, or left out.

    ``σ'(F)`` instead of ``σ'(z)`` is the reference's VJP at ``σ(z)``. The reverse — a formula
    for ``σ'`` in terms of the output (seed 002's Remark 8, ``F(1 − F)``) fed the input ``z`` —
    is the reference's VJP at ``σ⁻¹(z)``, where ``inverse`` is ``σ⁻¹``: NaN outside its
    domain, and those entries are not compared (the match is claimed where ``σ⁻¹(z)`` exists).
    """

    def candidates(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
        z, *rest = args
        at = lambda point: reference_vjp(reference, (point, *rest), 0, g, vjp)  # noqa: E731
        yield "the right one with σ' taken at the output F = σ(z) instead of the input z", at(reference(z, *rest))
        if inverse is not None:
            yield (
                (
                    "the right one with σ' written in terms of the output F but taken at the input z "
                    "(where σ⁻¹(z) exists)"
                ),
                at(inverse(z)),
            )
        yield "the cotangent G itself: the factor σ' is missing", g

    return (Mistake(0, candidates),)


def kernel_flipped(reference: Callable[..., Any], axes: tuple[int, ...]) -> tuple[Mistake, ...]:
    """A correlation's input gradient with the kernel (argument 1) not flipped, and its kernel
    gradient with the taps reversed; ``axes`` are the kernel's spatial axes."""

    def input_candidates(vjp: VJP, args, g):
        flipped = replace(args, 1, jnp.flip(args[1], axis=axes))
        yield (
            "the right one for the kernel flipped: the kernel was not flipped (or flipped twice)",
            reference_vjp(reference, flipped, 0, g, vjp),
        )

    def kernel_candidates(vjp: VJP, args, g):
        yield (
            "the right one with the kernel taps reversed",
            jnp.flip(reference_vjp(reference, args, 1, g, vjp), axis=axes),
        )

    return Mistake(0, input_candidates), Mistake(1, kernel_candidates)


def windowed(
    reference: Callable[..., Any],
    geometry: Callable[[tuple[Any, ...]], Geometry],
    rebuild: Callable[[tuple[Any, ...], Any, Any, Any], tuple[Any, ...]],
    arguments: tuple[int, ...],
) -> tuple[Mistake, ...]:
    """Padding off by one and the stride not dilated into ``G``, for a sliding-window rule.

    ``geometry(args)`` is the sample's window geometry; ``rebuild(args, x, stride, padding)``
    the arguments with the input (batch first, channels last), the stride and the padding
    replaced.

    Padding off by one: the input is padded with one more zero on each side than
    ``geometry`` says, and the reference reads a window of it shifted by one pixel (in any
    direction, per spatial axis) with no padding of its own; the VJP of that, for each
    argument in ``arguments``, is what a backward with its padding off by one computes.

    The stride not dilated: with stride 1 and the same padding the output is
    ``(o − 1)s + 1 + r`` long; ``G`` laid out contiguously (zeros at the end) or repeated
    ``s`` times instead of spread ``s`` apart, pulled back through that stride-1 reference.
    """

    def padding_candidates(i: int):
        def candidates(vjp: VJP, args, g):
            geo = geometry(args)
            margin = ((0, 0), *((lo + 1, hi + 1) for lo, hi in geo.pads), (0, 0))
            spatial = [n + lo + hi for n, (lo, hi) in zip(geo.input, geo.pads)]
            for shift in itertools.product((-1, 0, 1), repeat=len(spatial)):
                if not any(shift):
                    continue
                index = (slice(None), *(slice(1 + s, 1 + s + n) for s, n in zip(shift, spatial)), slice(None))

                def f(a, index=index):
                    full = replace(args, i, a)
                    moved = jnp.pad(full[0], margin)[index]
                    return reference(*rebuild(full, moved, geo.strides, 0))

                shown = shift[0] if len(shift) == 1 else shift
                yield f"the right one with the padding off by one (window shifted by {shown})", vjp(f, args[i], g)

        return Mistake(i, candidates)

    def stride_candidates(vjp: VJP, args, g):
        geo = geometry(args)
        if all(s == 1 for s in geo.strides):
            return
        x = args[0]
        dense = lambda a: reference(*rebuild(args, a, 1, geo.pads))  # noqa: E731
        full = [(o - 1) * s + 1 + r for o, s, r in zip(geo.output, geo.strides, geo.leftover)]
        contiguous = jnp.pad(g, ((0, 0), *((0, f - o) for f, o in zip(full, geo.output)), (0, 0)))
        repeated = g
        for axis, (s, o, f) in enumerate(zip(geo.strides, geo.output, full), start=1):
            repeated = jnp.repeat(repeated, s, axis=axis)[(slice(None),) * axis + (slice(0, (o - 1) * s + 1),)]
            repeated = jnp.pad(repeated, [(0, 0)] * axis + [(0, f - (o - 1) * s - 1)] + [(0, 0)] * (g.ndim - axis - 1))
        text = "the right one for G {} instead of dilated by the stride {}: the stride was not dilated into G"
        yield text.format("laid out without the zeros between entries", geo.strides), vjp(dense, x, contiguous)
        yield text.format("repeated", geo.strides), vjp(dense, x, repeated)

    return (*(padding_candidates(i) for i in arguments), Mistake(0, stride_candidates))


def slipped(
    reference: Callable[..., Any], slips: dict[tuple[int, ...], tuple[tuple[str, str], ...]]
) -> tuple[Mistake, ...]:
    """Mistakes that the reference reproduces through its ``slip`` keyword: for each group of
    arguments, ``(slip, text)`` pairs, the wrong answer for each argument of the group being the VJP
    of ``reference(*args, slip=slip)`` (the same value, the slipped derivative)."""
    by_argument: dict[int, list[tuple[str, str]]] = {}
    for arguments, pairs in slips.items():
        for i in arguments:
            by_argument.setdefault(i, []).extend(pairs)

    def mistake(i: int) -> Mistake:
        def candidates(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
            for slip, text in by_argument[i]:
                yield text, reference_vjp(functools.partial(reference, slip=slip), args, i, g, vjp)

        return Mistake(i, candidates)

    return tuple(mistake(i) for i in sorted(by_argument))
