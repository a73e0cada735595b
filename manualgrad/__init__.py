"""manualgrad: hand-derived backpropagation rules as ``jax.custom_vjp`` functions.

Every public rule is registered in :mod:`manualgrad.registry`; :func:`check` cross-checks
them against ``jax.grad`` of plain-``jnp`` references and against finite differences.
"""

# Importing a family registers its rules; this order is the order of the registry and the README.
from manualgrad.linear import bias_add, dense  # isort: skip
from manualgrad.activations import identity, leaky_relu, relu, sigmoid, softplus, tanh  # isort: skip
from manualgrad.losses import l2_penalty, mse, softmax_cross_entropy  # isort: skip
from manualgrad.signal import convolve1d, correlate1d  # isort: skip
from manualgrad.convolution import conv1d, conv2d  # isort: skip
from manualgrad.pooling import avg_pool2d, flatten, max_pool2d  # isort: skip
from manualgrad.normalization import batch_norm, dropout, group_norm, layer_norm, rms_norm  # isort: skip
from manualgrad.checker import Report, check
from manualgrad.registry import Rule, Sample, get, register, rules
from manualgrad.validation import RuleDTypeError, RuleInputError

__all__ = [
    "Report",
    "Rule",
    "RuleDTypeError",
    "RuleInputError",
    "Sample",
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
    "flatten",
    "get",
    "group_norm",
    "identity",
    "l2_penalty",
    "layer_norm",
    "leaky_relu",
    "max_pool2d",
    "mse",
    "register",
    "relu",
    "rms_norm",
    "rules",
    "sigmoid",
    "softmax_cross_entropy",
    "softplus",
    "tanh",
]
