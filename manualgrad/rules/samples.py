"""Random sample inputs for the registry's rules (shared by every rule module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
