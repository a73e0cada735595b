"""The rules, one module per family, and the helpers only rules use: argument checks
(:mod:`~manualgrad.rules.validation`), sample inputs (:mod:`~manualgrad.rules.samples`), window
geometry (:mod:`~manualgrad.rules.windows`) and the usual mistakes (:mod:`~manualgrad.rules.mistakes`).

Importing this package registers every family; this order is the order of the registry and the README.
"""

from manualgrad.rules.linear import bias_add, dense  # isort: skip
from manualgrad.rules.activations import identity, leaky_relu, relu, sigmoid, softplus, tanh  # isort: skip
from manualgrad.rules.losses import l2_penalty, mse, softmax_cross_entropy  # isort: skip
from manualgrad.rules.correlation import convolve1d, correlate1d  # isort: skip
from manualgrad.rules.convolution import conv1d, conv2d  # isort: skip
from manualgrad.rules.pooling import avg_pool2d, flatten, max_pool2d  # isort: skip
from manualgrad.rules.normalization import batch_norm, dropout, group_norm, layer_norm, rms_norm  # isort: skip

__all__ = [
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
    "max_pool2d",
    "mse",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "softplus",
    "tanh",
]
