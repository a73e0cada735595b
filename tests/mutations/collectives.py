"""Deliberately wrong backward rules for the collectives (``manualgrad/rules/collectives.py``).

Same format as the other families of ``tests/mutations/``. ``axis_name`` is a nondiff argument
(and ``eps`` of ``sync_batch_norm``), so every wrong VJP takes ``(axis_name, residuals, g)`` or
``(eps, axis_name, residuals, g)``. Each keeps the type JAX checks inside ``shard_map`` (the
varying axes) and gets the value wrong: the missing sum over the devices, or a sum where the
argument varies.
"""

import jax.numpy as jnp
from jax import lax

from manualgrad.rules import devices
from manualgrad.rules import normalization as nz
from mutations.mutation import Mutation


def _gather_own_block(axis_name, res, g):
    n = g.shape[0] // lax.axis_size(axis_name)
    return (lax.dynamic_slice_in_dim(g, lax.axis_index(axis_name) * n, n),)


def _scatter_summed_again(axis_name, res, g):
    return (lax.axis_size(axis_name) * lax.all_gather(g, axis_name, tiled=True),)


def _psum_summed_again(axis_name, res, g):
    return (devices.to_varying(lax.psum(g, axis_name), (axis_name,)),)


def _pvary_one_device(axis_name, res, g):
    return (lax.psum(jnp.where(lax.axis_index(axis_name) == 0, g, 0), axis_name),)


def _sync_local_statistics(eps, axis_name, res, g):
    xhat, inv, gamma = res
    dgamma, dbeta = nz.batch_norm_gradient(xhat, g)
    return nz.batch_norm_backward(xhat, inv, gamma, dgamma, dbeta, g), dgamma, dbeta


MUTATIONS = [
    Mutation(
        "all_gather",
        "each device's own block: the reduce missing",
        "x",
        _gather_own_block,
        diagnosis="the sum over the devices (the reduce) is missing",
    ),
    Mutation(
        "psum_scatter",
        "the all-gather summed again",
        "x",
        _scatter_summed_again,
        diagnosis="each path counted once per device",
    ),
    Mutation(
        "psum",
        "summed where the argument varies",
        "x",
        _psum_summed_again,
        diagnosis="summed where the argument varies",
    ),
    Mutation(
        "pvary",
        "device 0's cotangent: the sum missing",
        "x",
        _pvary_one_device,
        diagnosis="the sum over the devices is missing",
    ),
    Mutation(
        "sync_batch_norm",
        "statistics' cotangents not all-reduced",
        "x",
        _sync_local_statistics,
        diagnosis="not all-reduced",
    ),
]
