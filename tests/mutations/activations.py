"""Deliberately wrong backward rules for the activations (``manualgrad/rules/activations.py``)."""

import math

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad.rules import activations
from mutations.mutation import Mutation


def _gelu_gate_alone(approximate, z, g):
    """dz = G ⊙ s(z): the product rule's z s'(z) forgotten."""
    if approximate:
        return (g * 0.5 * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),)
    return (g * 0.5 * lax.erfc(-z / math.sqrt(2)),)


MUTATIONS = [
    Mutation("sigmoid", "missing σ' factor", "z", lambda f, g: (g,), diagnosis="the factor σ' is missing"),
    Mutation("sigmoid", "σ' = F instead of F(1 − F)", "z", lambda f, g: (g * f,)),
    Mutation("tanh", "σ' = 1 − F instead of 1 − F²", "z", lambda f, g: (g * (1 - f),)),
    Mutation(
        "relu",
        "mask F ≥ 0, which every output passes",
        "z",
        lambda f, g: (jnp.where(f >= 0, g, 0.0),),
        diagnosis="the factor σ' is missing",
    ),
    Mutation("relu", "mask taken from the cotangent", "z", lambda f, g: (jnp.where(g > 0, g, 0.0),)),
    Mutation("leaky_relu", "slope forgotten", "z", lambda slope, f, g: (jnp.where(f > 0, g, 0.0),)),
    Mutation(
        "softplus",
        "σ' evaluated at the output",
        "z",
        lambda f, g: (g * jax.nn.sigmoid(f),),
        diagnosis="σ' taken at the output",
    ),
    Mutation("identity", "sign flipped", "z", lambda res, g: (-g,), diagnosis="the sign flipped"),
    Mutation(
        "gelu",
        "the derivative of the other form (tanh for exact, exact for tanh)",
        "z",
        lambda approximate, z, g: (activations.gelu_backward(z, not approximate, g),),
        diagnosis="the gelu derivative of the other form",
    ),
    Mutation("gelu", "the gate alone, z s'(z) forgotten", "z", _gelu_gate_alone, diagnosis="the gate alone"),
]
