"""Random sample inputs for the registry's rules (shared by every rule module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.registry import Sample, SampleInputs


def generator(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key. Drawing on the host avoids compiling a random
    number program for every new shape, which dominated the checker's run time."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(scale * generator(key).standard_normal(shape), dtype)


def keys(key: jax.Array) -> Iterator[jax.Array]:
    """An endless stream of fresh keys, so a sample list can draw as many as it needs."""
    while True:
        key, sub = jax.random.split(key)
        yield sub


def pairs(shapes: list[tuple[tuple[int, ...], str]]) -> SampleInputs:
    """Sample inputs of two standard normal arrays of one shape, one :class:`Sample` per
    ``(shape, label)``: for a rule of two arguments of equal shapes."""

    def samples(key: jax.Array, dtype: Any) -> list[Sample]:
        k = keys(key)
        return [Sample((normal(next(k), s, dtype), normal(next(k), s, dtype)), label) for s, label in shapes]

    return samples
