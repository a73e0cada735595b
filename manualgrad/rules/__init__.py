"""The rules, one module per family, and the helpers only rules use: argument checks
(:mod:`~manualgrad.validation`, public for exercise files), sample inputs (:mod:`~manualgrad.rules.samples`), window
geometry (:mod:`~manualgrad.rules.windows`), the usual mistakes (:mod:`~manualgrad.rules.mistakes`) and the
passage across devices (:mod:`~manualgrad.rules.devices`).

Importing this package registers every family; this order is the order of the registry and the README.
The rules themselves are public as ``manualgrad.NAME`` (``mg.dense``), read from the registry;
``manualgrad.rules.attention`` is the family's module.

The protocol of a rule
----------------------
Every rule ``NAME`` is five pieces, in this order in its family's module (``tests/rules/test_rules.py``
checks the order and the signatures):

``NAME_reference(*args) -> y``
    The function in plain ``jnp``, no ``custom_vjp``: the checker differentiates it with
    ``jax.grad`` to judge the hand rule.
``@devices.custom_vjp def NAME(*args) -> y``
    The public function, ``NAME_forward(*args)[0]``. Its docstring derives the rule in the seed's
    notation, cites each seed as ``seed 00N`` and has one ``Result:`` line where the result
    begins (``manualgrad exercise`` stops there). :class:`~manualgrad.rules.devices.custom_vjp` is
    ``jax.custom_vjp`` whose arguments first meet on the devices' varying axes inside
    ``jax.shard_map``: the cotangent of an argument replicated over devices is summed over them
    there, derived once in :mod:`~manualgrad.rules.devices`, so a backward never does it itself.
``NAME_forward(*args) -> (y, residuals)``
    Validates the arguments with :mod:`~manualgrad.validation` (a one-sentence
    :class:`~manualgrad.validation.RuleInputError` naming the rule, the argument and the shapes or
    dtypes expected) and returns the output and what the backward pass needs.
``NAME_backward(..., g) -> dx`` and, for a rule with weights, ``NAME_gradient(..., g) -> dW``
    The seeds' backward pass ``C†`` (the cotangent of the input) and gradient pass ``C††`` (the
    cotangent of the weights), from the residuals and the static arguments, the cotangent ``g``
    always last. No ``jax.vjp``/``jax.grad``/``jax.jvp``/``jax.linearize`` inside.
    A private ``_NAME_vjp(*nondiff, residuals, g)`` unpacks the residuals, calls them and returns one
    cotangent per differentiable argument; ``NAME.defvjp(NAME_forward, _NAME_vjp)`` ties them to ``NAME``.
``register(Rule(...))``
    The registration: ``name``, ``fn``, ``reference``, ``sample_inputs`` (a function of a key and a
    dtype returning :class:`~manualgrad.registry.Sample` s: cover batch 1, extra leading axes and
    width 1), ``differentiable`` (argument indices), ``seeds`` (``(("00N", "section"), ...)``),
    ``linear_in`` (groups of arguments the rule is linear in, for the adjoint test) and
    ``mistakes`` (the rule's usual wrong backwards, for the diagnoses).

To add a rule: write the five pieces in its family's module (or a new module, imported below in
the registry's order; ``manualgrad.NAME`` then comes from the registry), add at least one
wrong backward to its family's file in ``tests/mutations/`` and a known-value test to
``tests/rules/test_known_values.py``, and regenerate the README's table with
``python -m manualgrad.teach.docs``. ``register`` refuses (a
:class:`~manualgrad.registry.RegistrationError`) a rule without a custom_vjp function, a
reference, sample inputs, a docstring citing its seeds with one ``Result:`` line, or with
``linear_in`` groups that overlap or leave ``differentiable``; ``tests/rules/test_rules.py`` then
runs every check on it in both dtypes.
"""

from manualgrad.rules import (  # isort: skip
    linear,
    activations,
    losses,
    correlation,
    convolution,
    pooling,
    normalization,
    recurrence,
    embedding,
    attention,
    collectives,
)

__all__ = [
    "linear",
    "activations",
    "losses",
    "correlation",
    "convolution",
    "pooling",
    "normalization",
    "recurrence",
    "embedding",
    "attention",
    "collectives",
]
