"""Multi-channel convolution layers, channels last: seed 002's bilinear ``C(x, W)`` and its adjoints.

Seed 002 §4 writes a layer as ``σ(C(x, W) + ι(b))`` with ``C`` bilinear and needs two
adjoints: ``C†(y, W)`` with respect to the input and ``C††(x, y)`` with respect to the
weights, defined by

    ⟨C(h, W), y⟩ = ⟨h, C†(y, W)⟩        ⟨C(x, H), y⟩ = ⟨H, C††(x, y)⟩.

For a convolution with stride ``s``, dilation ``d``, padding ``(lo, hi)`` and ``n`` spatial
axes (1 or 2; one index ``o``, ``k``, ``p`` stands for all of them):

    C(x, W)[b, o, co] = Σ_{k, ci} x[b, o·s + k·d − lo, ci] · W[k, ci, co]     (x = 0 off the image)

Both adjoints follow by collecting the terms of ``⟨C(x, W), y⟩`` differently:

* by input position ``p = o·s + k·d − lo``: ``C†(y, W)[b, p, ci] = Σ_{o, k : p} Σ_co y[b, o, co] W[k, ci, co]``
  — a *transposed convolution*: spread ``y`` onto a grid ``s`` times finer (``s − 1`` zeros
  between entries), pad it by ``e − 1 − lo`` before and ``e − 1 − hi + r`` after (``e`` the
  dilated kernel extent, ``r`` the leftover input rows that no window reaches), and correlate
  with the kernel flipped in space and with ``ci``/``co`` swapped. The leftover rows only meet
  the padding zeros, so their gradient is exactly 0.
* by kernel tap ``k``: ``C††(x, y)[k, ci, co] = Σ_{b, o} x[b, o·s + k·d − lo, ci] · y[b, o, co]``
  — for each tap ``k`` the input shifted by ``k·d`` and sampled every ``s`` (one strided
  slice, zero off the image) times ``y``, summed over batch and positions: with the taps
  side by side, one matrix product ``Pᵀ y`` of the patch matrix ``P`` with ``y``.

``C`` and ``C†`` are each one ``lax.conv_general_dilated`` call, ``C††`` one ``dot_general``;
nothing here calls ``jax.vjp``.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import mistakes, validation, windows
from manualgrad.registry import Rule, Sample, register
from manualgrad.samples import keys, normal
from manualgrad.windows import Geometry, Padding

_SPATIAL = {1: "W", 2: "HW"}


def _numbers(n: int) -> tuple[str, str, str]:
    """Dimension numbers for ``n`` spatial axes, channels last: ``NHWC``, ``HWIO``, ``NHWC`` (``NWC``… for 1-D)."""
    s = _SPATIAL[n]
    return (f"N{s}C", f"{s}IO", f"N{s}C")


def geometry(rule: str, x_shape, w_shape, stride, padding, dilation) -> Geometry:
    """The window geometry of ``rule`` (``"conv1d"`` or ``"conv2d"``) for these shapes, validated."""
    n = len(w_shape) - 2
    shapes = f"(x: {tuple(x_shape)}, w: {tuple(w_shape)})"
    return windows.geometry(rule, x_shape[1:-1], w_shape[:n], stride, padding, dilation, shapes)


def _validate(rule: str, x, w, n: int, layout: str, kernel_layout: str) -> None:
    validation.floating(rule, "x", x)
    validation.floating(rule, "w", w)
    if jnp.ndim(x) != n + 2:
        raise validation.RuleInputError(f"{rule}: x must have shape {layout}, got {jnp.shape(x)}")
    if jnp.ndim(w) != n + 2 or 0 in jnp.shape(w):
        raise validation.RuleInputError(f"{rule}: w must have shape {kernel_layout} with no empty axis, got {jnp.shape(w)}")
    if jnp.shape(x)[-1] != jnp.shape(w)[-2]:
        raise validation.RuleInputError(
            f"{rule}: x has {jnp.shape(x)[-1]} channels but w expects {jnp.shape(w)[-2]} "
            f"(x: {jnp.shape(x)}, w: {jnp.shape(w)})"
        )
    validation.same_dtype(rule, x=x, w=w)


def _convolve(x, w, geo: Geometry):
    """``C(x, W)``."""
    n = len(geo.window)
    return lax.conv_general_dilated(
        x, w, geo.strides, geo.pads, rhs_dilation=geo.dilation, dimension_numbers=_numbers(n)
    )


def _input_adjoint(g, w, geo: Geometry):
    """``C†(g, W)``: dilate ``g`` by the stride, pad, correlate with the flipped, channel-swapped kernel."""
    n = len(geo.window)
    flipped = jnp.swapaxes(jnp.flip(w, axis=tuple(range(n))), n, n + 1)
    pads = [(e - 1 - lo, e - 1 - hi + r) for e, (lo, hi), r in zip(geo.effective_window, geo.pads, geo.leftover)]
    return lax.conv_general_dilated(
        g, flipped, (1,) * n, pads, lhs_dilation=geo.strides, rhs_dilation=geo.dilation,
        dimension_numbers=_numbers(n),
    )


def _tap(x, k: tuple[int, ...], geo: Geometry):
    """``x[b, o·s + k·d − lo, ci]`` for every output position ``o`` (0 off the image), shape ``(N, *output, C_in)``.

    Per axis, the output positions whose input index falls on the image are
    ``t_lo ≤ o < t_hi``: those are one strided slice of ``x``, the rest is zero padding.
    Padding only the slice, never the whole image, keeps this one pass over ``x``.
    """
    starts, limits, pads = [0], [jnp.shape(x)[0]], [(0, 0, 0)]
    for ki, d, s, (lo, _), o, size in zip(k, geo.dilation, geo.strides, geo.pads, geo.output, geo.input):
        first = ki * d - lo
        t_lo, t_hi = max(0, -(first // s)), min(o, (size - 1 - first) // s + 1)
        if t_hi <= t_lo:
            return jnp.zeros((jnp.shape(x)[0], *geo.output, jnp.shape(x)[-1]), x.dtype)
        starts.append(first + t_lo * s)
        limits.append(first + (t_hi - 1) * s + 1)
        pads.append((t_lo, o - t_hi, 0))
    starts.append(0)
    limits.append(jnp.shape(x)[-1])
    pads.append((0, 0, 0))
    strides = (1, *geo.strides, 1)
    return lax.pad(lax.slice(x, starts, limits, strides), jnp.zeros((), x.dtype), pads)


def _weight_adjoint(x, g, geo: Geometry):
    """``C††(x, g)[k, ci, co] = Σ_{b, o} x[b, o·s + k·d − lo, ci] g[b, o, co]``, one matrix product.

    The taps of ``x`` stacked side by side are the patch matrix ``P`` (rows ``(b, o)``,
    columns ``(k, ci)``) and ``C†† = Pᵀ g``. It is computed as ``gᵀ P`` and transposed
    afterwards (``C_out × taps·C_in``, small), so the big ``P`` is read in the layout it
    was written in. A convolution with batch and channels swapped computes the same sum,
    but on XLA:CPU it first transposes the whole input and then runs several times slower
    than the product (``manualgrad bench``: the CNN's step 1.43× ``jax.grad``'s with it).
    """
    n = len(geo.window)
    patches = jnp.stack([_tap(x, k, geo) for k in itertools.product(*map(range, geo.window))], axis=-2)
    lead = tuple(range(n + 1))
    dw = lax.dot_general(g, patches, ((lead, lead), ((), ())))  # (C_out, taps, C_in)
    return jnp.reshape(jnp.moveaxis(dw, 0, -1), (*geo.window, jnp.shape(x)[-1], jnp.shape(g)[-1]))


def _conv_mistakes(rule: str, reference, spatial: tuple[int, ...]):
    """The kernel not flipped in ``C†`` (or its taps reversed in ``C††``), padding off by one,
    and the stride not dilated into ``G``."""

    def geo(args):
        x, w, stride, padding, dilation = args
        return geometry(rule, jnp.shape(x), jnp.shape(w), stride, padding, dilation)

    def rebuild(args, x, stride, padding):
        return (x, args[1], stride, padding, args[4])

    return (*mistakes.kernel_flipped(reference, spatial), *mistakes.windowed(reference, geo, rebuild, (0, 1)))


# --------------------------------------------------------------------------- conv2d


def conv2d_reference(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    geo = geometry("conv2d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)))
    (kh, kw), (sh, sw), (dh, dw) = geo.window, geo.strides, geo.dilation
    (oh, ow) = geo.output
    patches = jnp.stack(
        [
            xp[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw, :]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=3,
    )
    return jnp.einsum("bhwkc,kcd->bhwd", patches, jnp.reshape(w, (kh * kw, *jnp.shape(w)[2:])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, stride=1, padding: Padding = "VALID", dilation=1) -> jax.Array:
    """2-D convolution (cross-correlation, as in every deep-learning library), NHWC × HWIO → NHWC.

    ``x`` (N, H, W, C_in), ``w`` (KH, KW, C_in, C_out); ``stride`` and ``dilation`` an int or a
    pair; ``padding`` ``"VALID"``, ``"SAME"``, an int, or ``((lo, hi), (lo, hi))``. Equal to
    ``lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))``.

    Derivation (seed 002 §4, Theorem 10 and Algorithm 2: ``C†`` and ``C††``). With
    ``o = (o_1, o_2)``, ``k = (k_1, k_2)`` and ``x`` zero off the image,

        C(x, W)[b, o, co] = Σ_{k, ci} x[b, o·s + k·d − lo, ci] W[k, ci, co]

    is linear in each argument. Its backward pass is the adjoint ``C†`` of ``h ↦ C(h, W)`` and
    its gradient pass the adjoint ``C††`` of ``W ↦ C(x, W)``.

    Result:

    Collect ``⟨C(h, W), y⟩`` by input pixel ``p = o·s + k·d − lo``:

        C†(y, W)[b, p, ci] = Σ_{(o, k) : o·s + k·d − lo = p} Σ_co y[b, o, co] W[k, ci, co]

    which is a correlation of ``y`` — first spread ``s`` times finer, padded by ``e − 1 − lo``
    and ``e − 1 − hi + r`` — with ``W`` flipped in both spatial axes and ``ci``, ``co``
    swapped (``e = (K − 1)d + 1``, ``r`` the leftover rows no window reaches, whose gradient
    is then exactly 0). Collect it by kernel tap instead:

        C††(x, y)[k, ci, co] = Σ_{b, o} x[b, o·s + k·d − lo, ci] y[b, o, co]

    for each tap ``k`` a strided slice of ``x`` times ``y``, summed over the batch and the
    positions: one product ``Pᵀ y`` of the patch matrix ``P`` (taps side by side) with ``y``. The backward pass is ``dx = C†(G, W)``, the gradient pass ``dW = C††(x, G)``;
    the per-channel bias is ``bias_add``'s ``ι``, whose ``ι*`` sums ``G`` over N, H and W.
    Residuals: ``(x, W)``.
    """
    return conv2d_forward(x, w, stride, padding, dilation)[0]


def conv2d_forward(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    _validate("conv2d", x, w, 2, "(N, H, W, C_in)", "(KH, KW, C_in, C_out)")
    geo = geometry("conv2d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    return _convolve(x, w, geo), (x, w)


def conv2d_backward(g, w, geo: Geometry):
    """Backward pass ``dx = C†(G, W)``, a transposed convolution."""
    return _input_adjoint(g, w, geo)


def conv2d_gradient(x, g, geo: Geometry):
    """Gradient pass ``dW = C††(x, G)``: the patch matrix of ``x`` transposed, times ``G``."""
    return _weight_adjoint(x, g, geo)


def _conv2d_vjp(stride, padding, dilation, residuals, g):
    x, w = residuals
    geo = geometry("conv2d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    return conv2d_backward(g, w, geo), conv2d_gradient(x, g, geo)


conv2d.defvjp(conv2d_forward, _conv2d_vjp)


def _conv2d_samples(key, dtype):
    k = keys(key)
    configs = [
        ((2, 6, 5, 3), (3, 2, 3, 4), 1, "VALID", 1, "non-square image and kernel, C_in ≠ C_out"),
        ((1, 5, 4, 2), (5, 4, 2, 3), 1, "VALID", 1, "batch 1, kernel = input"),
        ((2, 6, 6, 2), (2, 2, 2, 3), 1, "SAME", 1, "even kernel, SAME"),
        ((2, 8, 8, 1), (3, 3, 1, 2), 2, "VALID", 1, "stride 2, leftover row"),
        ((1, 7, 9, 2), (3, 3, 2, 2), 1, ((1, 2), (0, 1)), 2, "dilation 2, explicit padding"),
        ((2, 4, 5, 3), (1, 1, 3, 5), 1, "VALID", 1, "1×1 kernel"),
        ((2, 7, 6, 2), (3, 2, 2, 3), (2, 3), 1, 1, "stride (2, 3), padding 1"),
        ((1, 5, 5, 2), (3, 3, 2, 2), 2, "SAME", (1, 2), "SAME, stride 2, dilation (1, 2)"),
    ]
    return [
        Sample((normal(next(k), xs, dtype), normal(next(k), ws, dtype, 1 / math.sqrt(math.prod(ws[:3]))), s, p, d), label)
        for xs, ws, s, p, d, label in configs
    ]


register(
    Rule(
        name="conv2d",
        fn=conv2d,
        reference=conv2d_reference,
        sample_inputs=_conv2d_samples,
        differentiable=(0, 1),
        seeds=(("002", "§4 Theorem 10, Algorithm 2: C† and C††"),),
        linear_in=((0,), (1,)),
        mistakes=_conv_mistakes("conv2d", conv2d_reference, (0, 1)),
    )
)

# --------------------------------------------------------------------------- conv1d


def conv1d_reference(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    geo = geometry("conv1d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)))
    (k,), (s,), (d,), (o,) = geo.window, geo.strides, geo.dilation, geo.output
    taps = [xp[:, i * d : i * d + (o - 1) * s + 1 : s, :] for i in range(k)]
    return jnp.einsum("kbwc,kcd->bwd", jnp.stack(taps), w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv1d(x: jax.Array, w: jax.Array, stride=1, padding: Padding = "VALID", dilation=1) -> jax.Array:
    """1-D multi-channel convolution (cross-correlation), NWC × WIO → NWC.

    ``x`` (N, W, C_in), ``w`` (K, C_in, C_out); ``stride``/``dilation`` an int, ``padding``
    ``"VALID"``, ``"SAME"``, an int or ``((lo, hi),)``.

    Derivation (seed 002 §4, ``C†`` and ``C††``; seed 000 §7 for one channel). The 2-D
    derivation of ``conv2d`` with one spatial axis:

        C(x, W)[b, o, co]    = Σ_{k, ci} x[b, o·s + k·d − lo, ci] W[k, ci, co]

    Result:

        C†(y, W)[b, p, ci]   = Σ_{(o, k) : o·s + k·d − lo = p} Σ_co y[b, o, co] W[k, ci, co]
        C††(x, y)[k, ci, co] = Σ_{b, o} x[b, o·s + k·d − lo, ci] y[b, o, co]

    With one channel, stride 1 and no padding these are seed 000's Correlation1D rules:
    ``dx = dy ∗ w`` (``C†`` correlates with the flipped kernel, i.e. convolves) and
    ``dw = x ⋆ dy``. Residuals: ``(x, W)``.
    """
    return conv1d_forward(x, w, stride, padding, dilation)[0]


def conv1d_forward(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    _validate("conv1d", x, w, 1, "(N, W, C_in)", "(K, C_in, C_out)")
    geo = geometry("conv1d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    return _convolve(x, w, geo), (x, w)


def conv1d_backward(g, w, geo: Geometry):
    """Backward pass ``dx = C†(G, W)``, a transposed convolution."""
    return _input_adjoint(g, w, geo)


def conv1d_gradient(x, g, geo: Geometry):
    """Gradient pass ``dW = C††(x, G)``: the patch matrix of ``x`` transposed, times ``G``."""
    return _weight_adjoint(x, g, geo)


def _conv1d_vjp(stride, padding, dilation, residuals, g):
    x, w = residuals
    geo = geometry("conv1d", jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    return conv1d_backward(g, w, geo), conv1d_gradient(x, g, geo)


conv1d.defvjp(conv1d_forward, _conv1d_vjp)


def _conv1d_samples(key, dtype):
    k = keys(key)
    configs = [
        ((2, 9, 3), (3, 3, 4), 1, "VALID", 1, "C_in ≠ C_out"),
        ((1, 5, 2), (5, 2, 1), 1, "VALID", 1, "batch 1, kernel = input"),
        ((2, 8, 2), (4, 2, 3), 1, "SAME", 1, "even kernel, SAME"),
        ((2, 8, 1), (3, 1, 2), 2, "VALID", 1, "stride 2, leftover row"),
        ((1, 11, 2), (3, 2, 2), 3, ((2, 1),), 2, "stride 3, dilation 2, explicit padding"),
        ((3, 6, 2), (1, 2, 3), 1, 1, 1, "1-tap kernel, padding 1"),
    ]
    return [
        Sample((normal(next(k), xs, dtype), normal(next(k), ws, dtype, 1 / math.sqrt(math.prod(ws[:2]))), s, p, d), label)
        for xs, ws, s, p, d, label in configs
    ]


register(
    Rule(
        name="conv1d",
        fn=conv1d,
        reference=conv1d_reference,
        sample_inputs=_conv1d_samples,
        differentiable=(0, 1),
        seeds=(("002", "§4 C† and C††"), ("000", "§7 Correlation1D")),
        linear_in=((0,), (1,)),
        mistakes=_conv_mistakes("conv1d", conv1d_reference, (0,)),
    )
)
