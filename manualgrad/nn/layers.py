"""Layers and models in the stax style, every gradient from a hand rule.

A layer is a pair of pure functions, as in ``jax.example_libraries.stax``::

    init(key, input_shape) -> (output_shape, params)
    apply(params, x, *, reference=False) -> y

``input_shape`` includes the batch axis (any size, ``-1`` allowed); ``params`` is a plain
pytree (dicts of arrays, lists, empty tuples) that any optax optimizer takes unchanged.
``apply`` calls only registered rules (:mod:`manualgrad.registry`), so ``jax.grad`` of a model
chains the hand-written backward rules; with ``reference=True`` it calls the same rules'
plain-``jnp`` references instead, and ``jax.grad`` is JAX's own autodiff of the same model.
Conventions: batch first, ``x @ W + b`` with ``W`` of shape ``(in, out)``, NHWC images and
HWIO kernels, He-normal weights and zero biases (:func:`he_normal`, the one initialisation).

:func:`Dense` and :func:`Conv2D` layers are also seed 002 §4's layer ``k``,
``a_k = C_k(F_{k−1}, W_k) + ι_k(b_k)``, ``F_k = σ_k(a_k)``, and carry what
:mod:`manualgrad.nn.backprop` (Algorithms 1 and 2) needs to run it by hand: the map ``C_k``,
the activation ``σ_k`` and the convolution's geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import registry
from manualgrad.rules.windows import Padding

Shape = tuple[int, ...]


class Layer(NamedTuple):
    """``init(key, input_shape) -> (output_shape, params)`` and ``apply(params, x, *, reference=False)``.

    Attributes:
      init, apply: the stax pair.
      map: ``C_k`` of seed 002 §4 for the layers Algorithms 1 and 2 run: ``"dense"`` (``W`` of
        shape ``(in, out)``; an image input is flattened first) or ``"conv2d"`` (NHWC input, HWIO
        ``W``, one bias per output channel); ``None`` for every other layer.
      activation: ``σ_k``, the name of a registered activation rule, applied after the bias.
      stride, padding, dilation: the convolution's geometry (``"conv2d"`` only).
    """

    init: Callable[[jax.Array, Shape], tuple[Shape, Any]]
    apply: Callable[..., jax.Array]
    map: str | None = None
    activation: str = "identity"
    stride: int | Sequence[int] = 1
    padding: Padding = "VALID"
    dilation: int | Sequence[int] = 1


def _rule(name: str, reference: bool) -> Callable[..., jax.Array]:
    rule = registry.get(name)
    return rule.reference if reference else rule.fn


def _output_shape(apply: Callable, params: Any, input_shape: Shape, dtype: Any) -> Shape:
    concrete = tuple(1 if d < 0 else d for d in input_shape)
    out = jax.eval_shape(lambda p, x: apply(p, x), params, jax.ShapeDtypeStruct(concrete, dtype)).shape
    return (input_shape[0], *out[1:])


def he_normal(key: jax.Array, shape: Shape, dtype: Any) -> dict[str, jax.Array]:
    """``{"w": W, "b": b}``: ``W ~ N(0, 2 / fan_in)`` (He; fan-in: every axis of ``shape`` but the
    last) and ``b = 0``, one bias per output feature (the last axis)."""
    fan_in = int(np.prod(shape[:-1]))
    return {"w": jax.random.normal(key, shape, dtype) * (2.0 / fan_in) ** 0.5, "b": jnp.zeros(shape[-1:], dtype)}


def _with_weights(weight_shape: Callable[[Shape], Shape], apply: Callable, dtype: Any, **spec: Any) -> Layer:
    """A layer with :func:`he_normal` params; ``spec`` is its seed 002 description (:class:`Layer`)."""

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        params = he_normal(key, weight_shape(input_shape), dtype)
        return _output_shape(apply, params, input_shape, dtype), params

    return Layer(init, apply, **spec)


def _parameterless(apply: Callable) -> Layer:
    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        del key
        return _output_shape(apply, (), input_shape, jnp.float32), ()

    return Layer(init, apply)


def Dense(out: int, activation: str = "identity", dtype: Any = jnp.float32) -> Layer:  # noqa: N802 — stax names
    """``σ(x W + b)`` (rules ``dense``, ``bias_add`` and ``activation``); ``x`` of shape ``(N, in)``,
    or ``(N, …)`` flattened first (rule ``flatten``)."""

    def apply(params, x, *, reference=False):
        if jnp.ndim(x) > 2:
            x = _rule("flatten", reference)(x)
        y = _rule("bias_add", reference)(_rule("dense", reference)(x, params["w"]), params["b"])
        return _rule(activation, reference)(y)

    return _with_weights(lambda s: (int(np.prod(s[1:])), out), apply, dtype, map="dense", activation=activation)


def Conv2D(
    features: int,
    kernel: Sequence[int] = (3, 3),
    stride: int | Sequence[int] = 1,  # noqa: N802
    padding: Padding = "VALID",
    dilation: int | Sequence[int] = 1,
    activation: str = "identity",
    dtype: Any = jnp.float32,
) -> Layer:
    """``σ(conv(x, W) + b)``: NHWC convolution with an HWIO kernel, one bias per output channel, then
    ``activation`` (rules ``conv2d``, ``bias_add`` and ``activation``)."""

    def apply(params, x, *, reference=False):
        y = _rule("conv2d", reference)(x, params["w"], stride, padding, dilation)
        return _rule(activation, reference)(_rule("bias_add", reference)(y, params["b"]))

    return _with_weights(
        lambda s: (*tuple(kernel), s[-1], features),
        apply,
        dtype,
        map="conv2d",
        activation=activation,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


def Conv1D(
    features: int,
    kernel: int = 3,
    stride: int = 1,
    padding: Padding = "VALID",  # noqa: N802
    dilation: int = 1,
    dtype: Any = jnp.float32,
) -> Layer:
    """NWC convolution with a WIO kernel and one bias per output channel (``conv1d``, ``bias_add``)."""

    def apply(params, x, *, reference=False):
        y = _rule("conv1d", reference)(x, params["w"], stride, padding, dilation)
        return _rule("bias_add", reference)(y, params["b"])

    return _with_weights(lambda s: (kernel, s[-1], features), apply, dtype)


def _elementwise(name: str, *extra: Any) -> Layer:
    return _parameterless(lambda params, x, *, reference=False: _rule(name, reference)(x, *extra))


Relu = _elementwise("relu")
Sigmoid = _elementwise("sigmoid")
Tanh = _elementwise("tanh")
Softplus = _elementwise("softplus")
Identity = _elementwise("identity")
Flatten = _elementwise("flatten")


def LeakyRelu(negative_slope: float = 0.01) -> Layer:  # noqa: N802
    """``max(z, αz)`` (rule ``leaky_relu``)."""
    return _elementwise("leaky_relu", negative_slope)


def AvgPool2D(
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,  # noqa: N802
    padding: Padding = "VALID",
) -> Layer:
    """Average over windows of NHWC images (rule ``avg_pool2d``)."""
    return _elementwise("avg_pool2d", window, stride, padding)


def MaxPool2D(
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,  # noqa: N802
    padding: Padding = "VALID",
) -> Layer:
    """Maximum over windows of NHWC images (rule ``max_pool2d``)."""
    return _elementwise("max_pool2d", window, stride, padding)


def serial(*layers: Layer) -> Layer:
    """The layers one after the other; ``params`` is the list of the layers' params."""

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        params = []
        for layer, k in zip(layers, jax.random.split(key, len(layers))):
            input_shape, p = layer.init(k, input_shape)
            params.append(p)
        return input_shape, params

    def apply(params, x, *, reference=False):
        for layer, p in zip(layers, params):
            x = layer.apply(p, x, reference=reference)
        return x

    return Layer(init, apply)


def mlp(classes: int, hidden: Sequence[int] = (128,), dtype: Any = jnp.float32) -> Layer:
    """Flatten, then ``Dense → ReLU`` per hidden width, then ``Dense(classes)`` (logits)."""
    body = [layer for width in hidden for layer in (Dense(width, dtype=dtype), Relu)]
    return serial(Flatten, *body, Dense(classes, dtype=dtype))


def cnn(classes: int, channels: Sequence[int] = (16, 32), hidden: int = 64, dtype: Any = jnp.float32) -> Layer:
    """``Conv 3×3 → ReLU`` (then stride 2 for each further width), flatten, ``Dense → ReLU``, ``Dense(classes)``."""
    convs = [
        layer
        for i, c in enumerate(channels)
        for layer in (Conv2D(c, (3, 3), 1 if i == 0 else 2, "SAME", dtype=dtype), Relu)
    ]
    return serial(*convs, Flatten, Dense(hidden, dtype=dtype), Relu, Dense(classes, dtype=dtype))


def classifier_loss(
    model: Layer, params: Any, x: jax.Array, labels: jax.Array, *, reference: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy of ``model`` on ``(x, labels)`` and the number of correct predictions."""
    logits = model.apply(params, x, reference=reference)
    loss = _rule("softmax_cross_entropy", reference)(logits, labels)
    return loss, jnp.sum(jnp.argmax(logits, axis=-1) == labels)
