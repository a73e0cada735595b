"""Layers and models in the stax style, every gradient from a hand rule.

A layer is stax's pair of pure functions plus a third for its state (Haiku's
``transform_with_state``, Flax's ``batch_stats``)::

    init(key, input_shape) -> (output_shape, params)
    init_state(params) -> state
    apply(params, x, *, state=None, train=False, key=None, reference=False) -> y           (state None)
                                                                          -> (y, new_state)  (state given)

``input_shape`` includes the batch axis (any size, ``-1`` allowed); ``params`` is a plain
pytree (dicts of arrays, lists, empty tuples) that ``jax.grad`` differentiates and any optax
optimizer takes unchanged. ``state`` is a second pytree of the same layout holding what a
layer updates while training but does not learn by gradient — :func:`BatchNorm`'s running
mean and variance, ``{"mean", "var"}``; ``()`` for every other layer — kept apart from
``params`` so that neither the gradient nor the optimizer ever sees it. ``train=True`` is
training mode (batch statistics, and with ``state`` given their running averages updated;
dropout masks drawn from ``key``; :func:`serial` hands layer ``i`` the key
``jax.random.fold_in(key, i)``), ``train=False`` evaluation (running statistics, no dropout,
no key needed). A layer without state ignores ``train`` and ``key`` and returns the ``state``
it was given.

``apply`` calls only registered rules (:mod:`manualgrad.registry`), so ``jax.grad`` of a model
chains the hand-written backward rules; with ``reference=True`` it calls the same rules'
plain-``jnp`` references instead, and ``jax.grad`` is JAX's own autodiff of the same model.
The one exception, :func:`BatchNorm` in evaluation mode, is a ``jnp`` expression (its
docstring says why). Conventions: batch first, ``x @ W + b`` with ``W`` of shape
``(in, out)``, NHWC images and HWIO kernels, channels last for the norms, He-normal weights and
zero biases (:func:`he_normal`, the one initialisation), norms starting at ``γ = 1``, ``β = 0``.

:func:`Dense`, :func:`Conv2D` and :func:`BatchNorm` layers are also seed 002 §4's layer ``k``,
``a_k = C_k(F_{k−1}, W_k) + ι_k(b_k)``, ``F_k = σ_k(a_k)``, and carry what
:mod:`manualgrad.nn.backprop` (Algorithms 1 and 2) needs to run it by hand: the map ``C_k``,
the activation ``σ_k``, the convolution's geometry and batch norm's ``ε``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad import registry
from manualgrad.errors import ManualgradError
from manualgrad.rules.windows import Padding

Shape = tuple[int, ...]


class LayerError(ManualgradError, ValueError):
    """A layer built with, or applied to, arguments it cannot use; the message names the layer."""


def _no_state(params: Any) -> tuple:
    del params
    return ()


class Layer(NamedTuple):
    """``init``, ``apply`` and ``init_state`` (the protocol in the module docstring), and seed 002's description.

    Attributes:
      init, apply: stax's pair, ``apply`` with the keywords ``state``, ``train``, ``key``, ``reference``.
      map: the registered rule of the layer's map. For the layers Algorithms 1 and 2 run, ``C_k``
        of seed 002 §4: ``"dense"`` (``W`` of shape ``(in, out)``; an image input is flattened
        first), ``"conv2d"`` (NHWC input, HWIO ``W``, one bias per output channel) or
        ``"batch_norm"`` (``C_k(F, γ) = γ ⊙ x̂(F)``, ``β`` as the bias); also ``"layer_norm"``,
        ``"group_norm"``, ``"rms_norm"`` for those layers; ``None`` for every other layer.
      activation: ``σ_k``, the name of a registered activation rule, applied after the bias.
      stride, padding, dilation: the convolution's geometry (``"conv2d"`` only).
      bias: whether a ``Dense`` or ``Conv2D`` adds ``ι_k(b_k)``; Algorithms 1 and 2 need it to.
      eps: batch norm's ``ε`` (``"batch_norm"`` only).
      init_state: ``params -> state``; ``()`` for a layer without state.
      layers: :func:`serial`'s layers, in order; ``()`` for a single layer.
    """

    init: Callable[[jax.Array, Shape], tuple[Shape, Any]]
    apply: Callable[..., Any]
    map: str | None = None
    activation: str = "identity"
    stride: int | Sequence[int] = 1
    padding: Padding = "VALID"
    dilation: int | Sequence[int] = 1
    bias: bool = True
    eps: float = 1e-5
    init_state: Callable[[Any], Any] = _no_state
    layers: tuple[Layer, ...] = ()


def _rule(name: str, reference: bool) -> Callable[..., jax.Array]:
    rule = registry.get(name)
    return rule.reference if reference else rule.fn


def _stateless(forward: Callable[[Any, jax.Array, bool], jax.Array]) -> Callable[..., Any]:
    """The protocol's ``apply`` for a layer without state whose output is ``forward(params, x, reference)``."""

    def apply(params, x, *, state=None, train=False, key=None, reference=False):
        del train, key
        y = forward(params, x, reference)
        return y if state is None else (y, state)

    return apply


def _output_shape(apply: Callable, params: Any, input_shape: Shape, dtype: Any) -> Shape:
    concrete = tuple(1 if d < 0 else d for d in input_shape)
    out = jax.eval_shape(lambda p, x: apply(p, x), params, jax.ShapeDtypeStruct(concrete, dtype)).shape
    return (input_shape[0], *out[1:])


def he_normal(key: jax.Array, shape: Shape, dtype: Any, bias: bool = True) -> dict[str, jax.Array]:
    """``{"w": W, "b": b}``: ``W ~ N(0, 2 / fan_in)`` (He; fan-in: every axis of ``shape`` but the
    last) and ``b = 0``, one bias per output feature (the last axis); ``{"w": W}`` without ``bias``."""
    fan_in = int(np.prod(shape[:-1]))
    w = jax.random.normal(key, shape, dtype) * (2.0 / fan_in) ** 0.5
    return {"w": w, "b": jnp.zeros(shape[-1:], dtype)} if bias else {"w": w}


def _plus_bias(y: jax.Array, params: Any, reference: bool) -> jax.Array:
    return _rule("bias_add", reference)(y, params["b"]) if "b" in params else y


def _with_weights(weight_shape: Callable[[Shape], Shape], apply: Callable, dtype: Any, **spec: Any) -> Layer:
    """A layer with :func:`he_normal` params; ``spec`` is its seed 002 description (:class:`Layer`)."""

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        params = he_normal(key, weight_shape(input_shape), dtype, spec.get("bias", True))
        return _output_shape(apply, params, input_shape, dtype), params

    return Layer(init, apply, **spec)


def _parameterless(apply: Callable) -> Layer:
    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        del key
        return _output_shape(apply, (), input_shape, jnp.float32), ()

    return Layer(init, apply)


def Dense(  # noqa: N802 — stax names
    out: int, activation: str = "identity", dtype: Any = jnp.float32, bias: bool = True
) -> Layer:
    """``σ(x W + b)`` (rules ``dense``, ``bias_add`` and ``activation``; ``σ(x W)`` without ``bias``);
    ``x`` of shape ``(N, in)``, or ``(N, …)`` flattened first (rule ``flatten``)."""

    def forward(params, x, reference):
        if jnp.ndim(x) > 2:
            x = _rule("flatten", reference)(x)
        return _rule(activation, reference)(_plus_bias(_rule("dense", reference)(x, params["w"]), params, reference))

    return _with_weights(
        lambda s: (int(np.prod(s[1:])), out),
        _stateless(forward),
        dtype,
        map="dense",
        activation=activation,
        bias=bias,
    )


def Conv2D(
    features: int,
    kernel: Sequence[int] = (3, 3),
    stride: int | Sequence[int] = 1,  # noqa: N802
    padding: Padding = "VALID",
    dilation: int | Sequence[int] = 1,
    activation: str = "identity",
    dtype: Any = jnp.float32,
    bias: bool = True,
) -> Layer:
    """``σ(conv(x, W) + b)``: NHWC convolution with an HWIO kernel, one bias per output channel
    (none without ``bias``), then ``activation`` (rules ``conv2d``, ``bias_add`` and ``activation``)."""

    def forward(params, x, reference):
        y = _rule("conv2d", reference)(x, params["w"], stride, padding, dilation)
        return _rule(activation, reference)(_plus_bias(y, params, reference))

    return _with_weights(
        lambda s: (*tuple(kernel), s[-1], features),
        _stateless(forward),
        dtype,
        map="conv2d",
        activation=activation,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
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

    def forward(params, x, reference):
        y = _rule("conv1d", reference)(x, params["w"], stride, padding, dilation)
        return _rule("bias_add", reference)(y, params["b"])

    return _with_weights(lambda s: (kernel, s[-1], features), _stateless(forward), dtype)


def _elementwise(name: str, *extra: Any) -> Layer:
    return _parameterless(_stateless(lambda params, x, reference: _rule(name, reference)(x, *extra)))


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


# --------------------------------------------------------------------------- normalisation and dropout


def _scale_and_shift(dtype: Any, shift: bool = True, check: Callable[[Shape], None] | None = None) -> Callable:
    """``init`` of a norm: output shape = input shape, ``γ = 1`` (and ``β = 0``) per channel (the last axis)."""

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        del key
        if check is not None:
            check(input_shape)
        channels = tuple(input_shape[-1:])
        params = {"gamma": jnp.ones(channels, dtype)}
        return input_shape, ({**params, "beta": jnp.zeros(channels, dtype)} if shift else params)

    return init


def _channels_last(v: jax.Array, ndim: int) -> jax.Array:
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def _running_statistics(
    state: dict[str, jax.Array], x: jax.Array, momentum: float, axis_name: str | None = None
) -> dict[str, jax.Array]:
    """``mean ← momentum·mean + (1 − momentum)·μ_B`` and ``var ← momentum·var + (1 − momentum)·v_B·m/(m − 1)``,
    the batch's statistics over every device along ``axis_name`` where it is given (``m`` all their entries)."""
    axes = tuple(range(jnp.ndim(x) - 1))
    if axis_name is None:
        batch = {"mean": jnp.mean(x, axis=axes), "var": jnp.var(x, axis=axes, ddof=1)}
    else:
        m = math.prod(jnp.shape(x)[:-1]) * lax.axis_size(axis_name)
        mean = lax.pmean(jnp.mean(x, axis=axes), axis_name)
        biased = lax.pmean(jnp.mean((x - _channels_last(mean, jnp.ndim(x))) ** 2, axis=axes), axis_name)
        batch = {"mean": mean, "var": biased * m / (m - 1)}
    return {k: (momentum * state[k] + (1 - momentum) * batch[k]).astype(state[k].dtype) for k in ("mean", "var")}


def _with_running_statistics(x: jax.Array, gamma: jax.Array, beta: jax.Array, state: Any, eps: float) -> jax.Array:
    """``γ (x − mean)/√(var + ε) + β`` per channel, the running statistics held constant."""
    if state is None:
        raise LayerError(
            "BatchNorm: evaluation (train=False) normalises with the running statistics: pass "
            "state=model.init_state(params) (or the state training returned), or train=True for the batch's"
        )
    if jnp.shape(x)[-1:] != jnp.shape(gamma):
        raise LayerError(
            f"BatchNorm: x must have {jnp.shape(gamma)[0]} channels (its last axis), as the layer was "
            f"initialised for, got shape {jnp.shape(x)}"
        )
    n = jnp.ndim(x)
    scale = _channels_last(gamma * lax.rsqrt(state["var"] + eps), n)
    return (x - _channels_last(state["mean"], n)) * scale + _channels_last(beta, n)


def BatchNorm(  # noqa: N802
    momentum: float = 0.9,
    eps: float = 1e-5,
    activation: str = "identity",
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
) -> Layer:
    """Batch normalisation with running statistics, channels last, then ``activation``.

    Training (``train=True``): ``y = σ(γ x̂ + β)``, ``x̂ = (x − μ_B)/√(v_B + ε)`` with the batch's
    statistics per channel over every axis but the last (rule ``batch_norm``, biased ``v_B``).
    With ``state`` given, the running statistics move towards the batch's as PyTorch's do
    (``momentum`` here is the fraction kept, PyTorch's ``1 − momentum``: 0.9 is its 0.1), with
    the unbiased variance over the ``m`` entries of a channel:

        mean ← momentum·mean + (1 − momentum)·μ_B
        var  ← momentum·var  + (1 − momentum)·v_B·m/(m − 1)

    computed from ``lax.stop_gradient(x)``: bookkeeping that no gradient flows through, so it is
    a ``jnp`` expression and not a rule. State: ``{"mean": 0, "var": 1}`` per channel at first.

    Evaluation (``train=False``, ``state`` required): ``y = σ(γ (x − mean)/√(var + ε) + β)``, the
    running statistics constants. This affine map ``x ↦ s ⊙ x + t`` is one plain ``jnp``
    expression, not a registered rule: manualgrad never differentiates evaluation (training
    runs in training mode), no registered rule scales per channel, and were it differentiated,
    JAX's autodiff of it is exactly its adjoint ``dx = s ⊙ G``, ``s = γ/√(var + ε)``.

    ``axis_name`` (inside ``jax.shard_map``, the batch split over that mesh axis): the batch's
    statistics, and the running ones, span every device's block (PyTorch's ``SyncBatchNorm``;
    rule ``sync_batch_norm``, whose backward all-reduces the statistics' cotangents). ``None``:
    each call's own batch, the rule ``batch_norm``.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
        raise LayerError(f"BatchNorm: momentum must be a number in [0, 1] (the fraction kept), got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise LayerError(f"BatchNorm: eps must be a number > 0 (evaluation divides by √(var + ε)), got {eps!r}")

    def apply(params, x, *, state=None, train=False, key=None, reference=False):
        del key
        gamma, beta = params["gamma"], params["beta"]
        if train:
            if axis_name is None:
                y = _rule("batch_norm", reference)(x, gamma, beta, eps)
            else:
                y = _rule("sync_batch_norm", reference)(x, gamma, beta, eps, axis_name)
            new_state = None if state is None else _running_statistics(state, lax.stop_gradient(x), momentum, axis_name)
        else:
            y, new_state = _with_running_statistics(x, gamma, beta, state, eps), state
        y = _rule(activation, reference)(y)
        return y if state is None else (y, new_state)

    def init_state(params: Any) -> dict[str, jax.Array]:
        return {"mean": jnp.zeros_like(params["gamma"]), "var": jnp.ones_like(params["gamma"])}

    rule = "batch_norm" if axis_name is None else "sync_batch_norm"
    return Layer(_scale_and_shift(dtype), apply, map=rule, activation=activation, eps=eps, init_state=init_state)


def LayerNorm(eps: float = 1e-5, dtype: Any = jnp.float32) -> Layer:  # noqa: N802
    """``γ ⊙ x̂ + β`` with each row's (each sample's, each pixel's) statistics over the last axis (rule
    ``layer_norm``); the same in training and evaluation."""

    def forward(params, x, reference):
        return _rule("layer_norm", reference)(x, params["gamma"], params["beta"], eps)

    return Layer(_scale_and_shift(dtype), _stateless(forward), map="layer_norm")


def GroupNorm(groups: int, eps: float = 1e-5, dtype: Any = jnp.float32) -> Layer:  # noqa: N802
    """``γ ⊙ x̂ + β`` with statistics per sample and group of ``C/groups`` contiguous channels (rule
    ``group_norm``); ``groups`` must divide the input's channels."""

    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise LayerError(f"GroupNorm: groups must be a positive int, got {groups!r}")

    def check(input_shape: Shape) -> None:
        if input_shape[-1] % groups:
            raise LayerError(
                f"GroupNorm: groups {groups} must divide the {input_shape[-1]} channels of its input "
                f"(shape {tuple(input_shape)})"
            )

    def forward(params, x, reference):
        return _rule("group_norm", reference)(x, params["gamma"], params["beta"], groups, eps)

    return Layer(_scale_and_shift(dtype, check=check), _stateless(forward), map="group_norm")


def RMSNorm(eps: float = 1e-6, dtype: Any = jnp.float32) -> Layer:  # noqa: N802
    """``γ ⊙ x / √(mean(x²) + ε)`` over the last axis, no ``β`` (rule ``rms_norm``)."""

    def forward(params, x, reference):
        return _rule("rms_norm", reference)(x, params["gamma"], eps)

    return Layer(_scale_and_shift(dtype, shift=False), _stateless(forward), map="rms_norm")


def Dropout(rate: float) -> Layer:  # noqa: N802
    """Inverted dropout in training (rule ``dropout``: kept entries scaled by ``1/(1 − rate)``, the
    mask drawn from ``key``), the identity in evaluation. ``rate`` in ``[0, 1)``."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise LayerError(
            f"Dropout: rate must be a number in [0, 1), the probability of dropping an entry, got {rate!r}"
        )

    def apply(params, x, *, state=None, train=False, key=None, reference=False):
        del params
        if train and rate > 0:
            if key is None:
                raise LayerError("Dropout: training (train=True) draws a mask: pass key=, a PRNG key")
            x = _rule("dropout", reference)(x, key, float(rate))
        return x if state is None else (x, state)

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        del key
        return input_shape, ()

    return Layer(init, apply)


# --------------------------------------------------------------------------- models


def serial(*layers: Layer) -> Layer:
    """The layers one after the other; ``params`` and ``state`` are the lists of the layers' own."""

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        params = []
        for layer, k in zip(layers, jax.random.split(key, len(layers))):
            input_shape, p = layer.init(k, input_shape)
            params.append(p)
        return input_shape, params

    def init_state(params: Any) -> list:
        return [layer.init_state(p) for layer, p in zip(layers, params)]

    def apply(params, x, *, state=None, train=False, key=None, reference=False):
        if state is not None and len(state) != len(layers):
            raise LayerError(f"serial: state must hold one entry per layer: {len(layers)} layers, got {len(state)}")
        states = [None] * len(layers) if state is None else state
        new_states = []
        for i, (layer, p, s) in enumerate(zip(layers, params, states)):
            k = None if key is None else jax.random.fold_in(key, i)
            out = layer.apply(p, x, state=s, train=train, key=k, reference=reference)
            x, s = (out, None) if state is None else out
            new_states.append(s)
        return x if state is None else (x, new_states)

    return Layer(init, apply, init_state=init_state, layers=layers)


def _hidden(linear: Callable[..., Layer], norm: Layer | None, dropout: float) -> list[Layer]:
    """``linear → norm → ReLU → dropout``, leaving out the norm if ``None`` and dropout at rate 0.

    Batch norm subtracts each channel's batch mean, so a bias before it cancels (its gradient
    is 0 up to round-off): before a ``BatchNorm`` the linear layer has none, its ``β`` is the bias.
    """
    bias = norm is None or norm.map != "batch_norm"
    return [linear(bias=bias), *([norm] if norm is not None else []), Relu, *([Dropout(dropout)] if dropout else [])]


def mlp(
    classes: int,
    hidden: Sequence[int] = (128,),
    dtype: Any = jnp.float32,
    norm: Layer | None = None,
    dropout: float = 0.0,
) -> Layer:
    """Flatten, then ``Dense → [norm] → ReLU → [Dropout(dropout)]`` per hidden width, then ``Dense(classes)``
    (logits). ``norm`` is a layer such as ``BatchNorm()``, put after every hidden ``Dense``."""
    body = [layer for width in hidden for layer in _hidden(functools.partial(Dense, width, dtype=dtype), norm, dropout)]
    return serial(Flatten, *body, Dense(classes, dtype=dtype))


def cnn(
    classes: int,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    dtype: Any = jnp.float32,
    norm: Layer | None = None,
    dropout: float = 0.0,
) -> Layer:
    """``Conv 3×3 → [norm] → ReLU`` (then stride 2 for each further width), flatten,
    ``Dense → [norm] → ReLU → [Dropout(dropout)]``, ``Dense(classes)``: ``norm`` after every
    convolution and the hidden ``Dense``, dropout on the dense hidden layer only."""
    convs = [
        layer
        for i, c in enumerate(channels)
        for layer in _hidden(functools.partial(Conv2D, c, (3, 3), 1 if i == 0 else 2, "SAME", dtype=dtype), norm, 0.0)
    ]
    head = _hidden(functools.partial(Dense, hidden, dtype=dtype), norm, dropout)
    return serial(*convs, Flatten, *head, Dense(classes, dtype=dtype))


def classifier_loss(
    model: Layer,
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    *,
    state: Any = None,
    train: bool = False,
    key: jax.Array | None = None,
    reference: bool = False,
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Any]:
    """Mean softmax cross-entropy of ``model`` on ``(x, labels)`` and the number of correct
    predictions; with ``state`` given also the model's new state (``model.apply``'s keywords)."""
    out = model.apply(params, x, state=state, train=train, key=key, reference=reference)
    logits, new_state = (out, None) if state is None else out
    loss = _rule("softmax_cross_entropy", reference)(logits, labels)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return (loss, correct) if state is None else (loss, correct, new_state)
