"""Deliberately wrong backward rules, one list per registered rule: the mistakes people make.

One module per rule family, in the registry's order; :data:`MUTATIONS` gathers them. Each
mutation keeps the rule's own forward and replaces its VJP. ``tests/check/test_checker.py``
checks that the cross-checker reports every one as failing and names the rule and the argument.
"""

import functools

import jax

import manualgrad
from mutations import activations, convolution, correlation, linear, losses, normalization, pooling
from mutations.mutation import Mutation

MUTATIONS: list[Mutation] = [
    *linear.MUTATIONS,
    *activations.MUTATIONS,
    *losses.MUTATIONS,
    *correlation.MUTATIONS,
    *convolution.MUTATIONS,
    *pooling.MUTATIONS,
    *normalization.MUTATIONS,
]


def mutant(mutation: Mutation) -> manualgrad.Rule:
    """The registered rule with its VJP replaced by the mutation's."""
    rule = manualgrad.get(mutation.rule)

    @functools.wraps(rule.fn)
    def fn(*args):
        return rule.fn(*args)

    wrong = jax.custom_vjp(fn, nondiff_argnums=rule.fn.nondiff_argnums)
    wrong.defvjp(mutation.forward or rule.fn.fwd, mutation.vjp)
    return rule.__class__(**{**rule.__dict__, "fn": wrong, "name": f"{rule.name} ({mutation.mistake})"})
