"""Deliberately wrong backward rules for the activations (``manualgrad/rules/activations.py``)."""

import jax
import jax.numpy as jnp

from mutations.mutation import Mutation

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
]
