"""Pytree helpers of the checker, on the host where they can be (no compile): flatten, name an
entry, draw like a tree, close over the arguments not differentiated."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.rules.samples import generator


def flat(tree: Any) -> np.ndarray:
    """A pytree's leaves raveled and concatenated in float64, on the host (no compile)."""
    leaves = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def locate(tree: Any, flat_index: int, prefix: str) -> str:
    """Names entry ``flat_index`` of a raveled pytree, e.g. ``params[0]['w'][2, 1]``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        size = int(np.size(leaf))
        if flat_index < size:
            index = np.unravel_index(flat_index, np.shape(leaf))
            entry = f"[{', '.join(str(int(j)) for j in index)}]" if index else ""
            return f"{prefix}{jax.tree_util.keystr(path)}{entry}"
        flat_index -= size
    return prefix


def host(x: Any, dtype: Any) -> jax.Array:
    """``x`` as a device array of ``dtype``, converted on the host: an eager cast or ``jnp.asarray``
    of a NumPy array compiles a small program for every new shape."""
    return jax.device_put(np.asarray(x, dtype))


def random_like(key: jax.Array, tree: Any) -> Any:
    """Standard normal draws shaped like ``tree``'s leaves (drawn on the host: no compile)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = generator(key)
    return treedef.unflatten([host(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)) for x in leaves])


def stack_perturbed(key: jax.Array, tree: Any) -> Any:
    """A batch of two: ``tree`` and ``tree`` plus noise, stacked on a new leading axis."""
    noise = random_like(key, tree)

    def stack(x, n):
        x = np.asarray(x)
        return host(np.stack([x, x + 0.5 * np.asarray(n)]), x.dtype)

    return jax.tree_util.tree_map(stack, tree, noise)


def closure(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int]) -> Callable[..., Any]:
    """``fn`` as a function of ``args[i]`` for ``i`` in ``diff``, the other arguments fixed."""

    def f(*primals):
        full = list(args)
        for i, p in zip(diff, primals):
            full[i] = p
        return fn(*full)

    return f


def pullback(fn: Callable[..., Any]) -> Callable[[Sequence[Any], Any], tuple[Any, ...]]:
    """``fn``'s VJP as a function of ``(primals, cotangent)``: ``c ↦ cᵀ ∂fn(primals)``, per primal."""
    return lambda primals, cotangent: jax.vjp(fn, *primals)[1](cotangent)


def traced(fn: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``fn`` and its :func:`pullback`, each under one ``jax.jit`` that is inlined where it is
    called: inside a program every call at the same shapes reuses one trace, and the program is
    lowered and differentiated as one (no nested programs)."""
    return jax.jit(fn, inline=True), jax.jit(pullback(fn), inline=True)


def is_float(a: Any) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def is_float_tree(a: Any) -> bool:
    """A non-empty pytree whose every leaf is floating."""
    leaves = jax.tree_util.tree_leaves(a)
    return bool(leaves) and all(is_float(jnp.asarray(x)) for x in leaves)
