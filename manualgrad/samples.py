"""Random sample inputs for the registry's rules (shared by every rule module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    return scale * jax.random.normal(key, shape, dtype)


def keys(key: jax.Array) -> Iterator[jax.Array]:
    """An endless stream of fresh keys, so a sample list can draw as many as it needs."""
    while True:
        key, sub = jax.random.split(key)
        yield sub
