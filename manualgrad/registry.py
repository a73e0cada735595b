"""The one registry of hand-derived rules.

Every rule module ends by calling :func:`register` with a :class:`Rule`. The checker, the
tests, the CLI and the README's table of rules all read :func:`rules`; nothing else keeps a
list of layers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax

SEED_FILES = {
    "000": "000_a6d29114e988ce87.txt",
    "001": "001_7b729a1ca2c075be.txt",
    "002": "002_3df32e287afc1568.txt",
    "003": "003_e1d91a315b6ad03d.txt",
    "004": "004_392e797842596cf6.txt",
}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One set of positional arguments for a rule, with a label saying what it exercises."""

    args: tuple[Any, ...]
    label: str


SampleInputs = Callable[[jax.Array, Any], Sequence[Sample]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A hand-derived rule.

    Attributes:
      name: the public name, e.g. ``"dense"``.
      fn: the ``jax.custom_vjp`` function; its docstring is the derivation.
      reference: a plain-``jnp`` function with the same signature, differentiated by JAX only.
      sample_inputs: ``sample_inputs(key, dtype)`` returns :class:`Sample` s covering the
        awkward cases (batch 1, extra leading axes, width 1, ...).
      differentiable: positional indices of the arguments the rule differentiates; an
        argument listed here that is an integer array in a sample (class labels) is skipped.
      seeds: ``(seed id, section)`` pairs, e.g. ``(("000", "§4 Linear"),)``.
    """

    name: str
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    sample_inputs: SampleInputs
    differentiable: tuple[int, ...]
    seeds: tuple[tuple[str, str], ...]

    @property
    def argnames(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.fn).parameters)

    @property
    def derivation(self) -> str:
        return inspect.getdoc(self.fn) or ""

    @property
    def seed_text(self) -> str:
        return "; ".join(f"{SEED_FILES[s]} {section}" for s, section in self.seeds)


_RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Adds ``rule`` to the registry after checking that it is complete."""
    if rule.name in _RULES:
        raise ValueError(f"register: a rule named {rule.name!r} is already registered")
    if not isinstance(rule.fn, jax.custom_vjp):
        raise TypeError(f"register: {rule.name}.fn must be a jax.custom_vjp function")
    if not callable(rule.reference) or not callable(rule.sample_inputs):
        raise TypeError(f"register: {rule.name} needs a reference and a sample_inputs generator")
    if not rule.seeds or any(s not in SEED_FILES for s, _ in rule.seeds):
        raise ValueError(f"register: {rule.name} must name its seeds among {sorted(SEED_FILES)}")
    missing = [s for s, _ in rule.seeds if f"seed {s}" not in rule.derivation]
    if missing:
        raise ValueError(
            f"register: {rule.name}'s docstring must carry the derivation and cite "
            f"{', '.join(f'seed {s}' for s in missing)}"
        )
    bad = [i for i in rule.differentiable if not 0 <= i < len(rule.argnames)]
    if bad:
        raise ValueError(f"register: {rule.name} has no positional arguments {bad}")
    _RULES[rule.name] = rule
    return rule


def rules() -> tuple[Rule, ...]:
    """Every registered rule, in registration order."""
    return tuple(_RULES.values())


def get(name: str) -> Rule:
    """The rule called ``name``; a clear error listing the known names otherwise."""
    try:
        return _RULES[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; registered rules: {', '.join(_RULES)}") from None
