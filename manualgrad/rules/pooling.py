"""Pooling and flattening, channels last: layers without weights, and their adjoints.

Seed 002 §4 writes a layer as ``σ(C(x, W) + ι(b))`` and its backward pass as the adjoint
``C†`` of the map ``h ↦ C(h, W)``, defined by ``⟨C(h), y⟩ = ⟨h, C†(y)⟩`` and computed entry
by entry with its Equation (3), ``C†(y) = Σ_p ⟨y, C e_p⟩ e_p``. The layers here have no ``W``
and no ``b`` (``J = K = ∅``), so there is no gradient pass, only the backward pass:

* ``avg_pool2d`` and ``flatten`` are linear maps of ``x``; their backward pass *is* ``C†``.
* ``max_pool2d`` is piecewise linear: wherever the arg-max of every window is unique it is a
  selection ``S_x`` (linear, fixed in a neighbourhood of ``x``), so its derivative is
  ``S_x`` and its backward pass ``S_x*``, a scatter to the arg-maxes. At ties it is not
  differentiable and the rule picks the sub-gradient JAX's own autodiff picks.

All window arithmetic (window, stride and padding normalisation, output sizes, leftover
rows, and the errors for a bad configuration) comes from :mod:`manualgrad.rules.windows`.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad import validation
from manualgrad.registry import Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes, windows
from manualgrad.rules.samples import keys, normal
from manualgrad.rules.windows import Geometry, Padding

_SEEDS = (("002", "§4 adjoints C†"),)


def _validate(rule: str, x) -> None:
    validation.floating(rule, "x", x)
    if jnp.ndim(x) != 4:
        raise validation.RuleInputError(f"{rule}: x must have shape (N, H, W, C), got {jnp.shape(x)}")


def _geometry(rule: str, x_shape, window, stride, padding: Padding) -> Geometry:
    """Window, stride (``None``: the window) and padding over the two spatial axes of NHWC."""
    window = windows.positive_ints(rule, "window", window, 2)
    stride = window if stride is None else stride
    return windows.geometry(rule, tuple(x_shape[1:3]), window, stride, padding, 1, f"(x: {tuple(x_shape)})")


def _reduce_window(x, init, op, geo: Geometry):
    """``lax.reduce_window`` over H and W. ``init`` is a NumPy constant: a traced one would turn
    the window sum or max into a generic reduction that JAX cannot differentiate twice."""
    return lax.reduce_window(
        x, np.array(init, x.dtype), op, (1, *geo.window, 1), (1, *geo.strides, 1), ((0, 0), *geo.pads, (0, 0))
    )


@functools.cache
def _compiled(backward):
    """``backward`` under ``jax.jit`` with its argument ``geo``, the :class:`Geometry`, static.

    Called eagerly, the backward passes would dispatch (and compile) each of their small
    ``lax`` operations one by one, ``kh·kw`` rounds of them for max pooling; as one program
    they compile once per shape. Inside an outer ``jit``, ``vmap`` or ``grad`` this is inlined.
    """
    return jax.jit(backward, static_argnames="geo")


# --------------------------------------------------------------------------- avg_pool2d


def avg_pool2d_reference(x, window, stride=None, padding: Padding = "VALID"):
    geo = _geometry("avg_pool2d", jnp.shape(x), window, stride, padding)
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)))
    (kh, kw), (sh, sw), (oh, ow) = geo.window, geo.strides, geo.output
    total = 0
    for i in range(kh):
        for j in range(kw):
            total = total + xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :]
    return total / (kh * kw)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1, 2, 3))
def avg_pool2d(x: jax.Array, window, stride=None, padding: Padding = "VALID") -> jax.Array:
    """2-D average pooling, NHWC → NHWC, dividing by the full window size.

    ``window`` and ``stride`` are an int or a pair (``stride=None`` means the window),
    ``padding`` is ``"VALID"``, ``"SAME"``, an int or ``((lo, hi), (lo, hi))``. Padded entries
    count as zeros and every window is divided by ``kh·kw`` even where it overlaps the padding
    (``count_include_pad``, the default of ``flax.linen.avg_pool`` and ``torch.nn.AvgPool2d``):
    that keeps the layer one fixed linear map. Equal to ``lax.reduce_window(x, 0, lax.add,
    (1, kh, kw, 1), (1, sh, sw, 1), padding) / (kh·kw)``.

    Derivation (seed 002 §4, Theorem 10 and Equation (3): the adjoint ``C†``). With ``K`` the
    ``kh × kw`` window offsets, ``o = (o_1, o_2)`` an output pixel and ``x`` zero off the image,

        C(x)[b, o, c] = 1/|K| Σ_{k ∈ K} x[b, o·s + k − lo, c]

    is linear in ``x`` (a convolution with the constant kernel ``1/|K|``, one channel at a
    time, and no weights to learn).

    Result:

    Seed 002's Equation (3) reads ``C†`` off entry by entry:

        C†(y)[b, p, c] = ⟨y, C e_{b,p,c}⟩ = 1/|K| Σ_{(o, k) : o·s + k − lo = p} y[b, o, c]

    — every output spreads its cotangent evenly over its window, and a pixel in several
    overlapping windows collects from each. As a computation this is the transposed window
    sum: put ``G`` on a grid ``s`` times finer (``s − 1`` zeros between entries, ``lax.pad``
    with interior ``s − 1``), pad it by ``k − 1 − lo`` before and ``k − 1 − hi + r`` after
    (``r`` = ``Geometry.leftover``, the input rows after the last window), sum over windows of
    size ``k`` with stride 1, and divide by ``|K|``. The ``r`` leftover rows, and the rows a
    stride larger than the window skips, only ever meet the inserted zeros, so their gradient
    is exactly 0. The backward pass is ``dx = C†(G)``. It needs only the input's shape: the
    residual is ``x[:0]``, an empty batch that carries ``(H, W, C)`` and no data.
    """
    return avg_pool2d_forward(x, window, stride, padding)[0]


def avg_pool2d_forward(x, window, stride=None, padding: Padding = "VALID"):
    _validate("avg_pool2d", x)
    geo = _geometry("avg_pool2d", jnp.shape(x), window, stride, padding)
    return _reduce_window(x, 0, lax.add, geo) / math.prod(geo.window), x[:0]


def avg_pool2d_backward(geo: Geometry, g):
    """Backward pass ``dx = C†(G)``: dilate ``G`` by the stride, pad, window-sum with stride 1, divide by ``|K|``."""
    (kh, kw), (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)), (rh, rw) = geo.window, geo.strides, geo.pads, geo.leftover
    spread = lax.pad(
        g,
        np.array(0, g.dtype),
        (
            (0, 0, 0),
            (kh - 1 - lo_h, kh - 1 - hi_h + rh, sh - 1),
            (kw - 1 - lo_w, kw - 1 - hi_w + rw, sw - 1),
            (0, 0, 0),
        ),
    )
    summed = lax.reduce_window(spread, np.array(0, g.dtype), lax.add, (1, kh, kw, 1), (1, 1, 1, 1), "VALID")
    return summed / (kh * kw)


def _avg_pool2d_vjp(window, stride, padding, empty, g):
    geo = _geometry("avg_pool2d", jnp.shape(empty), window, stride, padding)
    return (_compiled(avg_pool2d_backward)(geo, g),)


avg_pool2d.defvjp(avg_pool2d_forward, _avg_pool2d_vjp)

# (x shape, window, stride, padding, label): shared by both pools.
_POOL_CONFIGS = [
    ((2, 7, 7, 2), 2, None, "VALID", "window 2, stride = window: a leftover row and column"),
    ((2, 6, 9, 3), (2, 3), (1, 2), "VALID", "non-square window and image, overlapping windows, C 3"),
    ((1, 5, 7, 2), 3, 2, "SAME", "batch 1, SAME, stride 2, overlapping windows"),
    ((2, 5, 4, 2), (3, 2), (2, 1), ((2, 0), (1, 1)), "explicit padding ((2, 0), (1, 1))"),
    ((2, 8, 6, 1), 2, 3, 1, "padding 1, stride 3 > window 2: skipped and leftover rows"),
]


def _pool_samples(key, dtype):
    k = keys(key)
    return [Sample((normal(next(k), xs, dtype), w, s, p), label) for xs, w, s, p, label in _POOL_CONFIGS]


def _avg_pool_geometry(args) -> Geometry:
    x, window, stride, padding = args
    return _geometry("avg_pool2d", jnp.shape(x), window, stride, padding)


def _not_divided(vjp, args, g):
    size = math.prod(_avg_pool_geometry(args).window)
    right = mistakes.reference_vjp(avg_pool2d_reference, args, 0, g, vjp)
    yield f"|K| = {size} × the right one: not divided by the window size", size * right


_AVG_POOL_MISTAKES = (
    Mistake(0, _not_divided),
    *mistakes.windowed(avg_pool2d_reference, _avg_pool_geometry, lambda args, x, s, p: (x, args[1], s, p), (0,)),
)

register(
    Rule(
        name="avg_pool2d",
        fn=avg_pool2d,
        reference=avg_pool2d_reference,
        sample_inputs=_pool_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
        mistakes=_AVG_POOL_MISTAKES,
    )
)

# --------------------------------------------------------------------------- max_pool2d


def max_pool2d_reference(x, window, stride=None, padding: Padding = "VALID"):
    geo = _geometry("max_pool2d", jnp.shape(x), window, stride, padding)
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)), constant_values=-jnp.inf)
    (kh, kw), (sh, sw), (oh, ow) = geo.window, geo.strides, geo.output
    best = None
    for i in range(kh):  # row-major window order; `>=` keeps the earlier entry on a tie
        for j in range(kw):
            entry = xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :]
            best = entry if best is None else jnp.where(best >= entry, best, entry)
    return best


@functools.partial(devices.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool2d(x: jax.Array, window, stride=None, padding: Padding = "VALID") -> jax.Array:
    """2-D max pooling, NHWC → NHWC; padded entries are −∞, so they never win.

    ``window``, ``stride`` (``None``: the window) and ``padding`` as for :func:`avg_pool2d`.
    Equal to ``lax.reduce_window(x, −inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1), padding)``.

    Derivation (seed 002 §4 and Equation (3), applied to a piecewise-linear map). With ``x``
    equal to −∞ off the image,

        M(x)[b, o, c] = max_{k ∈ K} x[b, o·s + k − lo, c].

    Result:

    Where every window has a unique arg-max ``k*(b, o, c)``, a small enough perturbation does
    not move it, so near ``x`` the layer is the linear selection ``S_x h[b, o, c] =
    h[b, o·s + k* − lo, c]``; hence ``DM(x) = S_x`` and the backward pass is its adjoint, by
    seed 002's Equation (3):

        S_x*(y)[b, p, c] = ⟨y, S_x e_{b,p,c}⟩ = Σ_{o : o·s + k*(b,o,c) − lo = p} y[b, o, c]

    — each output's cotangent goes to its window's arg-max, and a pixel that is the max of
    several overlapping windows collects from each (in seed 003's terms, ``diag(φ')`` with
    ``φ' ∈ {0, 1}`` picks the winners). Every other pixel, leftover rows included, gets 0.

    Ties. Where the max is not unique ``M`` is not differentiable and any convex combination
    of the tied entries is a sub-gradient. This rule gives everything to the **first tied
    entry in row-major window order** (smallest window row, then smallest window column),
    exactly what JAX's own reverse-mode autodiff of ``lax.reduce_window(x, −inf, lax.max,
    ...)`` does: XLA's select-and-scatter with a ``>=`` select keeps the entry it already
    holds on a tie. Verified against JAX's gradient on all-equal windows, on integer-valued
    inputs with stride 1 (overlapping windows, so one pixel can win some windows and lose
    others on ties) and with padding, in float32 and float64, eagerly and under ``jit``
    (``tests/rules/test_pooling.py`` keeps those checks).
    (``jnp.max``'s own gradient would instead split the cotangent evenly between ties.)
    Entries equal to the max compare equal whatever their sign of zero; a window holding a
    NaN has a NaN max that no entry equals, so its cotangent is dropped.

    Computation, with no loop over elements: for each of the ``kh·kw`` offsets ``k`` take the
    strided slice of the padded input that sits at offset ``k`` of every window, mark where it
    equals the window's max and no earlier offset has already won, and put ``G`` there back on
    the input grid with ``lax.pad`` (interior ``s − 1``, low ``k − lo``, which also crops the
    padding); sum over the offsets. Residuals: the input ``x`` and the output ``M(x)``; the
    winners are recomputed from them instead of storing indices.
    """
    return max_pool2d_forward(x, window, stride, padding)[0]


def max_pool2d_forward(x, window, stride=None, padding: Padding = "VALID"):
    _validate("max_pool2d", x)
    geo = _geometry("max_pool2d", jnp.shape(x), window, stride, padding)
    out = _reduce_window(x, -jnp.inf, lax.max, geo)
    return out, (x, out)


def _window_entries(x, geo: Geometry):
    """``(i, j, entry)`` per window offset, in row-major order: ``entry[b, o, c] = x̄[b, o·s + (i, j) − lo, c]``."""
    n, h, w, c = jnp.shape(x)
    (kh, kw), (sh, sw), ((lo_h, hi_h), (lo_w, hi_w)), (oh, ow) = geo.window, geo.strides, geo.pads, geo.output
    xp = lax.pad(x, np.array(-np.inf, x.dtype), ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
    for i in range(kh):
        for j in range(kw):
            end = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c)
            yield i, j, lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _scatter_to_input(routed, i: int, j: int, x_shape, geo: Geometry):
    """Puts ``routed[b, o, c]`` at input pixel ``o·s + (i, j) − lo``: ``lax.pad`` spreads and shifts it."""
    (_, h, w, _), (sh, sw), ((lo_h, _), (lo_w, _)), (oh, ow) = x_shape, geo.strides, geo.pads, geo.output
    low_h, low_w = i - lo_h, j - lo_w  # negative where the window offset is in the padding: crops it
    high_h, high_w = h - low_h - (oh - 1) * sh - 1, w - low_w - (ow - 1) * sw - 1
    zero = np.array(0, routed.dtype)
    return lax.pad(routed, zero, ((0, 0, 0), (low_h, high_h, sh - 1), (low_w, high_w, sw - 1), (0, 0, 0)))


def max_pool2d_backward(x, out, geo: Geometry, g):
    """Backward pass ``dx = S_x*(G)``: ``G`` routed to the first arg-max of each window in row-major order."""
    dx = jnp.zeros_like(x)
    taken = jnp.zeros(jnp.shape(out), bool)
    for i, j, entry in _window_entries(x, geo):
        wins = (entry == out) & ~taken
        taken = taken | wins
        dx = dx + _scatter_to_input(jnp.where(wins, g, jnp.zeros_like(g)), i, j, jnp.shape(x), geo)
    return dx


def _max_pool2d_vjp(window, stride, padding, residuals, g):
    x, out = residuals
    geo = _geometry("max_pool2d", jnp.shape(x), window, stride, padding)
    return (_compiled(max_pool2d_backward)(x, out, geo, g),)


max_pool2d.defvjp(max_pool2d_forward, _max_pool2d_vjp)


def _max_pool_samples(key, dtype):
    k = keys(key)
    ties = [((2, 6, 6, 2), 3, (1, 2), ((1, 1), (0, 1)), "ties: integer values, overlapping windows, padding")]
    return [
        *_pool_samples(next(k), dtype),
        *(Sample((jnp.round(normal(next(k), xs, dtype)), w, s, p), label) for xs, w, s, p, label in ties),
        Sample((jnp.ones((1, 4, 5, 2), dtype), (2, 3), 1, "VALID"), "ties: all-equal windows"),
    ]


register(
    Rule(
        name="max_pool2d",
        fn=max_pool2d,
        reference=max_pool2d_reference,
        sample_inputs=_max_pool_samples,
        differentiable=(0,),
        seeds=_SEEDS,
    )
)

# --------------------------------------------------------------------------- flatten


def flatten_reference(x):
    return jax.vmap(jnp.ravel)(x)


@devices.custom_vjp
def flatten(x: jax.Array) -> jax.Array:
    """Flatten every axis but the batch: ``(N, d_1, ..., d_m) → (N, d_1 ⋯ d_m)``, row-major.

    Derivation (seed 002 §4 and Equation (3)). ``F(x)[b, q] = x[b, π(q)]`` with ``π`` the
    row-major (C-order) bijection from flat indices to ``(i_1, ..., i_m)``: a linear map that
    only renames entries.

    Result:

    Equation (3) gives its adjoint entry by entry,

        F†(y)[b, π(q)] = ⟨y, F e_{b,π(q)}⟩ = y[b, q]

    — the inverse renaming, i.e. ``G`` reshaped back to ``x``'s shape in the same row-major
    order (``F`` is orthogonal, ``F† = F⁻¹``). The backward pass is ``dx = F†(G)``. It needs
    only ``x``'s shape; the residual is ``x[:0]``, an empty batch carrying ``(d_1, ..., d_m)``.
    """
    return flatten_forward(x)[0]


def flatten_forward(x):
    validation.floating("flatten", "x", x)
    validation.min_rank("flatten", "x", x, 1, "(N, ...)")
    shape = jnp.shape(x)
    return jnp.reshape(x, (shape[0], math.prod(shape[1:]))), x[:0]


def flatten_backward(empty, g):
    """Backward pass ``dx = F†(G)``: ``G`` reshaped back to ``(N, d_1, ..., d_m)``."""
    return jnp.reshape(g, (jnp.shape(g)[0], *jnp.shape(empty)[1:]))


def _flatten_vjp(empty, g):
    return (flatten_backward(empty, g),)


flatten.defvjp(flatten_forward, _flatten_vjp)


def _flatten_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (3, 4), dtype),), "2-D (N, F): unchanged"),
        Sample((normal(next(k), (2, 3, 4, 2), dtype),), "NHWC"),
        Sample((normal(next(k), (1, 2, 3, 2), dtype),), "batch 1, NHWC"),
        Sample((normal(next(k), (2, 3, 4), dtype),), "3-D"),
        Sample((normal(next(k), (4,), dtype),), "1-D (N,) → (N, 1)"),
    ]


register(
    Rule(
        name="flatten",
        fn=flatten,
        reference=flatten_reference,
        sample_inputs=_flatten_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
    )
)
