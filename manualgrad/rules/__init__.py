"""The rules, one module per family, and the helpers only rules use: argument checks
(:mod:`~manualgrad.validation`, public for exercise files), sample inputs (:mod:`~manualgrad.rules.samples`), window
geometry (:mod:`~manualgrad.rules.windows`) and the usual mistakes (:mod:`~manualgrad.rules.mistakes`).

Importing this package registers every family; this order is the order of the registry and the README.
``embedding`` and ``attention`` name both a family's module and its rule: ``manualgrad.rules.attention``
is the rule, as ``manualgrad.check`` is the function; import the module's other names by name
(``from manualgrad.rules.attention import attention_backward``).

The protocol of a rule
----------------------
Every rule ``NAME`` is five pieces, in this order in its family's module (``tests/rules/test_rules.py``
checks the order and the signatures):

``NAME_reference(*args) -> y``
    The function in plain ``jnp``, no ``custom_vjp``: the checker differentiates it with
    ``jax.grad`` to judge the hand rule.
``@jax.custom_vjp def NAME(*args) -> y``
    The public function, ``NAME_forward(*args)[0]``. Its docstring derives the rule in the seed's
    notation, cites each seed as ``seed 00N`` and has one ``Result:`` line where the result
    begins (``manualgrad exercise`` stops there).
``NAME_forward(*args) -> (y, residuals)``
    Validates the arguments with :mod:`~manualgrad.validation` (a one-sentence
    :class:`~manualgrad.registry.RuleInputError` naming the rule, the argument and the shapes or
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
the registry's order), export ``NAME`` here and from ``manualgrad/__init__.py``, add at least one
wrong backward to its family's file in ``tests/mutations/`` and a known-value test to
``tests/rules/test_known_values.py``, and regenerate the README's table with
``python -m manualgrad.teach.docs``. ``register`` refuses a rule without a custom_vjp function, a
reference, sample inputs, a docstring citing its seeds with one ``Result:`` line, or with
``linear_in`` groups that overlap or leave ``differentiable``; ``tests/rules/test_rules.py`` then
runs every check on it in both dtypes.
"""

from manualgrad.rules.linear import add, bias_add, dense  # isort: skip
from manualgrad.rules.activations import gelu, identity, leaky_relu, relu, sigmoid, softplus, tanh  # isort: skip
from manualgrad.rules.losses import l2_penalty, mse, softmax_cross_entropy  # isort: skip
from manualgrad.rules.correlation import convolve1d, correlate1d  # isort: skip
from manualgrad.rules.convolution import conv1d, conv2d  # isort: skip
from manualgrad.rules.pooling import avg_pool2d, flatten, max_pool2d  # isort: skip
from manualgrad.rules.normalization import batch_norm, dropout, group_norm, layer_norm, rms_norm  # isort: skip
from manualgrad.rules.recurrence import lstm, rnn  # isort: skip
from manualgrad.rules.embedding import embedding  # isort: skip
from manualgrad.rules.attention import attention, log_softmax, softmax  # isort: skip

__all__ = [
    "add",
    "attention",
    "embedding",
    "gelu",
    "log_softmax",
    "softmax",
    "rms_norm",
    "layer_norm",
    "group_norm",
    "dropout",
    "batch_norm",
    "avg_pool2d",
    "bias_add",
    "conv1d",
    "conv2d",
    "convolve1d",
    "correlate1d",
    "dense",
    "flatten",
    "identity",
    "l2_penalty",
    "leaky_relu",
    "lstm",
    "max_pool2d",
    "mse",
    "relu",
    "rnn",
    "sigmoid",
    "softmax_cross_entropy",
    "softplus",
    "tanh",
]
