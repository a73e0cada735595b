"""Trace-time checks of a rule's arguments, so bad input fails with the rule's own words.

Every message starts with the rule's name and names the argument and the shapes or dtypes it
expected and received, e.g. ``dense: x has 5 features but w expects 4 (x: (32, 5), w: (4, 10))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad.errors import ManualgradError


class RuleInputError(ManualgradError, ValueError):
    """An argument of a rule has the wrong shape or value."""


class RuleDTypeError(ManualgradError, TypeError):
    """An argument of a rule has the wrong dtype."""


def array(rule: str, name: str, x: Any) -> None:
    """A Python list or tuple is refused, as ``jax.numpy`` refuses it: ``jax.custom_vjp`` would
    take it apart as a pytree of scalars."""
    if isinstance(x, (list, tuple)):
        raise RuleDTypeError(
            f"{rule}: {name} must be an array, got a Python {type(x).__name__} of {len(x)} items; "
            f"make it one first, e.g. jnp.asarray({name})"
        )


def floating(rule: str, name: str, x: Any) -> None:
    """Integer and boolean inputs are refused rather than silently promoted (lists: :func:`array`)."""
    array(rule, name, x)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise RuleDTypeError(
            f"{rule}: {name} must be a floating-point array, got {dtype} with shape "
            f"{np.shape(x)}; cast it first, e.g. {name}.astype(jnp.float32)"
        )


def same_dtype(rule: str, **arrays: Any) -> None:
    dtypes = {name: jnp.result_type(a) for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{name}: {d}" for name, d in dtypes.items())
        raise RuleDTypeError(f"{rule}: arguments must share one dtype, got {given}")


def min_rank(rule: str, name: str, x: Any, rank: int, layout: str) -> None:
    if np.ndim(x) < rank:
        raise RuleInputError(f"{rule}: {name} must have at least {rank} axes {layout}, got shape {np.shape(x)}")


def same_shape(rule: str, **arrays: Any) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        given = ", ".join(f"{name}: {s}" for name, s in shapes.items())
        raise RuleInputError(f"{rule}: arguments must have the same shape, got {given}")


def varying(x: Any) -> frozenset[str]:
    """The mesh axes along which ``x``'s value varies from device to device inside ``jax.shard_map``
    (empty outside it, and for Python numbers). JAX keeps them in the type, as ``vma`` or as
    ``manual_axis_type.varying`` depending on the release."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def mesh_axis(rule: str, axis_name: Any) -> int:
    """The number of devices along the mesh axis ``axis_name``, for a collective: a str naming an
    axis of the ``jax.shard_map`` the rule runs in; refused otherwise, outside one included."""
    if not isinstance(axis_name, str):
        raise RuleInputError(f"{rule}: axis_name must be the name of a mesh axis (a str), got {axis_name!r}")
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise RuleInputError(
            f"{rule}: no mesh axis {axis_name!r} here: a collective runs inside jax.shard_map over that axis"
        ) from None


def varies(rule: str, name: str, x: Any, axis_name: str, expected: bool) -> None:
    """``x`` is each device's own value along ``axis_name`` (``expected``) or one value copied to
    every device (not ``expected``), as a collective's argument must be."""
    if (axis_name in varying(x)) != expected:
        want, got = ("each device's own value", "one value") if expected else ("one value", "each device's own value")
        raise RuleInputError(f"{rule}: {name} must be {want} along {axis_name!r}, got {got}")
