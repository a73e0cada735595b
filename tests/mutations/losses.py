"""Deliberately wrong backward rules for the losses (``manualgrad/rules/losses.py``)."""

import jax
import jax.numpy as jnp

from manualgrad.rules import losses
from mutations.mutation import Mutation


def _softmax_missing_mean(res, g):
    log_p, labels = res
    d_logits, d_labels = losses.softmax_cross_entropy_backward(log_p, labels, g)
    m = d_logits.size // d_logits.shape[-1]
    return d_logits * m, d_labels


def _softmax_labels_zero(res, g):
    d_logits, d_labels = losses.softmax_cross_entropy_backward(*res, g)
    return d_logits, d_labels if d_labels.dtype == jax.dtypes.float0 else jnp.zeros_like(d_labels)


MUTATIONS = [
    Mutation(
        "mse",
        "missing 1/batch in d pred",
        "pred",
        lambda r, g: (g * r, -g * r / r.shape[0]),
        diagnosis="a missing mean over the batch",
    ),
    Mutation(
        "mse",
        "target gradient silently zero",
        "target",
        lambda r, g: (g * r / r.shape[0], jnp.zeros_like(r)),
        diagnosis="the gradient of this argument was dropped",
    ),
    Mutation(
        "softmax_cross_entropy",
        "missing 1/batch",
        "logits",
        _softmax_missing_mean,
        diagnosis="a missing mean over the batch",
    ),
    Mutation(
        "softmax_cross_entropy",
        "labels gradient silently zero",
        "labels",
        _softmax_labels_zero,
        diagnosis="the gradient of this argument was dropped",
    ),
    Mutation(
        "l2_penalty",
        "λ forgotten in dW",
        "params",
        lambda res, g: (jax.tree_util.tree_map(lambda w: g * w, res[0]), g * res[2]),
        diagnosis="without the factor λ",
    ),
    Mutation(
        "l2_penalty",
        "λ gradient silently zero",
        "lam",
        lambda res, g: (jax.tree_util.tree_map(lambda w: g * res[1] * w, res[0]), jnp.zeros_like(res[1])),
        diagnosis="the gradient of this argument was dropped",
    ),
]
