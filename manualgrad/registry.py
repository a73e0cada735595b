"""The one registry of hand-derived rules.

Every rule module ends by calling :func:`register` with a :class:`Rule`. The checker, the
tests, the CLI and the README's table of rules all read :func:`rules`; nothing else keeps a
list of layers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from manualgrad.errors import ManualgradError


class RegistrationError(ManualgradError, ValueError):
    """A rule that :func:`register` refuses: incomplete, inconsistent or already registered."""


class RegistrationTypeError(RegistrationError, TypeError):
    """A rule whose function, reference or sample inputs are not the kind of object a rule needs."""


class UnknownRuleError(ManualgradError, KeyError):
    """No rule is registered under the name asked for; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # the sentence, not KeyError's quoted repr


@dataclasses.dataclass(frozen=True)
class Seed:
    """A seed document. The documents are not part of a clone: they are cited by author and
    title, and ``file`` (the name of its text in the seed collection) is only a secondary key.
    ``author`` is empty where the document names none; ``note`` is its year or what it is."""

    author: str
    title: str
    note: str
    file: str

    @property
    def work(self) -> str:
        """Author, quoted title and note, e.g. ``N. Kumar, "Proofs for ..." (2020)``."""
        return ", ".join(filter(None, (self.author, f'"{self.title}"'))) + (f" ({self.note})" if self.note else "")


SEEDS = {
    "000": Seed("N. Kumar", "Proofs for Neural Network Library", "2020", "000_a6d29114e988ce87.txt"),
    "001": Seed(
        "",
        "Neural network derivation for backpropagation",
        "handwritten notes, author not named",
        "001_7b729a1ca2c075be.txt",
    ),
    "002": Seed(
        "T. Hamm",
        "A Derivation of Feedforward Neural Network Gradients Using Fréchet Calculus",
        "",
        "002_3df32e287afc1568.txt",
    ),
    "003": Seed("", "Tutorial 12: Deep Learning", "tutorial sheet, author not named", "003_e1d91a315b6ad03d.txt"),
    "004": Seed("", "Basic Knowledge", "notes, author not named", "004_392e797842596cf6.txt"),
}


def cite(seed: str, section: str) -> str:
    """The one way a seed is shown to a user: ``seed 000: N. Kumar, "Proofs for Neural Network
    Library" (2020), §4 Linear [000_a6d29114e988ce87.txt]`` — id, author, title, section, file."""
    return f"seed {seed}: {SEEDS[seed].work}, {section} [{SEEDS[seed].file}]"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One set of positional arguments for a rule, with a label saying what it exercises."""

    args: tuple[Any, ...]
    label: str


SampleInputs = Callable[[jax.Array, Any], Sequence[Sample]]
# vjp(fn, primal, g): the cotangent of ``primal`` for ``fn`` under ``g``, by JAX's autodiff of ``fn``.
VJP = Callable[[Callable[[Any], Any], Any, Any], Any]

RESULT_MARKER = "Result:"


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A usual mistake in the backward of one argument, given as the wrong answers it produces.

    ``candidates(vjp, args, g)`` yields ``(text, wrong cotangent)`` pairs for the sample
    ``args`` and the output cotangent ``g``. They are derived from the rule's *reference*
    (``vjp`` differentiates a plain-``jnp`` function, e.g. the reference with the kernel
    flipped or the padding shifted) or from the right answer, never from a hand backward,
    so a diagnosis does not presuppose the mistake it finds. ``text`` completes
    "your gradient equals ...", e.g. ``"the right one for the kernel not flipped"``.
    """

    argument: int
    candidates: Callable[[VJP, tuple[Any, ...], Any], Iterable[tuple[str, Any]]]


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
      linear_in: groups of positional indices in which the rule is linear, each group held
        jointly with every other argument fixed: ``dense`` is linear in ``x`` and in ``w``
        (``((0,), (1,))``), ``bias_add`` jointly in ``(z, b)`` (``((0, 1),)``). The checker's
        ``adjoint`` check runs seed 002's dot-product test ``⟨C(u), y⟩ = ⟨u, C†(y)⟩`` on each.
      mistakes: the usual mistakes of this rule's backward (:class:`Mistake`), beyond the
        ones every rule can make (transposed, a constant factor, the sign, an axis not summed),
        which :mod:`manualgrad.check.diagnose` tries when a hand VJP is wrong.
      split: for a rule with an ``axis_name`` argument (a collective, which runs only inside
        ``jax.shard_map``): the arguments that vary by device. Its samples give each of them with
        a leading axis of one block per device and every other argument replicated, and their
        mistakes see the arguments, the outputs and the cotangents so, the blocks stacked
        (:func:`manualgrad.check.sharded.device_rule`).
    """

    name: str
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    sample_inputs: SampleInputs
    differentiable: tuple[int, ...]
    seeds: tuple[tuple[str, str], ...]
    linear_in: tuple[tuple[int, ...], ...] = ()
    mistakes: tuple[Mistake, ...] = ()
    split: tuple[int, ...] = ()

    @property
    def argnames(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.fn).parameters)

    @property
    def derivation(self) -> str:
        return inspect.getdoc(self.fn) or ""

    @property
    def derivation_setup(self) -> str:
        """The derivation up to its result: the docstring before its ``Result:`` line."""
        lines = self.derivation.splitlines()
        cut = next((i for i, line in enumerate(lines) if line.strip() == RESULT_MARKER), len(lines))
        return "\n".join(lines[:cut]).rstrip()

    @property
    def seed_text(self) -> str:
        """The rule's seeds as :func:`cite` writes them, joined by ``"; "``."""
        return "; ".join(cite(s, section) for s, section in self.seeds)

    def with_backward(
        self,
        bwd: Callable[..., Any],
        fwd: Callable[..., Any] | None = None,
        *,
        primal: Callable[..., Any] | None = None,
        name: str | None = None,
    ) -> Rule:
        """This rule with another backward: a new ``jax.custom_vjp`` with the same signature,
        docstring and ``nondiff_argnums``, whose VJP is ``fwd`` (default the rule's own forward
        pass, saving its residuals) and ``bwd``; ``primal`` (default the rule's function)
        computes the output where nothing is differentiated. The new function is of the rule's own
        class (a rule's ``devices.custom_vjp`` sums an invariant argument's cotangent over the
        devices before any backward sees it). A student's exercise, a planted mutation and a
        test's wrong backward are all built this way."""
        original = self.fn
        output = original if primal is None else primal

        @functools.wraps(original.fun)
        def fn(*args):
            return output(*args)

        # the rule's own kind of custom_vjp: a rule's arguments meet on the devices' axes whatever its backward
        replaced = type(original)(fn, nondiff_argnums=original.nondiff_argnums)
        replaced.defvjp(original.fwd if fwd is None else fwd, bwd)
        return dataclasses.replace(self, fn=replaced, name=self.name if name is None else name)


_RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Adds ``rule`` to the registry after checking that it is complete."""
    if rule.name in _RULES:
        raise RegistrationError(f"register: a rule named {rule.name!r} is already registered")
    if not isinstance(rule.fn, jax.custom_vjp):
        raise RegistrationTypeError(f"register: {rule.name}.fn must be a jax.custom_vjp function")
    if not callable(rule.reference) or not callable(rule.sample_inputs):
        raise RegistrationTypeError(f"register: {rule.name} needs a reference and a sample_inputs generator")
    if not rule.seeds or any(s not in SEEDS for s, _ in rule.seeds):
        raise RegistrationError(f"register: {rule.name} must name its seeds among {sorted(SEEDS)}")
    missing = [s for s, _ in rule.seeds if f"seed {s}" not in rule.derivation]
    if missing:
        raise RegistrationError(
            f"register: {rule.name}'s docstring must carry the derivation and cite "
            f"{', '.join(f'seed {s}' for s in missing)}"
        )
    bad = [i for i in rule.differentiable if not 0 <= i < len(rule.argnames)]
    if bad:
        raise RegistrationError(f"register: {rule.name} has no positional arguments {bad}")
    if [line.strip() for line in rule.derivation.splitlines()].count(RESULT_MARKER) != 1:
        raise RegistrationError(
            f"register: {rule.name}'s docstring must have one line {RESULT_MARKER!r} where the derivation's "
            "result begins (exercises show the derivation up to it)"
        )
    linear = [i for group in rule.linear_in for i in group]
    if any(not group for group in rule.linear_in) or len(linear) != len(set(linear)):
        raise RegistrationError(
            f"register: {rule.name}.linear_in must be disjoint, non-empty groups, got {rule.linear_in}"
        )
    if not set(linear) <= set(rule.differentiable):
        raise RegistrationError(
            f"register: {rule.name}.linear_in {rule.linear_in} names arguments outside differentiable "
            f"{rule.differentiable}"
        )
    if not {m.argument for m in rule.mistakes} <= set(rule.differentiable):
        raise RegistrationError(
            f"register: {rule.name}.mistakes name arguments outside differentiable {rule.differentiable}"
        )
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
        raise UnknownRuleError(f"no rule named {name!r}; registered rules: {', '.join(_RULES)}") from None
