"""Deliberately wrong backward rules for the pooling rules (``manualgrad/rules/pooling.py``).

Same format as the other families of ``tests/mutations/``. ``window``, ``stride`` and ``padding`` are nondiff
arguments of both pools, so their wrong VJPs take ``(window, stride, padding, residuals, g)``;
``flatten``'s take ``(residuals, g)``. The tie-breaking mistakes are caught by the ``vjp``
check alone: finite differences leave the columns at a kink (a tie) out.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad.rules import pooling
from mutations.mutation import Mutation

# --------------------------------------------------------------------------- avg_pool2d


def _avg_spread(g, geo, dilate=True, leftover_first=False):
    """``C†`` of the window average with two classic mistakes available.

    ``dilate=False``: ``G`` is laid out contiguously instead of ``s`` apart (the zeros the
    stride needs are all put at the end, so the shape still fits). ``leftover_first``: the
    ``r`` leftover rows are padded before ``G`` instead of after it.
    """
    (kh, kw), strides, pads, leftover, output = geo.window, geo.strides, geo.pads, geo.leftover, geo.output
    config = [(0, 0, 0)]
    for k, s, (lo, hi), r, o in zip(geo.window, strides, pads, leftover, output):
        before, after = k - 1 - lo, k - 1 - hi + r
        if leftover_first:
            before, after = before + r, after - r
        config.append((before, after, s - 1) if dilate else (before, after + (o - 1) * (s - 1), 0))
    config.append((0, 0, 0))
    spread = lax.pad(g, np.array(0, g.dtype), config)
    summed = lax.reduce_window(spread, np.array(0, g.dtype), lax.add, (1, kh, kw, 1), (1, 1, 1, 1), "VALID")
    return summed / (kh * kw)


@functools.partial(jax.jit, static_argnums=1, static_argnames=("dilate", "leftover_first"))
def _avg_spread_compiled(g, geo, **mistake):  # one program instead of many eager operations
    return _avg_spread(g, geo, **mistake)


def _avg_mutation(**mistake):
    def vjp(window, stride, padding, empty, g):
        geo = pooling._geometry("avg_pool2d", empty.shape, window, stride, padding)
        return (_avg_spread_compiled(g, geo, **mistake),)

    return vjp


def _avg_not_divided(window, stride, padding, empty, g):
    geo = pooling._geometry("avg_pool2d", empty.shape, window, stride, padding)
    return (math.prod(geo.window) * pooling._compiled(pooling.avg_pool2d_backward)(geo, g),)


# --------------------------------------------------------------------------- max_pool2d


def _max_route(x, out, g, geo, order="first", offset_lo=True):
    """``S_x*(G)`` with the tie rule chosen: ``"first"`` (right), ``"last"`` or ``"every"``
    tied entry; ``offset_lo=False`` forgets to shift by the low padding when scattering back."""
    entries = list(pooling._window_entries(x, geo))
    if order == "last":
        entries.reverse()
    scatter_geo = geo if offset_lo else geo._replace(pads=tuple((0, lo + hi) for lo, hi in geo.pads))
    dx = jnp.zeros_like(x)
    taken = jnp.zeros(out.shape, bool)
    for i, j, entry in entries:
        wins = entry == out if order == "every" else (entry == out) & ~taken
        taken = taken | wins
        dx = dx + pooling._scatter_to_input(jnp.where(wins, g, jnp.zeros_like(g)), i, j, x.shape, scatter_geo)
    return dx


@functools.partial(jax.jit, static_argnums=3, static_argnames=("order", "offset_lo"))
def _max_route_compiled(x, out, g, geo, **mistake):
    return _max_route(x, out, g, geo, **mistake)


def _max_mutation(**mistake):
    def vjp(window, stride, padding, residuals, g):
        x, out = residuals
        geo = pooling._geometry("max_pool2d", x.shape, window, stride, padding)
        return (_max_route_compiled(x, out, g, geo, **mistake),)

    return vjp


def _max_spread_evenly(window, stride, padding, residuals, g):
    """The average pool's backward: every window entry gets ``G / |K|`` whatever its value."""
    x, _ = residuals
    geo = pooling._geometry("max_pool2d", x.shape, window, stride, padding)
    return (pooling._compiled(pooling.avg_pool2d_backward)(geo, g),)


# --------------------------------------------------------------------------- flatten


def _flatten_column_major(empty, g):
    trailing = empty.shape[1:]
    back = jnp.reshape(g, (g.shape[0], *reversed(trailing)))
    return (jnp.transpose(back, (0, *range(len(trailing), 0, -1))),)


def _flatten_transposed(empty, g):
    return (jnp.reshape(g.T, (g.shape[0], *empty.shape[1:])),)


MUTATIONS = [
    Mutation(
        "avg_pool2d",
        "not divided by the window size",
        "x",
        _avg_not_divided,
        diagnosis="not divided by the window size",
    ),
    Mutation(
        "avg_pool2d",
        "g not dilated by the stride",
        "x",
        _avg_mutation(dilate=False),
        diagnosis="the stride was not dilated into G",
    ),
    Mutation("avg_pool2d", "leftover rows padded before g instead of after", "x", _avg_mutation(leftover_first=True)),
    Mutation("max_pool2d", "ties routed to the last tied entry", "x", _max_mutation(order="last"), ("vjp",)),
    Mutation("max_pool2d", "ties routed to every tied entry", "x", _max_mutation(order="every"), ("vjp",)),
    Mutation("max_pool2d", "low padding not subtracted when scattering back", "x", _max_mutation(offset_lo=False)),
    Mutation("max_pool2d", "g spread evenly over the window, as for the average", "x", _max_spread_evenly),
    Mutation("flatten", "unflattened in column-major order", "x", _flatten_column_major),
    Mutation("flatten", "g transposed before reshaping", "x", _flatten_transposed),
]
