"""manualgrad: hand-derived backpropagation rules as ``jax.custom_vjp`` functions.

Every public rule is registered in :mod:`manualgrad.registry`; :func:`check` cross-checks
them against ``jax.grad`` of plain-``jnp`` references and against finite differences.
"""

# Importing manualgrad.rules registers every family, in the order of the registry and the README.
# The functions check and rules are imported after the subpackages of the same names: from here
# on, mg.check and mg.rules are the functions (import the subpackages' modules with
# ``from manualgrad.check import checker``, ``from manualgrad.rules import linear``).
from manualgrad.rules import (  # isort: skip
    add,
    attention,
    avg_pool2d,
    batch_norm,
    bias_add,
    conv1d,
    conv2d,
    convolve1d,
    correlate1d,
    dense,
    dropout,
    embedding,
    flatten,
    gelu,
    group_norm,
    identity,
    l2_penalty,
    layer_norm,
    leaky_relu,
    lstm,
    log_softmax,
    max_pool2d,
    mse,
    relu,
    rnn,
    rms_norm,
    sigmoid,
    softmax,
    softmax_cross_entropy,
    softplus,
    tanh,
)
from manualgrad.check import Report, check  # isort: skip
from manualgrad.check.audit import audit  # isort: skip
from manualgrad.registry import Rule, Sample, get, register, rules  # isort: skip
from manualgrad.validation import RuleDTypeError, RuleInputError  # isort: skip

__all__ = [
    "Report",
    "Rule",
    "RuleDTypeError",
    "RuleInputError",
    "Sample",
    "audit",
    "add",
    "attention",
    "avg_pool2d",
    "batch_norm",
    "bias_add",
    "check",
    "conv1d",
    "conv2d",
    "convolve1d",
    "correlate1d",
    "dense",
    "dropout",
    "embedding",
    "flatten",
    "gelu",
    "get",
    "group_norm",
    "identity",
    "l2_penalty",
    "layer_norm",
    "leaky_relu",
    "lstm",
    "log_softmax",
    "max_pool2d",
    "mse",
    "register",
    "relu",
    "rnn",
    "rms_norm",
    "rules",
    "sigmoid",
    "softmax",
    "softmax_cross_entropy",
    "softplus",
    "tanh",
]
