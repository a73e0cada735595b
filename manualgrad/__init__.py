"""manualgrad: hand-derived backpropagation rules as ``jax.custom_vjp`` functions.

Every public rule is registered in :mod:`manualgrad.registry`; :func:`check` cross-checks
them against ``jax.grad`` of plain-``jnp`` references and against finite differences.
"""

from manualgrad.activations import identity, leaky_relu, relu, sigmoid, softplus, tanh
from manualgrad.checker import Report, check
from manualgrad.convolution import conv1d, conv2d
from manualgrad.linear import bias_add, dense
from manualgrad.losses import l2_penalty, mse, softmax_cross_entropy
from manualgrad.registry import Rule, Sample, get, register, rules
from manualgrad.validation import RuleDTypeError, RuleInputError

__all__ = [
    "Report",
    "Rule",
    "RuleDTypeError",
    "RuleInputError",
    "Sample",
    "bias_add",
    "check",
    "conv1d",
    "conv2d",
    "dense",
    "get",
    "identity",
    "l2_penalty",
    "leaky_relu",
    "mse",
    "register",
    "relu",
    "rules",
    "sigmoid",
    "softmax_cross_entropy",
    "softplus",
    "tanh",
]
