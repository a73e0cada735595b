"""Deliberately wrong backward rules, one list per registered rule: the mistakes people make.

Each mutation keeps the rule's own forward and replaces its VJP. ``test_checker.py`` checks
that the cross-checker reports every one as failing and names the rule and the argument.
"""

import functools
import jax
import jax.numpy as jnp

import manualgrad
from mutation import Mutation
from jax import lax

from manualgrad import activations, convolution, linear, losses, normalization, pooling, signal


def _dense_w_transposed(res, g):
    x, w = res
    return linear.dense_backward(g, w), jnp.reshape(linear.dense_gradient(g, x), w.shape)


def _dense_x_doubled(res, g):
    x, w = res
    return 2 * linear.dense_backward(g, w), linear.dense_gradient(x, g)


def _dense_w_averaged(res, g):
    x, w = res
    return linear.dense_backward(g, w), linear.dense_gradient(x, g) / x.shape[0]


def _softmax_missing_mean(res, g):
    log_p, labels = res
    d_logits, d_labels = losses.softmax_cross_entropy_backward(log_p, labels, g)
    m = d_logits.size // d_logits.shape[-1]
    return d_logits * m, d_labels


def _softmax_labels_zero(res, g):
    d_logits, d_labels = losses.softmax_cross_entropy_backward(*res, g)
    return d_logits, d_labels if d_labels.dtype == jax.dtypes.float0 else jnp.zeros_like(d_labels)


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
    pads = [(e - 1 - lo + shift, e - 1 - hi + r - shift)
            for e, (lo, hi), r in zip(geo.effective_window, geo.pads, geo.leftover)]
    return lax.conv_general_dilated(g, kernel, (1,) * n, pads, lhs_dilation=(1,) * n if not dilate else geo.strides,
                                    rhs_dilation=geo.dilation, dimension_numbers=convolution._numbers(n))


def _conv_mutation(rule, **mistake):
    def vjp(stride, padding, dilation, res, g):
        x, w = res
        geo = _conv_geometry(rule, stride, padding, dilation, x, w)
        return _conv_input_adjoint(g, w, geo, **mistake), convolution._weight_adjoint(x, g, geo)

    return vjp


def _conv_gradient_taps_flipped(rule):
    def vjp(stride, padding, dilation, res, g):
        x, w = res
        geo = _conv_geometry(rule, stride, padding, dilation, x, w)
        n = len(geo.window)
        dw = jnp.flip(convolution._weight_adjoint(x, g, geo), axis=tuple(range(n)))
        return convolution._input_adjoint(g, w, geo), dw

    return vjp


MUTATIONS = [
    Mutation("dense", "dw transposed and reshaped", "w", _dense_w_transposed, diagnosis='the right one transposed'),
    Mutation("dense", "dx scaled by 2", "x", _dense_x_doubled, diagnosis='a missing ½ in the loss'),
    Mutation("dense", "dw averaged over the batch instead of summed", "w", _dense_w_averaged, diagnosis='averaged over the batch where it must be summed'),
    Mutation("bias_add", "db averaged instead of summed over broadcast axes", "b",
             lambda res, g: (g, jnp.mean(g, axis=tuple(range(g.ndim - 1)))), diagnosis='averaged over the batch where it must be summed'),
    Mutation("bias_add", "dz sign flipped", "z", lambda res, g: (-g, linear.bias_add_gradient(g)), diagnosis='the sign flipped'),
    Mutation("sigmoid", "missing σ' factor", "z", lambda f, g: (g,), diagnosis="the factor σ' is missing"),
    Mutation("sigmoid", "σ' = F instead of F(1 − F)", "z", lambda f, g: (g * f,)),
    Mutation("tanh", "σ' = 1 − F instead of 1 − F²", "z", lambda f, g: (g * (1 - f),)),
    Mutation("relu", "mask F ≥ 0, which every output passes", "z", lambda f, g: (jnp.where(f >= 0, g, 0.0),), diagnosis="the factor σ' is missing"),
    Mutation("relu", "mask taken from the cotangent", "z", lambda f, g: (jnp.where(g > 0, g, 0.0),)),
    Mutation("leaky_relu", "slope forgotten", "z", lambda slope, f, g: (jnp.where(f > 0, g, 0.0),)),
    Mutation("softplus", "σ' evaluated at the output", "z", lambda f, g: (g * jax.nn.sigmoid(f),), diagnosis="σ' taken at the output"),
    Mutation("identity", "sign flipped", "z", lambda res, g: (-g,), diagnosis='the sign flipped'),
    Mutation("mse", "missing 1/batch in d pred", "pred", lambda r, g: (g * r, -g * r / r.shape[0]), diagnosis='a missing mean over the batch'),
    Mutation("mse", "target gradient silently zero", "target",
             lambda r, g: (g * r / r.shape[0], jnp.zeros_like(r)), diagnosis='the gradient of this argument was dropped'),
    Mutation("softmax_cross_entropy", "missing 1/batch", "logits", _softmax_missing_mean, diagnosis='a missing mean over the batch'),
    Mutation("softmax_cross_entropy", "labels gradient silently zero", "labels", _softmax_labels_zero, diagnosis='the gradient of this argument was dropped'),
    *(Mutation(rule, mistake, "x", _conv_mutation(rule, **kwargs), diagnosis=phrase)
      for rule in ("conv2d", "conv1d")
      for mistake, kwargs, phrase in (("kernel not flipped in C†", {"flip": False}, "the kernel was not flipped"),
                                      ("g repeated instead of dilated by the stride", {"dilate": False},
                                       "for G repeated instead of dilated by the stride"),
                                      ("C† padding off by one", {"shift": 1}, "the padding off by one"))),
    *(Mutation(rule, "kernel taps flipped in C††", "w", _conv_gradient_taps_flipped(rule), diagnosis='the kernel taps reversed') for rule in ("conv2d", "conv1d")),
    Mutation("l2_penalty", "λ forgotten in dW", "params",
             lambda res, g: (jax.tree_util.tree_map(lambda w: g * w, res[0]), g * res[2]), diagnosis='without the factor λ'),
    Mutation("l2_penalty", "λ gradient silently zero", "lam",
             lambda res, g: (jax.tree_util.tree_map(lambda w: g * res[1] * w, res[0]), jnp.zeros_like(res[1])), diagnosis='the gradient of this argument was dropped'),
]

_FORWARDS = {name: getattr(module, f"{name}_forward")
             for module in (activations, convolution, linear, losses, normalization, pooling, signal)
             for name in dir(module) if hasattr(module, f"{name}_forward")}


def mutant(mutation: Mutation) -> manualgrad.Rule:
    """The registered rule with its VJP replaced by the mutation's."""
    rule = manualgrad.get(mutation.rule)

    @functools.wraps(rule.fn)
    def fn(*args):
        return rule.fn(*args)

    wrong = jax.custom_vjp(fn, nondiff_argnums=rule.fn.nondiff_argnums)
    wrong.defvjp(mutation.forward or _FORWARDS[rule.name], mutation.vjp)
    return rule.__class__(**{**rule.__dict__, "fn": wrong, "name": f"{rule.name} ({mutation.mistake})"})


# The families written in their own files.
from mutations_pooling import MUTATIONS as _POOLING  # noqa: E402
from mutations_signal import MUTATIONS as _SIGNAL  # noqa: E402
from mutations_normalization import MUTATIONS as _NORMALIZATION  # noqa: E402

MUTATIONS += _POOLING + _SIGNAL + _NORMALIZATION
