"""The mistakes every rule's backward can make, as wrong answers built from the right one ``E``.

``E`` transposed; ``E`` times a constant (``−1`` the sign, ``2`` a missing ½ in the loss, ``½``,
the batch size ``m`` a missing mean over the batch, ``1/m`` an average where a sum belongs,
``0`` a dropped gradient); and, for a raw cotangent of the wrong shape, a broadcast axis not
summed, ``E`` transposed or its axes permuted, and ``E`` reshaped with its axes in the wrong
order. The mistakes of one rule are beside it (``Rule.mistakes``, :mod:`manualgrad.rules.mistakes`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def candidates(args: Any, right: Any) -> Iterator[tuple[str, Any]]:
    """``(text, wrong cotangent)`` for the right cotangent ``right`` of a rule at ``args``
    (traceable): transposed, when it is one array of rank 2 or more, and off by each of :func:`factors`."""
    leaves = jax.tree_util.tree_leaves(right)
    if len(leaves) == 1 and jnp.ndim(leaves[0]) >= 2:
        transposed = jnp.transpose(leaves[0])
        yield "the right one transposed", jnp.reshape(transposed, jnp.shape(leaves[0]))
    for factor, text in factors(args):
        yield text, jax.tree_util.tree_map(lambda e, factor=factor: factor * e, right)


def factors(args: Any) -> list[tuple[float, str]]:
    """The constants a gradient is usually off by, with their usual cause."""
    found = [
        (-1.0, "the right one with the sign flipped"),
        (0.0, "zero: the gradient of this argument was dropped"),
        (2.0, "twice the right one: a missing ½ in the loss"),
        (0.5, "half the right one: a spurious ½"),
    ]
    batches = set()
    for leaf in jax.tree_util.tree_leaves(args):
        shape = jnp.shape(leaf)
        if len(shape) >= 1 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            batches |= {shape[0], math.prod(shape[:-1])}
    for m in sorted(batches - {1}):
        found.append((float(m), f"{m} × the right one: a missing mean over the batch (1/{m})"))
        found.append((1 / m, f"the right one divided by {m}: averaged over the batch where it must be summed"))
    return found


def shape_mistakes(raw: np.ndarray, shape: tuple[int, ...]) -> Iterator[tuple[str, np.ndarray]]:
    """``(what raw is, raw undone to shape)`` for each shape-changing mistake that fits the shapes."""
    summed = unsummed_axes(raw, shape)
    if summed is not None:
        shown = summed if len(summed) > 1 else summed[0]
        yield (
            (
                f"the right one with axis {shown} not summed: a broadcast axis left in "
                f"(shape {raw.shape}, expected {shape})"
            ),
            np.sum(raw, axis=summed).reshape(shape),
        )
    if raw.ndim == len(shape):
        for order in itertools.permutations(range(raw.ndim)):
            if order != tuple(range(raw.ndim)) and tuple(raw.shape[a] for a in order) == shape:
                text = (
                    "the right one transposed"
                    if order == tuple(reversed(range(raw.ndim)))
                    else f"the right one with its axes in the wrong order: transpose it by {order}"
                )
                yield text, np.transpose(raw, order)
    if raw.size == math.prod(shape):
        yield (
            (f"the right one reshaped to {raw.shape} instead of {shape}: a reshape with its axes in the wrong order"),
            np.reshape(raw, shape),
        )


def unsummed_axes(raw: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes of ``raw`` to sum for ``shape``: the extra leading ones, and those ``shape`` has as 1."""
    extra = raw.ndim - len(shape)
    if extra < 0:
        return None
    kept = raw.shape[extra:]
    if any(k != s and s != 1 for k, s in zip(kept, shape)):
        return None
    axes = tuple(range(extra)) + tuple(extra + j for j, (k, s) in enumerate(zip(kept, shape)) if k != s)
    return axes or None
