"""Deliberately wrong backward rules, one list per registered rule: the mistakes people make.

One module per rule family, in the registry's order; :data:`MUTATIONS` gathers them. Each
mutation keeps the rule's own forward and replaces its VJP. ``tests/check/test_checker.py``
checks that the cross-checker reports every one as failing and names the rule and the argument.
"""

import manualgrad
from mutations import (
    activations,
    attention,
    collectives,
    convolution,
    correlation,
    embedding,
    linear,
    losses,
    normalization,
    pooling,
    recurrence,
)
from mutations.mutation import Mutation

MUTATIONS: list[Mutation] = [
    *linear.MUTATIONS,
    *activations.MUTATIONS,
    *losses.MUTATIONS,
    *correlation.MUTATIONS,
    *convolution.MUTATIONS,
    *pooling.MUTATIONS,
    *normalization.MUTATIONS,
    *recurrence.MUTATIONS,
    *embedding.MUTATIONS,
    *attention.MUTATIONS,
    *collectives.MUTATIONS,
]


def mutant(mutation: Mutation) -> manualgrad.Rule:
    """The registered rule with its VJP replaced by the mutation's."""
    rule = manualgrad.get(mutation.rule)
    return rule.with_backward(mutation.vjp, mutation.forward, name=f"{rule.name} ({mutation.mistake})")
