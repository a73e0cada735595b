"""Deliberately wrong backward rules for the linear rules (``manualgrad/rules/linear.py``)."""

import jax.numpy as jnp

from manualgrad.rules import linear
from mutations.mutation import Mutation


def _dense_w_transposed(res, g):
    x, w = res
    return linear.dense_backward(w, g), jnp.reshape(linear.dense_gradient(g, x), w.shape)


def _dense_x_doubled(res, g):
    x, w = res
    return 2 * linear.dense_backward(w, g), linear.dense_gradient(x, g)


def _dense_w_averaged(res, g):
    x, w = res
    return linear.dense_backward(w, g), linear.dense_gradient(x, g) / x.shape[0]


MUTATIONS = [
    Mutation("dense", "dw transposed and reshaped", "w", _dense_w_transposed, diagnosis="the right one transposed"),
    Mutation("dense", "dx scaled by 2", "x", _dense_x_doubled, diagnosis="a missing ½ in the loss"),
    Mutation(
        "dense",
        "dw averaged over the batch instead of summed",
        "w",
        _dense_w_averaged,
        diagnosis="averaged over the batch where it must be summed",
    ),
    Mutation(
        "bias_add",
        "db averaged instead of summed over broadcast axes",
        "b",
        lambda res, g: (g, jnp.mean(g, axis=tuple(range(g.ndim - 1)))),
        diagnosis="averaged over the batch where it must be summed",
    ),
    Mutation(
        "bias_add",
        "dz sign flipped",
        "z",
        lambda res, g: (-g, linear.bias_add_gradient(g)),
        diagnosis="the sign flipped",
    ),
    Mutation(
        "add",
        "dy dropped: the residual branch gets no gradient",
        "y",
        lambda res, g: (g, jnp.zeros_like(g)),
        diagnosis="the gradient of this argument was dropped",
    ),
]
