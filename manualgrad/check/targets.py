"""What :func:`manualgrad.check` is asked to check, as :class:`Rule` s: registered rules by name,
or a user's own function and reference."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax

from manualgrad import registry
from manualgrad.check.errors import CheckTypeError, ReferenceFailed
from manualgrad.check.trees import is_float, is_float_tree
from manualgrad.registry import Rule, Sample
from manualgrad.text import first_line


def select(
    target: str | Rule | Callable[..., Any] | Sequence[str | Rule] | None,
    reference: Callable[..., Any] | None,
    args: Sequence[Any] | None,
    argnums: Sequence[int] | None,
) -> list[Rule]:
    """The rules ``target`` names (see :func:`manualgrad.check.check`)."""
    if target is None:
        return list(registry.rules())
    if isinstance(target, str):
        return [registry.get(target)]
    if isinstance(target, Rule):
        return [target]
    if callable(target):
        if reference is None or args is None:
            raise CheckTypeError("check: a function needs its reference= and args= to be checked")
        return [user_rule(target, reference, tuple(args), argnums)]
    return [t if isinstance(t, Rule) else registry.get(t) for t in target]


def user_rule(
    fn: Callable[..., Any], reference: Callable[..., Any], args: tuple[Any, ...], argnums: Sequence[int] | None
) -> Rule:
    """A user's function and reference as a :class:`Rule`, both run under the caller's
    ``jax_numpy_rank_promotion``: the checker's ``"raise"`` is for the hand rules, whose
    backward passes are traced outside them. A reference that raises raises
    :class:`ReferenceFailed`."""
    promotion = jax.config.jax_numpy_rank_promotion

    def users(f):
        @functools.wraps(f)
        def run(*a):
            with jax.numpy_rank_promotion(promotion):
                return f(*a)

        return run

    @functools.wraps(reference)
    def named_reference(*a):
        try:
            return reference(*a)
        except Exception as error:
            name = function_name(reference, "<lambda>")
            who = "the reference" if name == "<lambda>" else f"the reference {name}"
            raise ReferenceFailed(f"{who} raised {type(error).__name__}: {first_line(error)}") from error

    def samples(key, dtype):
        del key
        cast = jax.tree_util.tree_map(lambda a: a.astype(dtype) if is_float(a) else a, args)
        return [Sample(cast, "given")]

    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if is_float_tree(a))
    return Rule(function_name(fn), users(fn), users(named_reference), samples, tuple(argnums), ())


def function_name(fn: Callable[..., Any], default: str = "function") -> str:
    """``fn``'s name as a report shows it: its ``__name__``, that of the function a
    ``functools.partial`` wraps, or ``default``; through wrappers (``__wrapped__``)."""
    fn = inspect.unwrap(fn)
    while isinstance(fn, functools.partial):
        fn = inspect.unwrap(fn.func)
    return getattr(fn, "__name__", default)
