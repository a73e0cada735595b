"""Deliberately wrong backward rules for the convolutions (``manualgrad/rules/convolution.py``)."""

import jax.numpy as jnp
from jax import lax

from manualgrad.rules import convolution
from mutations.mutation import Mutation


def _conv_geometry(rule, stride, padding, dilation, x, w):
    return convolution.geometry(rule, x.shape, w.shape, stride, padding, dilation)


def _conv_input_adjoint(g, w, geo, flip=True, dilate=True, shift=0):
    """``C†`` with the classic mistakes available: kernel not flipped, ``g`` repeated instead
    of dilated by the stride, padding shifted by one."""
    n = len(geo.window)
    kernel = jnp.flip(w, axis=tuple(range(n))) if flip else w
    kernel = jnp.swapaxes(kernel, n, n + 1)
    if not dilate:  # upsample by repetition, cropped to the dilated length
        for axis, s in enumerate(geo.strides, start=1):
            g = lax.slice_in_dim(jnp.repeat(g, s, axis=axis), 0, (g.shape[axis] - 1) * s + 1, axis=axis)
    pads = [
        (e - 1 - lo + shift, e - 1 - hi + r - shift)
        for e, (lo, hi), r in zip(geo.effective_window, geo.pads, geo.leftover)
    ]
    return lax.conv_general_dilated(
        g,
        kernel,
        (1,) * n,
        pads,
        lhs_dilation=(1,) * n if not dilate else geo.strides,
        rhs_dilation=geo.dilation,
        dimension_numbers=convolution.dimension_numbers(n),
    )


def _conv_mutation(rule, **mistake):
    def vjp(stride, padding, dilation, res, g):
        x, w = res
        geo = _conv_geometry(rule, stride, padding, dilation, x, w)
        return _conv_input_adjoint(g, w, geo, **mistake), getattr(convolution, f"{rule}_gradient")(x, geo, g)

    return vjp


def _conv_gradient_taps_flipped(rule):
    def vjp(stride, padding, dilation, res, g):
        x, w = res
        geo = _conv_geometry(rule, stride, padding, dilation, x, w)
        n = len(geo.window)
        dw = jnp.flip(getattr(convolution, f"{rule}_gradient")(x, geo, g), axis=tuple(range(n)))
        return getattr(convolution, f"{rule}_backward")(w, geo, g), dw

    return vjp


MUTATIONS = [
    *(
        Mutation(rule, mistake, "x", _conv_mutation(rule, **kwargs), diagnosis=phrase)
        for rule in ("conv2d", "conv1d")
        for mistake, kwargs, phrase in (
            ("kernel not flipped in C†", {"flip": False}, "the kernel was not flipped"),
            (
                "g repeated instead of dilated by the stride",
                {"dilate": False},
                "for G repeated instead of dilated by the stride",
            ),
            ("C† padding off by one", {"shift": 1}, "the padding off by one"),
        )
    ),
    *(
        Mutation(
            rule,
            "kernel taps flipped in C††",
            "w",
            _conv_gradient_taps_flipped(rule),
            diagnosis="the kernel taps reversed",
        )
        for rule in ("conv2d", "conv1d")
    ),
]
