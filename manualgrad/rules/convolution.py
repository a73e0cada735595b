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
  — a *transposed convolution*: spread ``y`` onto a grid ``s`` times finer, pad it, and
  correlate with the kernel flipped in space and with ``ci``/``co`` swapped. The leftover
  rows that no window reaches get exactly 0.
* by kernel tap ``k``: write ``P_k(x)[b, o, ci] = x[b, o·s + k·d − lo, ci]`` (one strided
  slice of ``x``, zero off the image) and the taps side by side as the patch matrix ``P``.
  Then ``C(x, W) = P(x) W`` is a dense layer on the patches (seed 004's ``Z = O W``), and its
  two rules give the adjoints: ``C††(x, y) = P(x)ᵀ y`` and ``C†(y, W) = Σ_k P_k*(y W_kᵀ)``,
  where ``P_k*``, the adjoint of a strided slice, puts each entry back at the pixel it was
  read from (a strided scatter; rows no tap reads stay 0).

The two collections are the same sums. The code computes both adjoints in the tap form, one
``dot_general`` each, which XLA runs at matmul speed: ``C†`` then strided pads, ``C††`` from
the patch matrix gathered from ``x`` in one pass per block of images. ``C`` is one
``lax.conv_general_dilated``; nothing here calls ``jax.vjp``.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad import validation
from manualgrad.registry import Rule, Sample, register
from manualgrad.rules import devices, mistakes, windows
from manualgrad.rules.samples import keys, normal
from manualgrad.rules.windows import Geometry, Padding

_SPATIAL = {1: "W", 2: "HW"}


def dimension_numbers(n: int) -> tuple[str, str, str]:
    """Dimension numbers for ``n`` spatial axes, channels last: ``NHWC``, ``HWIO``, ``NHWC`` (``NWC``… for 1-D)."""
    s = _SPATIAL[n]
    return f"N{s}C", f"{s}IO", f"N{s}C"


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
        raise validation.RuleInputError(
            f"{rule}: w must have shape {kernel_layout} with no empty axis, got {jnp.shape(w)}"
        )
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
        x, w, geo.strides, geo.pads, rhs_dilation=geo.dilation, dimension_numbers=dimension_numbers(n)
    )


def _spans(k: tuple[int, ...], geo: Geometry):
    """Per spatial axis, where tap ``k`` reads the input: ``(t_lo, t_hi, start, limit)``, or None.

    Input index ``o·s + k·d − lo`` falls on the image for the output positions
    ``t_lo ≤ o < t_hi``; those read the strided slice ``start : limit : s`` of ``x``. None if
    the tap never reads the image (it lies in the padding for every output position).
    """
    spans = []
    for ki, d, s, (lo, _), o, size in zip(k, geo.dilation, geo.strides, geo.pads, geo.output, geo.input):
        first = ki * d - lo
        t_lo, t_hi = max(0, -(first // s)), min(o, (size - 1 - first) // s + 1)
        if t_hi <= t_lo:
            return None
        spans.append((t_lo, t_hi, first + t_lo * s, first + (t_hi - 1) * s + 1))
    return spans


def _taps(geo: Geometry) -> list[tuple[int, ...]]:
    return list(itertools.product(*map(range, geo.window)))


def _tap_adjoint(v, k: tuple[int, ...], geo: Geometry):
    """``P_k*``, the adjoint of the tap ``P_k``: ``v`` (N, *output, C_in) put back at the input pixels it was read from.

    ``P_k`` is one strided slice of ``x`` (:func:`_spans`), zero-padded where the tap lies off
    the image. The adjoint of a strided slice is a strided scatter: crop that zero padding,
    then pad with ``s − 1`` zeros between entries and the rows the slice skipped.
    """
    spans = _spans(k, geo)
    n, c = jnp.shape(v)[0], jnp.shape(v)[-1]
    if spans is None:
        return jnp.zeros((n, *geo.input, c), v.dtype)
    cropped = lax.slice(v, (0, *(t_lo for t_lo, _, _, _ in spans), 0), (n, *(t_hi for _, t_hi, _, _ in spans), c))
    pads = [
        (0, 0, 0),
        *((a, size - b, s - 1) for (_, _, a, b), size, s in zip(spans, geo.input, geo.strides)),
        (0, 0, 0),
    ]
    return lax.pad(cropped, jnp.zeros((), v.dtype), pads)


def _input_adjoint(w, geo: Geometry, g):
    """``C†(g, W) = Σ_k P_k*(g W_kᵀ)``: one product with every tap's ``W_kᵀ``, then each tap put back."""
    n, taps = len(geo.window), _taps(geo)
    per_tap = jnp.reshape(w, (len(taps), *jnp.shape(w)[n:]))  # (taps, C_in, C_out)
    products = lax.dot_general(g, per_tap, (((n + 1,), (2,)), ((), ())))  # (N, *output, taps, C_in)
    return sum(_tap_adjoint(products[..., i, :], k, geo) for i, k in enumerate(taps))


# The patch matrix of C†† is built and multiplied a block of images at a time, each block's part
# at most this many bytes: XLA:CPU runs one gather on one thread, and the blocks' gathers run side
# by side on several cores (``manualgrad bench --models cnn_28`` measures it).
_PATCH_BLOCK_BYTES = 4 * 2**20
_MAX_BLOCKS = 16  # each block is two more ops in the program: its build time grows with them


def _patch_index(geo: Geometry) -> np.ndarray:
    """Where the patch matrix reads: ``[o, k]`` the flat input pixel ``o·s + k·d − lo`` that tap ``k``
    reads at output position ``o`` (row-major over the spatial axes), or ``∏ input`` (one past the
    last pixel, a zero row) where it lies in the padding. Shape ``(*output, taps)``, static."""
    outputs = np.meshgrid(*map(np.arange, geo.output), indexing="ij")
    index, inside = np.zeros((*geo.output, len(_taps(geo))), np.int64), np.ones((*geo.output, len(_taps(geo))), bool)
    for axis, (o, size, s, d, (lo, _)) in enumerate(zip(outputs, geo.input, geo.strides, geo.dilation, geo.pads)):
        p = o[..., None] * s + np.array([k[axis] for k in _taps(geo)]) * d - lo
        inside &= (p >= 0) & (p < size)
        index = index * size + p
    return np.where(inside, index, math.prod(geo.input)).astype(np.int32)


def _patches(x, geo: Geometry):
    """The patch matrix ``P(x)[b, o, k, ci] = P_k(x)[b, o, ci]``, shape ``(N, *output, taps, C_in)``.

    One gather from ``x`` with a zero row appended (what taps in the padding read): a single pass
    that writes ``P`` once, where stacking the taps' strided slices writes it twice.
    """
    n, c = jnp.shape(x)[0], jnp.shape(x)[-1]
    rows = jnp.reshape(x, (n, math.prod(geo.input), c))
    rows = jnp.concatenate([rows, jnp.zeros((n, 1, c), x.dtype)], axis=1)
    return rows.at[:, jnp.asarray(_patch_index(geo))].get(mode="promise_in_bounds")


def _weight_adjoint(x, geo: Geometry, g):
    """``C††(x, g)[k, ci, co] = Σ_{b, o} x[b, o·s + k·d − lo, ci] g[b, o, co]``.

    With the taps side by side as the patch matrix ``P`` (rows ``(b, o)``, columns
    ``(k, ci)``) this is ``Pᵀ g``, computed as ``gᵀ P`` and transposed afterwards
    (``C_out × taps·C_in``, small) so the big ``P`` is read in the layout it was written in.
    The rows ``(b, o)`` are flattened into one axis first: with one contracted axis XLA:CPU
    multiplies ``gᵀ P`` as it stands, where over several axes it first copies ``g`` transposed
    and runs a slower kernel.
    ``P`` is built and multiplied a block of images at a time (:func:`_images_per_block`), the
    blocks' products summed: the sum over ``b`` cut in parts. The same sum is a correlation of
    ``x`` with ``g`` (seed 000's ``dw = x ⋆ dy``; batch and channels swap roles, ``g`` is the
    kernel, dilated by the stride), which XLA:CPU computes slower with its default convolutions
    (YNNPACK), even for a first layer's narrow ``P`` (one channel in); with the train step's own
    compiler options it is faster alone and level in the whole step, so the one form serves both
    (``manualgrad bench --models digits_cnn,cnn_28`` measures them).
    """
    c_in, images = jnp.shape(x)[-1], jnp.shape(x)[0]
    block = _images_per_block(images, math.prod(geo.output) * math.prod(geo.window) * c_in * x.dtype.itemsize)
    dw = sum(_patch_product(x[i : i + block], geo, g[i : i + block]) for i in range(0, images, block))
    return jnp.reshape(jnp.moveaxis(dw, 0, -1), (*geo.window, c_in, jnp.shape(g)[-1]))


def _images_per_block(images: int, patch_bytes: int) -> int:
    """How many images' patch rows :func:`_weight_adjoint` builds and multiplies at a time: as many
    as fit in :data:`_PATCH_BLOCK_BYTES` of patch matrix, but at most :data:`_MAX_BLOCKS` blocks."""
    return max(1, _PATCH_BLOCK_BYTES // patch_bytes, -(-images // _MAX_BLOCKS))


def _patch_product(x, geo: Geometry, g):
    """``gᵀ P`` over the rows of the images ``x`` (and their ``g``): shape ``(C_out, taps, C_in)``."""
    patches = jnp.reshape(_patches(x, geo), (-1, math.prod(geo.window), jnp.shape(x)[-1]))
    return lax.dot_general(jnp.reshape(g, (-1, jnp.shape(g)[-1])), patches, ((0, 0), ((), ())))


# Per rule: its spatial axes and the layouts of x and W that its errors name.
_LAYOUTS = {
    "conv1d": (1, "(N, W, C_in)", "(K, C_in, C_out)"),
    "conv2d": (2, "(N, H, W, C_in)", "(KH, KW, C_in, C_out)"),
}


def _reference(rule: str, x, w, stride, padding, dilation):
    """``C(x, W) = P(x) W`` in plain ``jnp``: the taps of the zero-padded ``x`` side by side, times ``W``."""
    geo = geometry(rule, jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)))
    taps = _taps(geo)
    reads = [
        tuple(
            slice(k * d, k * d + (o - 1) * s + 1, s) for k, d, s, o in zip(tap, geo.dilation, geo.strides, geo.output)
        )
        for tap in taps
    ]
    patches = jnp.stack([xp[(slice(None), *read)] for read in reads], axis=-2)
    return jnp.einsum("...kc,kcd->...d", patches, jnp.reshape(w, (len(taps), *jnp.shape(w)[-2:])))


def _forward(rule: str, x, w, stride, padding: Padding, dilation):
    """The forward pass of ``conv1d`` and ``conv2d``: the arguments validated, ``C(x, W)`` and the
    residuals ``(x, W)``."""
    _validate(rule, x, w, *_LAYOUTS[rule])
    geo = geometry(rule, jnp.shape(x), jnp.shape(w), stride, padding, dilation)
    return _convolve(x, w, geo), (x, w)


def _conv_vjp(rule: str, backward, gradient):
    """The VJP of ``rule`` from its backward pass ``C†`` and gradient pass ``C††``."""

    def vjp(stride, padding, dilation, residuals, g):
        x, w = residuals
        geo = geometry(rule, jnp.shape(x), jnp.shape(w), stride, padding, dilation)
        return backward(w, geo, g), gradient(x, geo, g)

    return vjp


def _conv_samples(n: int, configs):
    """Sample inputs from ``(x shape, w shape, stride, padding, dilation, label)``, ``W`` scaled by its fan-in."""

    def samples(key, dtype):
        k = keys(key)
        return [
            Sample(
                (
                    normal(next(k), xs, dtype),
                    normal(next(k), ws, dtype, 1 / math.sqrt(math.prod(ws[: n + 1]))),
                    s,
                    p,
                    d,
                ),
                label,
            )
            for xs, ws, s, p, d, label in configs
        ]

    return samples


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
    return _reference("conv2d", x, w, stride, padding, dilation)


@functools.partial(devices.custom_vjp, nondiff_argnums=(2, 3, 4))
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

    for each tap ``k`` a strided slice ``P_k(x)`` of ``x`` times ``y``, summed over the batch
    and the positions: one product ``Pᵀ y`` of the patch matrix ``P`` (taps side by side)
    with ``y``. ``C(x, W) = P(x) W`` is seed 004's dense layer on the patches, so by tap
    ``C†(y, W) = Σ_k P_k*(y W_kᵀ)``: the dense layer's ``G Wᵀ``, each tap's columns put back
    at the pixels they were read from. The backward pass is ``dx = C†(G, W)``, the gradient
    pass ``dW = C††(x, G)``; the per-channel bias is ``bias_add``'s ``ι``, whose ``ι*`` sums
    ``G`` over N, H and W.
    Residuals: ``(x, W)``.
    """
    return conv2d_forward(x, w, stride, padding, dilation)[0]


def conv2d_forward(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    return _forward("conv2d", x, w, stride, padding, dilation)


def conv2d_backward(w, geo: Geometry, g):
    """Backward pass ``dx = C†(G, W) = Σ_k P_k*(G W_kᵀ)``, a transposed convolution."""
    return _input_adjoint(w, geo, g)


def conv2d_gradient(x, geo: Geometry, g):
    """Gradient pass ``dW = C††(x, G)``: the patch matrix of ``x`` transposed, times ``G``."""
    return _weight_adjoint(x, geo, g)


conv2d.defvjp(conv2d_forward, _conv_vjp("conv2d", conv2d_backward, conv2d_gradient))


_CONV2D_SAMPLES = [
    ((2, 6, 5, 3), (3, 2, 3, 4), 1, "VALID", 1, "non-square image and kernel, C_in ≠ C_out"),
    ((1, 5, 4, 2), (5, 4, 2, 3), 1, "VALID", 1, "batch 1, kernel = input"),
    ((2, 6, 6, 2), (2, 2, 2, 3), 1, "SAME", 1, "even kernel, SAME"),
    ((2, 8, 8, 1), (3, 3, 1, 2), 2, "VALID", 1, "stride 2, leftover row"),
    ((1, 7, 9, 2), (3, 3, 2, 2), 1, ((1, 2), (0, 1)), 2, "dilation 2, explicit padding"),
    ((2, 4, 5, 3), (1, 1, 3, 5), 1, "VALID", 1, "1×1 kernel"),
    ((2, 7, 6, 2), (3, 2, 2, 3), (2, 3), 1, 1, "stride (2, 3), padding 1"),
    ((2, 6, 5, 8), (3, 3, 8, 3), 2, "SAME", 1, "wide patch matrix (taps × C_in ≥ 64), SAME, stride 2"),
    ((1, 5, 5, 2), (3, 3, 2, 2), 2, "SAME", (1, 2), "SAME, stride 2, dilation (1, 2)"),
]


register(
    Rule(
        name="conv2d",
        fn=conv2d,
        reference=conv2d_reference,
        sample_inputs=_conv_samples(2, _CONV2D_SAMPLES),
        differentiable=(0, 1),
        seeds=(("002", "§4 Theorem 10, Algorithm 2: C† and C††"),),
        linear_in=((0,), (1,)),
        mistakes=_conv_mistakes("conv2d", conv2d_reference, (0, 1)),
    )
)

# --------------------------------------------------------------------------- conv1d


def conv1d_reference(x, w, stride=1, padding: Padding = "VALID", dilation=1):
    return _reference("conv1d", x, w, stride, padding, dilation)


@functools.partial(devices.custom_vjp, nondiff_argnums=(2, 3, 4))
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
    return _forward("conv1d", x, w, stride, padding, dilation)


def conv1d_backward(w, geo: Geometry, g):
    """Backward pass ``dx = C†(G, W)``: :func:`conv2d_backward`'s with one spatial axis."""
    return _input_adjoint(w, geo, g)


def conv1d_gradient(x, geo: Geometry, g):
    """Gradient pass ``dW = C††(x, G)``: :func:`conv2d_gradient`'s with one spatial axis."""
    return _weight_adjoint(x, geo, g)


conv1d.defvjp(conv1d_forward, _conv_vjp("conv1d", conv1d_backward, conv1d_gradient))


_CONV1D_SAMPLES = [
    ((2, 9, 3), (3, 3, 4), 1, "VALID", 1, "C_in ≠ C_out"),
    ((1, 5, 2), (5, 2, 1), 1, "VALID", 1, "batch 1, kernel = input"),
    ((2, 8, 2), (4, 2, 3), 1, "SAME", 1, "even kernel, SAME"),
    ((2, 8, 1), (3, 1, 2), 2, "VALID", 1, "stride 2, leftover row"),
    ((1, 11, 2), (3, 2, 2), 3, ((2, 1),), 2, "stride 3, dilation 2, explicit padding"),
    ((3, 6, 2), (1, 2, 3), 1, 1, 1, "1-tap kernel, padding 1"),
    ((2, 9, 24), (3, 24, 2), 2, "SAME", 1, "wide patch matrix (taps × C_in ≥ 64), SAME, stride 2"),
]


register(
    Rule(
        name="conv1d",
        fn=conv1d,
        reference=conv1d_reference,
        sample_inputs=_conv_samples(1, _CONV1D_SAMPLES),
        differentiable=(0, 1),
        seeds=(("002", "§4 C† and C††"), ("000", "§7 Correlation1D")),
        linear_in=((0,), (1,)),
        mistakes=_conv_mistakes("conv1d", conv1d_reference, (0,)),
    )
)
