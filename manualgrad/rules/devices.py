"""The rules across devices: inside ``jax.shard_map`` a rule's arguments meet on the devices' varying axes.

Inside ``jax.shard_map`` (with ``check_vma=True``, JAX's default) every array's type records
the mesh axes along which its value varies from device to device (its *varying manual axes*):
a batch split ``P("d")`` varies along ``d``, a weight replicated ``P()`` does not. Where an
invariant argument meets a varying one, its value is *copied* to every device, and the copy
has an adjoint that a hand backward must apply, or ``custom_vjp`` refuses a cotangent whose
type is not its argument's.

The derivation, once for every rule (seed 002 §4, T. Hamm's ``ι`` and ``ι*``, one level up:
across devices instead of across the rows of a batch). Let ``A`` be the axes the rule's
arguments vary along together, and ``a`` one argument varying along ``A_a ⊆ A`` only. The
rule sees ``a`` as ``ι(a)``, one copy per device of ``A ∖ A_a``; its hand backward returns
``G_k``, the cotangent of device ``k``'s copy. Perturbing ``a`` perturbs every copy at once:

    ΔL = Σ_k ⟨G_k, Δa⟩ = ⟨Σ_k G_k, Δa⟩      ⇒  da = ι*(G) = psum(G, A ∖ A_a)

the adjoint of copying is summing the copies, an all-reduce over the axes the argument does
not vary along. It is Megatron's conjugate pair (M. Shoeybi et al., "Megatron-LM: Training
Multi-Billion Parameter Language Models Using Model Parallelism", §3): ``f`` is the identity
forward and an all-reduce backward.

:class:`custom_vjp` applies it to every rule: before the rule runs, each floating argument is
copied onto the axes ``A`` by :func:`copy_to` (``lax.pcast(a, A ∖ A_a, to="varying")``, no
data moves), whose hand backward is the sum above; the rule's own backward then sees arguments
and cotangents that all vary along ``A``, and a ``scan`` carry that starts from an argument
(an ``lstm``'s ``h0 = 0``) varies along ``A`` from its first step. Outside ``shard_map`` no
argument varies and the rule is called unchanged: not one operation is added.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import validation

Axes = tuple[str, ...]
# The mesh the samples of a rule with an axis_name are drawn for: one axis of two devices.
SAMPLE_AXIS = "devices"
SAMPLE_DEVICES = 2


def to_varying(x: jax.Array, axes: Axes) -> jax.Array:
    """JAX's own cast of ``x`` to vary along ``axes`` (``lax.pcast``, ``lax.pvary`` in older releases):
    no data moves, JAX differentiates it (its transpose is ``psum``)."""
    pcast = getattr(lax, "pcast", None)
    return pcast(x, axes, to="varying") if pcast is not None else lax.pvary(x, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def copy_to(x: jax.Array, axes: Axes) -> jax.Array:
    """``x`` copied onto the mesh ``axes`` it does not vary along: seed 002's ``ι`` across devices.

    Result:

        forward    ι(x) = x on every device of ``axes`` (its type now varies along them)
        backward   ι*(G) = psum(G, axes)       (the module's derivation)
    """
    return to_varying(x, axes)


def _copy_to_forward(x: jax.Array, axes: Axes) -> tuple[jax.Array, None]:
    return to_varying(x, axes), None


def _copy_to_vjp(axes: Axes, residuals: None, g: jax.Array) -> tuple[jax.Array]:
    del residuals
    return (lax.psum(g, axes),)


copy_to.defvjp(_copy_to_forward, _copy_to_vjp)


def axes_of(*trees: Any) -> frozenset[str]:
    """Every mesh axis along which some leaf of ``trees`` varies."""
    return frozenset().union(*(validation.varying(leaf) for leaf in jax.tree_util.tree_leaves(trees)))


def _onto(tree: Any, axes: frozenset[str], cast: Any) -> Any:
    """``tree`` with each floating leaf ``cast(leaf, missing)`` onto the ``axes`` it is missing;
    integers and keys, which have no cotangent, as they are."""

    def leaf_onto(leaf):
        missing = tuple(sorted(axes - validation.varying(leaf)))
        return cast(leaf, missing) if missing and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) else leaf

    return jax.tree_util.tree_map(leaf_onto, tree)


def meet(args: tuple[Any, ...], static: frozenset[int] = frozenset()) -> tuple[Any, ...]:
    """``args`` with every floating leaf copied (:func:`copy_to`) onto the axes along which any
    argument but the ``static`` positions varies; ``args`` itself where none varies."""
    axes = axes_of(*(a for i, a in enumerate(args) if i not in static))
    if not axes:
        return args
    return tuple(a if i in static else _onto(a, axes, copy_to) for i, a in enumerate(args))


def vary_like(tree: Any, *others: Any) -> Any:
    """``tree``'s floating leaves cast to vary along every axis that any leaf of ``tree`` or ``others``
    varies along, by ``lax.pcast`` (whose adjoint, the sum, JAX derives): for a plain-``jnp``
    reference whose ``scan`` carry starts from an argument, so that the carry has its step's type."""
    return _onto(tree, axes_of(tree, *others), to_varying)


class custom_vjp(jax.custom_vjp):  # noqa: N801 -- named as the jax.custom_vjp it extends
    """``jax.custom_vjp`` whose arguments first meet on the devices' varying axes (:func:`meet`):
    inside ``jax.shard_map`` each invariant argument's cotangent is summed over the devices
    (the module's derivation), outside nothing changes. Every rule is decorated with it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            bound = inspect.signature(self.fun).bind(*args, **kwargs)
            bound.apply_defaults()
            args, kwargs = bound.args, {}
        return super().__call__(*meet(args, frozenset(self.nondiff_argnums)))
