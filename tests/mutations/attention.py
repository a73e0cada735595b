"""Deliberately wrong backward rules for softmax, log_softmax and attention (``manualgrad/rules/attention.py``;
its names are imported from the module by name: ``manualgrad.rules.attention`` is the rule itself).

``axis`` and ``causal`` are nondiff arguments, so every wrong VJP takes ``(axis, residuals, g)``
or ``(causal, residuals, g)``. :data:`MUTATIONS` wrong one argument each, as
``tests/check/test_checker.py`` expects; the mistakes that wrong several arguments at once (the
causal mask forgotten in the whole backward, ``dQ`` and ``dK`` swapped) are in :data:`JOINT`,
which ``tests/rules/test_attention.py`` checks the same way, argument by argument.
"""

import math

import jax.numpy as jnp

from manualgrad.rules.attention import _scores, attention_backward
from mutations.mutation import Mutation


def _softmax_diagonal(axis, p, g):
    return (p * g,)


def _right(causal, res, g):
    return attention_backward(*res, causal, g)


def _scale_left_out_of_dq(causal, res, g):
    dq, dk, dv = _right(causal, res, g)
    return dq * math.sqrt(res[0].shape[-1]), dk, dv


def _scale_left_out_of_dk(causal, res, g):
    dq, dk, dv = _right(causal, res, g)
    return dq, dk * math.sqrt(res[0].shape[-1]), dv


def _scale_left_out(causal, res, g):
    dq, dk, dv = _right(causal, res, g)
    return dq * math.sqrt(res[0].shape[-1]), dk * math.sqrt(res[0].shape[-1]), dv


def _unmasked_probabilities(res):
    """``P = exp(S − ℓ)`` from the unmasked scores: the backward of a causal forward that forgot its mask."""
    q, k, v, o, lse = res
    return jnp.exp(_scores(q, k, False) - lse[..., None])


def _mask_left_out_of_dv(causal, res, g):
    dq, dk, _ = _right(causal, res, g)
    return dq, dk, jnp.einsum("bnts,btnh->bsnh", _unmasked_probabilities(res), g)


def _mask_left_out(causal, res, g):
    """The whole FlashAttention backward with ``P`` recomputed unmasked."""
    q, k, v, o, lse = res
    p = _unmasked_probabilities(res)
    ds = p * (jnp.einsum("btnh,bsnh->bnts", g, v) - jnp.einsum("btnh,btnh->bnt", g, o)[..., None])
    scale = 1 / math.sqrt(q.shape[-1])
    return (
        jnp.einsum("bnts,bsnh->btnh", ds, k) * scale,
        jnp.einsum("bnts,btnh->bsnh", ds, q) * scale,
        jnp.einsum("bnts,btnh->bsnh", p, g),
    )


def _diagonal_ds(causal, res, g):
    """``dS = P ⊙ dP``: the softmax Jacobian's diagonal alone, the row sums rowsum(dO ⊙ O) left out."""
    q, k, v, o, lse = res
    p = jnp.exp(_scores(q, k, causal) - lse[..., None])
    ds = p * jnp.einsum("btnh,bsnh->bnts", g, v)
    scale = 1 / math.sqrt(q.shape[-1])
    dv = _right(causal, res, g)[2]
    return jnp.einsum("bnts,bsnh->btnh", ds, k) * scale, jnp.einsum("bnts,btnh->bsnh", ds, q) * scale, dv


def _swapped(causal, res, g):
    dq, dk, dv = _right(causal, res, g)
    return dk, dq, dv


MUTATIONS = [
    Mutation(
        "softmax",
        "the Jacobian's diagonal alone: dz = p ⊙ G",
        "z",
        _softmax_diagonal,
        diagnosis="the softmax Jacobian's diagonal alone",
    ),
    Mutation(
        "log_softmax",
        "the term −p Σ G missing: dz = G",
        "z",
        lambda axis, y, g: (g,),
        diagnosis="the term −p Σ G (the path through log Σ e^z) is missing",
    ),
    Mutation("attention", "1/√H left out of dQ", "q", _scale_left_out_of_dq, diagnosis="the scale 1/√H left out of dq"),
    Mutation("attention", "1/√H left out of dK", "k", _scale_left_out_of_dk, diagnosis="the scale 1/√H left out of dk"),
    Mutation(
        "attention",
        "the causal mask not applied to the P of dV = Pᵀ dO",
        "v",
        _mask_left_out_of_dv,
        diagnosis="the causal mask not applied in the backward",
    ),
]

JOINT = [
    Mutation(
        "attention",
        "the causal mask not applied in the backward",
        "q, k, v",
        _mask_left_out,
        diagnosis="the causal mask not applied in the backward",
    ),
    Mutation("attention", "dK and dQ swapped", "q, k", _swapped, diagnosis="dQ and dK swapped"),
    Mutation(
        "attention", "1/√H left out of dQ and dK", "q, k", _scale_left_out, diagnosis="the scale 1/√H left out of d"
    ),
    Mutation(
        "attention",
        "the softmax Jacobian's diagonal alone in dS",
        "q, k",
        _diagonal_ds,
        diagnosis="the softmax Jacobian's diagonal alone",
    ),
]
