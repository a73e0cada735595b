"""Deliberately wrong backward rules for normalisation and dropout (``manualgrad/rules/normalization.py``).

Same format as the other families of ``tests/mutations/``, whose ``__init__`` appends these to its
list. ``eps`` is a nondiff argument of the norms (``groups`` and ``eps`` of ``group_norm``, ``rate`` of ``dropout``), so
every wrong VJP takes ``(eps, residuals, g)``, ``(groups, eps, residuals, g)`` or
``(rate, key, g)``. The mistakes that recompute statistics over other axes need ``x``, which
the rules do not save: they come with a forward that saves it (the same output).
"""

import jax
import jax.numpy as jnp

from manualgrad.rules import normalization as nz
from mutations.mutation import Mutation


def _leading(a):
    return tuple(range(a.ndim - 1))


def _gamma_g(gamma, g):
    return nz._per_channel(gamma, g.ndim) * g


def _bn_constant_statistics(eps, res, g):
    xhat, inv, gamma = res
    return (_gamma_g(gamma, g) * inv, *nz.batch_norm_gradient(xhat, g))


def _bn_sigma_term_missing(eps, res, g):
    xhat, inv, gamma = res
    dx = nz._per_channel(gamma, g.ndim) * inv * (g - jnp.mean(g, axis=_leading(g), keepdims=True))
    return (dx, *nz.batch_norm_gradient(xhat, g))


def _bn_unbiased_derivative(eps, res, g):
    """∂v/∂x = 2(x − μ)/(m − 1): the σ path's term scaled by m/(m − 1)."""
    xhat, inv, gamma = res
    m = xhat.size // xhat.shape[-1]
    dgamma, dbeta = nz.batch_norm_gradient(xhat, g)
    n = g.ndim
    dx = (
        nz._per_channel(gamma, n)
        * inv
        / m
        * (m * g - nz._per_channel(dbeta, n) - m / (m - 1) * xhat * nz._per_channel(dgamma, n))
    )
    return dx, dgamma, dbeta


def _bn_unbiased_gamma(eps, res, g):
    """dγ = Σ G x̂ with x̂ from the unbiased variance v·m/(m − 1), recovered from 1/σ and ε."""
    xhat, inv, gamma = res
    m = xhat.size // xhat.shape[-1]
    inv_unbiased = jax.lax.rsqrt((1 / (inv * inv) - eps) * m / (m - 1) + eps)
    dgamma, dbeta = nz.batch_norm_gradient(xhat * inv_unbiased / inv, g)
    dx = nz.batch_norm_backward(xhat, inv, gamma, *nz.batch_norm_gradient(xhat, g), g)
    return dx, dgamma, dbeta


def _bn_beta_averaged(eps, res, g):
    dx, dgamma, dbeta = nz._batch_norm_vjp(eps, res, g)
    return dx, dgamma, dbeta / (g.size // g.shape[-1])


def _saving_x(forward):
    """``forward``'s output with the residuals ``(x, γ)``: for mutations that recompute statistics."""
    return lambda x, gamma, *rest: (forward(x, gamma, *rest)[0], (x, gamma))


def _bn_layer_statistics(eps, res, g):
    x, gamma = res
    xhat, inv = nz._statistics(x, (x.ndim - 1,), eps)
    dx = nz._normalized_adjoint(_gamma_g(gamma, g), xhat, inv, (x.ndim - 1,))
    return (dx, *nz.batch_norm_gradient(nz._statistics(x, _leading(x), eps)[0], g))


def _ln_batch_statistics(eps, res, g):
    x, gamma = res
    xhat, inv = nz._statistics(x, _leading(x), eps)
    dx = nz._normalized_adjoint(_gamma_g(gamma, g), xhat, inv, _leading(x))
    return (dx, *nz.batch_norm_gradient(nz._statistics(x, (x.ndim - 1,), eps)[0], g))


def _ln_gamma_outside(eps, res, g):
    xhat, inv, gamma = res
    dx = nz._per_channel(gamma, g.ndim) * nz._normalized_adjoint(g, xhat, inv, (g.ndim - 1,))
    return (dx, *nz.batch_norm_gradient(xhat, g))


def _gn_per_channel(groups, eps, res, g):
    x, gamma = res
    channels = x.shape[-1]
    xhat_c, inv_c = nz._statistics(*nz._grouped(x, channels), eps)
    dx = nz.group_norm_backward(jnp.reshape(xhat_c, x.shape), inv_c, gamma, channels, g)
    xhat = nz.group_norm_forward(x, gamma, jnp.zeros_like(gamma), groups, eps)[1][0]
    return (dx, *nz.batch_norm_gradient(xhat, g))


def _rms_constant(eps, res, g):
    xhat, inv, gamma = res
    return _gamma_g(gamma, g) * inv, nz.rms_norm_gradient(xhat, g)


def _dropout_not_rescaled(rate, key, g):
    return jnp.where(nz._kept(key, rate, g.shape), g, jnp.zeros_like(g)), None


def _dropout_another_key(rate, key, g):
    _, sub = jax.random.split(key)  # the habit of splitting a key before every use, applied to the backward
    return nz.dropout_backward(sub, rate, g), None


MUTATIONS = [
    Mutation(
        "batch_norm",
        "μ and σ treated as constants: dx = γ G/σ",
        "x",
        _bn_constant_statistics,
        diagnosis="μ and σ treated as constants",
    ),
    Mutation(
        "batch_norm",
        "the x̂ Σ(G x̂) term missing",
        "x",
        _bn_sigma_term_missing,
        diagnosis="the path through σ is missing",
    ),
    Mutation(
        "batch_norm",
        "unbiased m − 1 in the variance's derivative",
        "x",
        _bn_unbiased_derivative,
        diagnosis="the unbiased m − 1 in the variance's derivative",
    ),
    Mutation(
        "batch_norm",
        "dγ from the unbiased variance",
        "gamma",
        _bn_unbiased_gamma,
        diagnosis="for the unbiased variance (÷ (m − 1))",
    ),
    Mutation(
        "batch_norm",
        "statistics over the last axis (layer norm's)",
        "x",
        _bn_layer_statistics,
        diagnosis="for statistics over the last axis (layer norm's)",
        forward=_saving_x(nz.batch_norm_forward),
    ),
    Mutation(
        "batch_norm",
        "dβ averaged over the batch, H and W instead of summed",
        "beta",
        _bn_beta_averaged,
        diagnosis="averaged over the batch where it must be summed",
    ),
    Mutation(
        "layer_norm",
        "statistics over every axis but the last (batch norm's)",
        "x",
        _ln_batch_statistics,
        diagnosis="for statistics over every axis but the last (batch norm's)",
        forward=_saving_x(nz.layer_norm_forward),
    ),
    Mutation("layer_norm", "γ taken out of the row sums", "x", _ln_gamma_outside, diagnosis="γ taken out of the sums"),
    Mutation(
        "group_norm",
        "group statistics taken per channel",
        "x",
        _gn_per_channel,
        diagnosis="statistics per channel (groups = C, instance norm)",
        forward=_saving_x(nz.group_norm_forward),
    ),
    Mutation(
        "rms_norm", "r treated as a constant: dx = γ G/r", "x", _rms_constant, diagnosis="r treated as a constant"
    ),
    Mutation(
        "dropout",
        "not rescaled by 1/(1 − rate)",
        "x",
        _dropout_not_rescaled,
        diagnosis="the kept entries were not rescaled",
    ),
    Mutation(
        "dropout",
        "mask drawn again with another key in the backward",
        "x",
        _dropout_another_key,
        diagnosis="the mask drawn with another key (jax.random.split(key)[1])",
    ),
]
