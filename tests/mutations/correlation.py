"""Deliberately wrong backward rules for the correlation rules (``manualgrad/rules/correlation.py``).

Same format as the other families of ``tests/mutations/``. ``mode`` is a nondiff
argument of both rules, so every wrong VJP takes ``(mode, residuals, g)``.
"""

import jax.numpy as jnp

from manualgrad.rules import correlation, windows
from mutations.mutation import Mutation


def _corr_kernel_not_flipped(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    # flipping w before correlate1d_backward flips it back: dx = valid(ğ ⋆ w), a correlation
    return correlation.correlate1d_backward(jnp.flip(w), n, mode, g), correlation.correlate1d_gradient(x, k, mode, g)


def _corr_dx_padding_off_by_one(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    lo, hi = windows.mode_window("correlate1d", n, k, mode).g_pads
    dx = correlation._correlate_valid(correlation._pad(g, (lo + 1, hi - 1)), jnp.flip(w))
    return dx, correlation.correlate1d_gradient(x, k, mode, g)


def _corr_dw_padding_off_by_one(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    lo, hi = windows.mode_window("correlate1d", n, k, mode).x_pads
    dw = correlation._correlate_valid_summed(correlation._pad(x, (lo - 1, hi + 1)), g)
    return correlation.correlate1d_backward(w, n, mode, g), dw


def _corr_dw_averaged(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    batch = x.shape[0] if x.ndim == 2 else 1
    return correlation.correlate1d_backward(w, n, mode, g), correlation.correlate1d_gradient(x, k, mode, g) / batch


def _conv_correlation_adjoint(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    # dx = dy ∗ w (the adjoint of correlation) instead of dy ⋆ w
    return correlation.correlate1d_backward(w, n, mode, g), correlation.convolve1d_gradient(x, k, mode, g)


def _conv_dw_not_reversed(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    return correlation.convolve1d_backward(w, n, mode, g), jnp.flip(correlation.convolve1d_gradient(x, k, mode, g))


def _conv_correlate_window(mode, res, g):
    x, w = res
    n, k = x.shape[-1], w.shape[0]
    # numpy.correlate's window instead of numpy.convolve's: differs for 'same' with K > N, N even
    # (correlate1d's backward flips its filter: flipped once more, it reads w as convolve1d's does)
    return correlation.correlate1d_backward(jnp.flip(w), n, mode, g), correlation.convolve1d_gradient(x, k, mode, g)


MUTATIONS = [
    Mutation(
        "correlate1d",
        "kernel not flipped in the backward pass",
        "x",
        _corr_kernel_not_flipped,
        diagnosis="the kernel was not flipped",
    ),
    Mutation(
        "correlate1d",
        "cotangent padding off by one in the backward pass",
        "x",
        _corr_dx_padding_off_by_one,
        diagnosis="the padding off by one",
    ),
    Mutation(
        "correlate1d",
        "input padding off by one in the gradient pass",
        "w",
        _corr_dw_padding_off_by_one,
        diagnosis="the padding off by one",
    ),
    Mutation(
        "correlate1d",
        "dw averaged over the batch instead of summed",
        "w",
        _corr_dw_averaged,
        diagnosis="averaged over the batch where it must be summed",
    ),
    Mutation("convolve1d", "wrong adjoint: dx = dy ∗ w, the correlation's rule", "x", _conv_correlation_adjoint),
    Mutation("convolve1d", "dw not reversed", "w", _conv_dw_not_reversed, diagnosis="the kernel taps reversed"),
    Mutation("convolve1d", "numpy.correlate's 'same' window in the backward pass", "x", _conv_correlate_window),
]
