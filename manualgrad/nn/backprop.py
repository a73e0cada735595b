"""Whole-network backprop: seed 002's Algorithms 1 and 2, written out, with no JAX autodiff.

The custom_vjp rules are backprop one layer at a time, and JAX chains them. Seed 002 also
gives backprop for a whole network as one explicit algorithm. A network here is a sequence
of :class:`~manualgrad.nn.layers.Layer` s built by ``Dense`` and ``Conv2D`` (which carry ``C_k``,
``σ_k`` and the geometry), layer ``k`` being seed 002 §4's

    a_k = C_k(σ_{k−1}(a_{k−1}), W_k) + ι_k(b_k),     a_0 = x,  σ_0 = id,

with ``C_k`` bilinear (``"dense"``: ``x W``; ``"conv2d"``: a multi-channel convolution) or
batch norm's ``C_k(F, γ) = γ ⊙ x̂(F)`` (``"batch_norm"``: linear in ``γ``, not in ``F``; ``β`` is
its bias) and ``ι_k`` the bias map (one bias per output feature, or per channel for images).
:func:`gradients` runs the forward pass and then the backward recursion of Algorithm 2
(Theorem 10), in seed 004's batched row form:

    T   ← σ'_n(a_n) ⊙ L(y, σ_n(a_n))                 L: the loss's derivative
    for k = n, …, 1:
        g_k ← ι*_k(T)                                 bias gradient, ``1ᵀ T``
        G_k ← C††_k(σ_{k−1}(a_{k−1}), T)              weight gradient
        T   ← C†_k(T, W_k) ⊙ σ'_{k−1}(a_{k−1})        (for k > 1)

With every ``C_k`` dense this is Algorithm 1 (Theorem 7): ``C†(T, W) = T Wᵀ`` and
``C††(O, T) = Oᵀ T`` are seed 002's ``W_{k+1}ᵀ g_{k+1}`` and ``g_k σ(a_{k−1})ᵀ``, transposed
into rows. For batch norm, ``C††(F, T) = Σ T ⊙ x̂`` and ``C†(T, γ) = (γ/(m σ))(m T − Σ T − x̂ Σ(T ⊙ x̂))``
(the rule's closed form, its two sums being ``g_k`` and ``G_k``): its adjoint in the input
needs ``x̂`` and ``1/σ``, which the backward pass recomputes from ``F_{k−1}`` (already on the
tape for ``G_k``) rather than storing them. ``C``, ``C†``, ``C††``, ``ι``, ``ι*`` and ``σ'``
are the rules' own forward, backward and gradient functions (:mod:`manualgrad.rules.linear`,
:mod:`manualgrad.rules.convolution`, :mod:`manualgrad.rules.normalization`,
:mod:`manualgrad.rules.activations`, :mod:`manualgrad.rules.losses`): nothing is derived twice.

What the forward pass stores for the backward pass is Remark 8's choice (``store=``):

``"a_and_F"``  Algorithm 1 as printed: keep ``a_k`` for ``σ'(a_k)`` and ``F_k = σ(a_k)`` for
               ``G_{k+1}`` — two arrays per layer, nothing recomputed.
``"a"``        Remark 8, first point: keep only ``a_k`` and recompute ``σ(a_k)`` in the backward
               pass — one array per layer, one extra ``σ`` per layer.
``"F"``        Remark 8, second point: keep only ``F_k``; ReLU, sigmoid, tanh (and softplus,
               leaky ReLU, identity) have ``σ'`` as a function of ``F``: ``1_{F>0}``,
               ``F(1 − F)``, ``1 − F²`` — one array per layer and nothing recomputed.

:func:`stored_bytes` counts what each choice keeps; ``comparisons/remark8_memory.py`` also
measures the compiled programs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import registry
from manualgrad.nn.layers import Layer, serial
from manualgrad.rules import convolution, linear, losses, normalization, pooling
from manualgrad.validation import RuleInputError

Store = Literal["a_and_F", "a", "F"]
STORES: tuple[Store, ...] = ("a_and_F", "a", "F")
MAPS = ("dense", "conv2d", "batch_norm")
_PARAMS = {"batch_norm": ("gamma", "beta")}  # the (W_k, b_k) pair's names in a layer's params; else ("w", "b")
Params = list[tuple[jax.Array, jax.Array]]
Gradients = list[tuple[jax.Array, jax.Array]]


def _residual_from_output(fn: Callable, args: tuple) -> Callable | None:
    """``F ↦ residual`` when the custom_vjp ``fn`` keeps only its output ``F`` (or nothing), else ``None``."""
    kept = []

    def probe(z):
        f, residual = fn.fwd(z, *args)
        kept.append((lambda f: f) if residual is f else (lambda f: ()) if residual == () else None)
        return f

    try:
        jax.eval_shape(probe, jax.ShapeDtypeStruct((2,), jnp.float32))
    except (RuleInputError, TypeError, ValueError, IndexError):
        return None
    return kept[0]


def _defaults(fn: Callable) -> tuple | None:
    """The defaults of the rule's arguments after the first (leaky ReLU's slope); ``None`` if one has none."""
    defaults = tuple(p.default for p in list(inspect.signature(fn.fwd).parameters.values())[1:])
    return None if inspect.Parameter.empty in defaults else defaults


def _sigmas() -> dict[str, tuple[Callable, Callable]]:
    """σ ↦ (forward ``a ↦ F``, backward ``(F, T) ↦ σ'(a) ⊙ T``), both the registered rule's own.

    The activations are the registered rules of one differentiable argument (the others, Python
    numbers, take the rule's defaults) whose custom_vjp keeps only ``F`` or nothing: for them the
    rule's own backward, fed ``F``, is Remark 8's ``σ'`` as a function of ``F``. A rule registered
    later joins the table.
    """
    return _activation_table(registry.rules())


@functools.cache
def _activation_table(rules: tuple[registry.Rule, ...]) -> dict[str, tuple[Callable, Callable]]:
    table = {}
    for rule in rules:
        fn = rule.fn
        args = _defaults(fn) if rule.differentiable == (0,) else None
        if args is None or len(args) != len(fn.nondiff_argnums):
            continue
        residual = _residual_from_output(fn, args)
        if residual is not None:
            table[rule.name] = (
                lambda a, fn=fn, args=args: fn.fwd(a, *args)[0],
                lambda f, t, fn=fn, args=args, residual=residual: fn.bwd(*args, residual(f), t)[0],
            )
    return table


# ℓ ↦ (forward (F_n, y) ↦ (loss, residuals), derivative residuals ↦ L), the loss rules' own.
_LOSSES: dict[str, tuple[Callable, Callable]] = {
    "mse": (losses.mse_forward, lambda r: losses.mse_backward(r, jnp.ones((), r.dtype))[0]),
    "softmax_cross_entropy": (
        losses.softmax_cross_entropy_forward,
        lambda res: losses.softmax_cross_entropy_backward(*res, jnp.ones((), res[0].dtype))[0],
    ),
}


def _flat(x: jax.Array) -> jax.Array:
    return pooling.flatten_forward(x)[0] if jnp.ndim(x) > 2 else x


def _conv_geometry(layer: Layer, x: jax.Array, w: jax.Array):
    return convolution.geometry("conv2d", jnp.shape(x), jnp.shape(w), layer.stride, layer.padding, layer.dilation)


def _normalized(layer: Layer, x: jax.Array, gamma: jax.Array) -> tuple[jax.Array, tuple]:
    """Batch norm's ``γ ⊙ x̂`` (``β = 0``: the bias is added apart) and the rule's residuals ``(x̂, 1/σ, γ)``."""
    return normalization.batch_norm_forward(x, gamma, jnp.zeros_like(gamma), layer.eps)


def _c(layer: Layer, x: jax.Array, w: jax.Array) -> jax.Array:
    """``C_k(x, W)``."""
    if layer.map == "dense":
        return linear.dense_forward(_flat(x), w)[0]
    if layer.map == "batch_norm":
        return _normalized(layer, x, w)[0]
    return convolution.conv2d_forward(x, w, layer.stride, layer.padding, layer.dilation)[0]


def _c_dagger(layer: Layer, t: jax.Array, w: jax.Array, x: jax.Array) -> jax.Array:
    """``C†_k(T, W)``: the adjoint in the input; ``x`` gives only the input's shape, except for
    batch norm, whose adjoint recomputes ``x̂`` and ``1/σ`` from it."""
    if layer.map == "dense":
        dx = linear.dense_backward(w, t)
        return pooling.flatten_backward(x[:0], dx) if jnp.ndim(x) > 2 else dx
    if layer.map == "batch_norm":
        xhat, inv, gamma = _normalized(layer, x, w)[1]
        return normalization.batch_norm_backward(xhat, inv, gamma, *normalization.batch_norm_gradient(xhat, t), t)
    return convolution.conv2d_backward(w, _conv_geometry(layer, x, w), t)


def _c_double_dagger(layer: Layer, x: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
    """``C††_k(x, T)``: the adjoint in the weights; ``w`` gives only their shape (batch norm: ``γ``)."""
    if layer.map == "dense":
        return linear.dense_gradient(_flat(x), t)
    if layer.map == "batch_norm":
        return normalization.batch_norm_gradient(_normalized(layer, x, w)[1][0], t)[0]
    return convolution.conv2d_gradient(x, _conv_geometry(layer, x, w), t)


def _validate_network(network: Sequence[Layer]) -> None:
    if not network or not all(isinstance(layer, Layer) for layer in network):
        raise RuleInputError(
            "backprop: network must be a non-empty sequence of layers.Layer (Dense, Conv2D or BatchNorm)"
        )
    for k, layer in enumerate(network, start=1):
        if layer.map not in MAPS or not layer.bias:
            raise RuleInputError(
                f"backprop: layer {k} has map {layer.map!r}{'' if layer.bias else ' without a bias'}; expected "
                "'dense', 'conv2d' or 'batch_norm' with a bias (a Dense, Conv2D or BatchNorm layer)"
            )
        if layer.activation not in _sigmas():
            raise RuleInputError(
                f"backprop: layer {k} has activation {layer.activation!r}; expected one of {', '.join(_sigmas())}"
            )


def _validate(network: Sequence[Layer], params: Params, store: str = "F", loss: str = "mse") -> None:
    _validate_network(network)
    if len(params) != len(network) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in params):
        raise RuleInputError(
            f"backprop: params must hold one (W, b) pair per layer: {len(network)} layers, got {len(params)} entries"
        )
    if store not in STORES:
        raise RuleInputError(f"backprop: store must be one of {', '.join(STORES)}, got {store!r}")
    if loss not in _LOSSES:
        raise RuleInputError(f"backprop: loss must be one of {', '.join(_LOSSES)}, got {loss!r}")


def forward(network: Sequence[Layer], params: Params, x: jax.Array, store: Store = "F") -> tuple[jax.Array, list]:
    """The forward pass: the output ``F_n`` and the tape that ``store`` keeps for the backward pass.

    The tape has one entry per layer ``k = 0, …, n``: ``x`` for ``k = 0``, then ``(a_k, F_k)``,
    ``a_k`` or ``F_k`` (see the module docstring).
    """
    _validate(network, params, store)
    f = x
    tape: list = [x]
    for k, (layer, (w, b)) in enumerate(zip(network, params), start=1):
        try:
            a = linear.bias_add_forward(_c(layer, f, w), b)[0]
        except (RuleInputError, TypeError) as error:
            raise type(error)(f"backprop layer {k} ({layer.map}): {error}") from error
        f = _sigmas()[layer.activation][0](a)
        tape.append({"a_and_F": (a, f), "a": a, "F": f}[store])
    return f, tape


def _recorded(network: Sequence[Layer], tape: list, store: Store, k: int) -> tuple[jax.Array, Callable]:
    """``F_k`` and ``T ↦ σ'_k(a_k) ⊙ T`` from the tape, for ``k ≥ 1``."""
    sigma, sigma_backward = _sigmas()[network[k - 1].activation]
    if store == "F":
        f = tape[k]
        return f, lambda t: sigma_backward(f, t)
    a = tape[k][0] if store == "a_and_F" else tape[k]
    f = tape[k][1] if store == "a_and_F" else sigma(a)
    # Algorithm 1 evaluates σ'(a_k) from a_k: recompute σ(a_k) for it, so F_k only feeds G_{k+1}.
    return f, lambda t: sigma_backward(sigma(a), t)


def backward(network: Sequence[Layer], params: Params, tape: list, dl: jax.Array, store: Store = "F") -> Gradients:
    """The backward recursion of Algorithm 2 from ``L = dl``, the loss's derivative in ``F_n``.

    Returns ``[(G_1, g_1), …, (G_n, g_n)]``, the same structure as ``params``.
    """
    n = len(network)
    f_n, sigma_prime = _recorded(network, tape, store, n)
    t = sigma_prime(dl)
    grads: Gradients = [None] * n  # type: ignore[list-item]
    for k in range(n, 0, -1):
        layer, (w, _) = network[k - 1], params[k - 1]
        f_prev, sigma_prime_prev = (tape[0], None) if k == 1 else _recorded(network, tape, store, k - 1)
        grads[k - 1] = (_c_double_dagger(layer, f_prev, t, w), linear.bias_add_gradient(t))
        if k > 1:
            t = sigma_prime_prev(_c_dagger(layer, t, w, f_prev))
    return grads


def gradients(
    network: Sequence[Layer],
    params: Params,
    x: jax.Array,
    y: jax.Array,
    loss: str = "mse",
    store: Store = "F",
) -> tuple[jax.Array, Gradients]:
    """Seed 002's Algorithm 2 (Algorithm 1 for dense networks): the loss and every ``(G_k, g_k)``.

    Args:
      network: the layers, e.g. ``[Dense(32, "relu"), Dense(10)]`` (:mod:`manualgrad.nn.layers`).
      params: ``[(W_1, b_1), …, (W_n, b_n)]``, a plain pytree (see :func:`init`).
      x: the batch, ``(m, d_0)`` or NHWC images.
      y: the targets: an array shaped like the output for ``"mse"``, class indices or
        probability rows for ``"softmax_cross_entropy"``.
      loss: ``"mse"`` (mean over the batch of ``½‖F_n − y‖²``) or ``"softmax_cross_entropy"``.
      store: Remark 8's storage choice, ``"F"`` (default), ``"a"`` or ``"a_and_F"``.

    Returns:
      ``(ℓ, [(G_1, g_1), …, (G_n, g_n)])``. Jits (the network is static; close over it).
      Under one ``jax.jit`` the choice of ``store`` does not bind XLA: it sees the whole
      program and keeps what it likes (on CPU, ``"F"`` and ``"a_and_F"`` compile to the same program).
      The tape is what :func:`forward` hands to :func:`backward` when they run as separate
      programs or eagerly; ``comparisons/remark8_memory.py`` measures both.
    """
    _validate(network, params, store, loss)
    loss_forward, loss_derivative = _LOSSES[loss]
    f_n, tape = forward(network, params, x, store)
    try:
        value, residuals = loss_forward(f_n, y)
    except (RuleInputError, TypeError) as error:
        raise type(error)(f"backprop loss: {error}") from error
    return value, backward(network, params, tape, loss_derivative(residuals), store)


def stored_bytes(network: Sequence[Layer], params: Params, x: jax.Array, store: Store = "F") -> int:
    """Bytes of the tape that ``store`` keeps between the forward and the backward pass.

    The input ``x = F_0`` is not counted: the caller holds it anyway.
    """
    tape = jax.eval_shape(lambda p, x: forward(network, p, x, store)[1][1:], params, x)
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tape))


def _names(layer: Layer) -> tuple[str, str]:
    return _PARAMS.get(layer.map, ("w", "b"))


def _network(network: Sequence[Layer], params: Params, x: jax.Array, reference: bool) -> jax.Array:
    """``F_n`` through the layers' own ``apply``, in training mode (batch norm: the batch's statistics)."""
    h = x
    for layer, pair in zip(network, params):
        h = layer.apply(dict(zip(_names(layer), pair)), h, train=True, reference=reference)
    return h


def output(network: Sequence[Layer], params: Params, x: jax.Array) -> jax.Array:
    """``F_n`` as a composition of the custom_vjp rules: ``jax.grad`` of it chains the hand rules."""
    _validate(network, params)
    return _network(network, params, x, reference=False)


def output_reference(network: Sequence[Layer], params: Params, x: jax.Array) -> jax.Array:
    """``F_n`` from the rules' plain-``jnp`` references: ``jax.grad`` of it is pure autodiff."""
    _validate(network, params)
    return _network(network, params, x, reference=True)


def loss(
    network: Sequence[Layer], params: Params, x: jax.Array, y: jax.Array, loss: str = "mse", *, reference: bool = False
) -> jax.Array:
    """``ℓ(y, F_n)`` through the custom_vjp rules, or through the references with ``reference=True``."""
    _validate(network, params, loss=loss)
    if reference:
        return registry.get(loss).reference(output_reference(network, params, x), y)
    return registry.get(loss).fn(output(network, params, x), y)


def init(key: jax.Array, network: Sequence[Layer], input_shape: Sequence[int], dtype: Any = None) -> Params:
    """``[(W_1, b_1), …, (W_n, b_n)]`` from the layers' own initialisation (:func:`~manualgrad.nn.layers.he_normal`:
    He-normal weights, zero biases; batch norm's ``(γ, β) = (1, 0)``), in ``dtype``.

    ``input_shape`` is one sample's shape, ``(d_0,)`` or ``(H, W, C)``. ``dtype`` defaults to JAX's
    default float (float64 when x64 is enabled), as for ``jax.random.normal``, so ``params`` match an
    input drawn the same way; the draws are made in each layer's own dtype.
    """
    _validate_network(network)
    dtype = jnp.result_type(float) if dtype is None else dtype
    _, params = serial(*network).init(key, (-1, *input_shape))
    return [tuple(jnp.asarray(p[name], dtype) for name in _names(layer)) for layer, p in zip(network, params)]
