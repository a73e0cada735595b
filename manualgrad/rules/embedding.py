"""The embedding lookup ``table[ids]``: a linear map in the table whose adjoint is a scatter-add.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import validation
from manualgrad.registry import VJP, Mistake, Rule, Sample, register
from manualgrad.rules import devices
from manualgrad.rules.samples import keys, normal


def _valid(ids, table):
    """The ids inside ``[0, vocab)``, and every id clipped into it (for reading and scattering)."""
    vocab = jnp.shape(table)[0]
    return (ids >= 0) & (ids < vocab), jnp.clip(ids, 0, vocab - 1)


def embedding_reference(ids: jax.Array, table: jax.Array) -> jax.Array:
    valid, _ = _valid(ids, table)
    rows = jnp.einsum("...v,vd->...d", jax.nn.one_hot(ids, jnp.shape(table)[0], dtype=table.dtype), table)
    return jnp.where(valid[..., None], rows, jnp.nan)


@devices.custom_vjp
def embedding(ids: jax.Array, table: jax.Array) -> jax.Array:
    """The embedding lookup ``y = table[ids]``: one row of ``table`` per id.

    ``ids`` is an integer array of any shape (``(B, T)`` tokens, say), ``table`` has shape
    ``(vocab, dim)``; ``y`` has shape ``ids.shape + (dim,)``. ``ids`` gets a ``float0``
    cotangent, as JAX expects of integer inputs. An id outside ``[0, vocab)`` cannot be caught
    at trace time (the ids are data): its row of ``y`` is NaN, never a clamped or wrapped
    row (``table[ids]`` alone reads the last row for ``vocab`` and for ``-1``), and it adds nothing
    to the table's gradient — the NaN reaches the loss instead.

    Derivation (seed 000 §5 "Add", N. Kumar: a copy's cotangent is the cotangent; seed 002 §4,
    T. Hamm: the adjoint of the linear map ``ι``, ``⟨ι(b), G⟩ = ⟨b, ι*(G)⟩``). For fixed ids the
    lookup is linear in the table: ``y = E(table)`` with ``E(W)_i = W_{ids_i}`` for every
    position ``i`` of ``ids``, which copies row ``ids_i`` to position ``i`` — seed 002's ``ι``
    copies one bias to every position the same way. Perturb the table by ``ΔW`` and move ``E``
    to the other side of ``ΔL = ⟨G, E(ΔW)⟩``, grouping the positions by the row they read.

    Result:

        ΔL = Σ_i ⟨G_i, ΔW_{ids_i}⟩ = Σ_r ⟨Σ_{i : ids_i = r} G_i, ΔW_r⟩
        ⇒  d table_r = Σ_{i : ids_i = r} G_i         (E* = ι*: a scatter-add)

    A row read at several positions (a repeated id) gets the sum of their cotangents, as a
    bias shared by a batch gets ``1ᵀ G`` (seed 002's ``ι*``, seed 000's Add for every copy);
    writing the rows with ``.at[ids].set(G)`` keeps one copy's cotangent and drops the
    others'. Rows never read get 0. Residuals: ``ids`` and the table, of which only the
    shape and dtype are read (it is a parameter, alive anyway: saving it costs nothing).
    """
    return embedding_forward(ids, table)[0]


def _validate_embedding(ids, table) -> None:
    validation.array("embedding", "ids", ids)
    dtype = jnp.result_type(ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise validation.RuleDTypeError(
            f"embedding: ids must be an integer array of row indices, got {dtype} with shape {jnp.shape(ids)}; "
            "cast it first, e.g. ids.astype(jnp.int32)"
        )
    validation.floating("embedding", "table", table)
    if jnp.ndim(table) != 2 or jnp.shape(table)[0] == 0:
        raise validation.RuleInputError(
            f"embedding: table must have shape (vocab, dim) with vocab ≥ 1, got {jnp.shape(table)}"
        )


def embedding_forward(ids: jax.Array, table: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    _validate_embedding(ids, table)
    valid, clipped = _valid(ids, table)
    return jnp.where(valid[..., None], table[clipped], jnp.nan), (ids, table)


def embedding_backward(ids: jax.Array, g: jax.Array) -> np.ndarray:
    """Backward pass: integer ids get the zero ``float0`` cotangent."""
    del g
    return np.zeros(jnp.shape(ids), dtype=jax.dtypes.float0)


def embedding_gradient(ids: jax.Array, table: jax.Array, g: jax.Array) -> jax.Array:
    """Gradient pass ``E*(G)``: ``G_i`` scatter-added to row ``ids_i``; ids outside ``[0, vocab)`` add nothing."""
    valid, clipped = _valid(ids, table)
    return jnp.zeros_like(table).at[clipped].add(jnp.where(valid[..., None], g, 0))


def _embedding_vjp(residuals, g):
    ids, table = residuals
    return embedding_backward(ids, g), embedding_gradient(ids, table, g)


embedding.defvjp(embedding_forward, _embedding_vjp)


def _embedding_samples(key, dtype):
    k = keys(key)
    return [
        Sample((jnp.array([2, 0, 3]), normal(next(k), (5, 4), dtype)), "distinct ids"),
        Sample((jnp.array([1, 3, 1, 1, 0]), normal(next(k), (4, 3), dtype)), "repeated ids"),
        Sample((jnp.array([[0, 2, 2], [4, 0, 2]]), normal(next(k), (6, 2), dtype)), "tokens (B, T), repeated"),
        Sample((jnp.array(3), normal(next(k), (4, 3), dtype)), "one id (scalar)"),
        Sample((jnp.zeros((2, 3), jnp.int32), normal(next(k), (1, 5), dtype)), "vocab 1: every id is 0"),
    ]


def _one_copy(ids, keep: str):
    """Which positions of ``ids`` are the first (or last) of their id: the one a ``.set`` keeps."""
    flat = jnp.ravel(ids)
    same = flat[:, None] == flat[None, :]
    order = jnp.arange(flat.size)
    other = (order[None, :] > order[:, None]) if keep == "last" else (order[None, :] < order[:, None])
    return jnp.reshape(~jnp.any(same & other, axis=1), jnp.shape(ids))


def _embedding_mistakes(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
    ids, table = args
    for keep in ("last", "first"):
        kept = jnp.where(_one_copy(ids, keep)[..., None], g, 0)
        yield (
            f"the right one with .set instead of .add: a repeated id keeps its {keep} copy's cotangent, the "
            "others are overwritten",
            vjp(lambda w, kept=kept: embedding_reference(ids, w), table, kept),
        )


register(
    Rule(
        name="embedding",
        fn=embedding,
        reference=embedding_reference,
        sample_inputs=_embedding_samples,
        differentiable=(1,),
        seeds=(("000", "§5 Add: every copy's cotangent"), ("002", "§4 ι and its adjoint ι*, the sum of the copies")),
        linear_in=((1,),),
        mistakes=(Mistake(1, _embedding_mistakes),),
    )
)
