"""Deliberately wrong backward rules for the embedding lookup (``manualgrad/rules/embedding.py``; its
names are imported from the module by name: ``manualgrad.rules.embedding`` is the rule itself)."""

import jax.numpy as jnp

from manualgrad.rules.embedding import embedding_backward
from mutations.mutation import Mutation


def _set_instead_of_add(res, g):
    """The scatter written with ``.set``: of the positions reading one row, only one copy's cotangent survives."""
    ids, table = res
    return embedding_backward(ids, g), jnp.zeros_like(table).at[ids].set(g)


MUTATIONS = [
    Mutation(
        "embedding",
        "the table's gradient written with .set instead of .add",
        "table",
        _set_instead_of_add,
        diagnosis="with .set instead of .add",
    ),
]
