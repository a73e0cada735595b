"""What reverse mode keeps and what a compiled program holds (Remark 8): the memory figures of
``manualgrad bench`` and of ``comparisons/remark8_memory.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from manualgrad.bench.models import KEY, Model
from manualgrad.nn import backprop, layers
from manualgrad.rules.attention import attention, attention_reference

NORMS = ("batch_norm", "layer_norm", "group_norm", "rms_norm")  # the maps of the normalisation layers


def footprint(compiled: Any) -> int | None:
    """Compiled bytes: temporaries + arguments + outputs − aliased (donated) bytes; None where unreported."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )


def compiled_bytes(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()) -> int:
    """The compiled footprint of ``jax.jit(fn)(*args)``: temporaries + arguments + outputs − aliased bytes."""
    return footprint(jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile())


def residual_bytes(loss: Callable[..., Any], params: Any, *args: Any) -> int:
    """Bytes that reverse mode keeps between forward and backward for ``loss(params, *args)``.

    The residuals are the leaves of the function ``jax.vjp`` returns; leaves that are the
    arguments themselves cost nothing new and are not counted.
    """
    given = {id(leaf) for leaf in jax.tree_util.tree_leaves((params, args))}
    _, pullback = jax.vjp(lambda p: loss(p, *args), params)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(pullback) if id(leaf) not in given)


def norm_residual_bytes(net: layers.Layer, params: Any, x: jax.Array) -> dict[str, int] | None:
    """The residual bytes (:func:`residual_bytes`) of the normalisation layers of a :func:`~manualgrad.nn.layers.serial`
    ``net``, hand rules and ``jax.grad``: each layer's VJP in its input and params, taken alone at
    the activation it sees in training mode, summed; ``None`` for a model without such layers."""
    seen = []  # (layer, params, input) of each normalisation layer
    for layer, p in zip(net.layers, params):
        if layer.map in NORMS:
            seen.append((layer, p, x))
        x = layer.apply(p, x, train=True, key=KEY)
    if not seen:
        return None

    def alone(layer: layers.Layer, reference: bool) -> Callable[[Any], jax.Array]:
        return lambda args: layer.apply(args[1], args[0], train=True, reference=reference)

    return {
        side: sum(residual_bytes(alone(layer, side == "jax_grad"), (h, p)) for layer, p, h in seen)
        for side in ("manual", "jax_grad")
    }


def attention_residual_bytes(model: Model) -> dict[str, int] | None:
    """The residual bytes (:func:`residual_bytes`) of one causal ``attention`` of a sequence ``model`` alone, in
    ``q, k, v`` of its shape ``(batch, T, heads, width/heads)``, hand rule and ``jax.grad`` of the reference;
    ``None`` for a model without attention (``heads`` 0)."""
    if not model.heads:
        return None
    q, k, v = jax.random.normal(KEY, (3, *attention_shape(model)), jnp.float32)
    rules = {"manual": attention, "jax_grad": attention_reference}
    return {side: residual_bytes(lambda qkv, f=f: f(*qkv, True), (q, k, v)) for side, f in rules.items()}


def attention_shape(model: Model) -> tuple[int, int, int, int]:
    """``(batch, T, heads, width/heads)``: the shape of ``q``, ``k`` and ``v`` in each attention of a sequence ``model``
    with ``heads`` > 0."""
    params = jax.eval_shape(lambda: model.build().init(KEY, (model.batch, *model.input_shape))[1])
    width = params["blocks"][0]["q"]["w"].shape[0]
    return (model.batch, *model.input_shape, model.heads, width // model.heads)


def attention_peak_bytes(shape: tuple[int, int, int, int]) -> dict[str, int | None]:
    """The bytes one causal ``attention`` of ``q, k, v`` of ``shape`` allocates beyond its arguments, hand rule
    and ``jax.grad`` of the reference: the compiled program ``(q, k, v, G) ↦ (dq, dk, dv)`` (forward and
    backward, float32), its temporaries and outputs (the peak XLA plans for); None where unreported."""
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    rules = {"manual": attention, "jax_grad": attention_reference}
    out: dict[str, int | None] = {}
    for side, f in rules.items():
        pullback = lambda q, k, v, g, f=f: jax.vjp(lambda *qkv: f(*qkv, True), q, k, v)[1](g)  # noqa: E731
        memory = jax.jit(pullback).lower(spec, spec, spec, spec).compile().memory_analysis()
        out[side] = None if memory is None else int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
    return out


def backprop_memory(widths: tuple[int, ...] = (784, 1024, 1024, 10), batch: int = 256, seed: int = 0) -> dict[str, Any]:
    """Remark 8's storage choices for Algorithm 1 on a ReLU MLP, against ``jax.grad`` (float32).

    For each ``store`` of :func:`manualgrad.nn.backprop.gradients`: the bytes its tape keeps
    and the compiled footprint of the jitted algorithm; for ``jax.grad`` of the custom_vjp
    composition and of the references: the residual bytes and the compiled footprint.
    """
    network = [layers.Dense(w, "relu") for w in widths[1:-1]] + [layers.Dense(widths[-1])]
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = backprop.init(kp, network, widths[:1], jnp.float32)
    x = jax.random.normal(kx, (batch, widths[0]), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, widths[-1])
    loss = "softmax_cross_entropy"
    result: dict[str, Any] = {"network": f"MLP {'-'.join(map(str, widths))} ReLU, batch {batch}, float32"}
    for store in backprop.STORES:
        result[f"algorithm_{store}_tape_bytes"] = backprop.stored_bytes(network, params, x, store)
        result[f"algorithm_{store}_compiled_bytes"] = compiled_bytes(
            lambda p, x, y, store=store: backprop.gradients(network, p, x, y, loss, store), params, x, labels
        )
    for name, reference in (("custom_vjp", False), ("jax_grad", True)):
        fn = lambda p, x, y, reference=reference: backprop.loss(network, p, x, y, loss, reference=reference)  # noqa: E731
        result[f"{name}_residual_bytes"] = residual_bytes(fn, params, x, labels)
        result[f"{name}_compiled_bytes"] = compiled_bytes(jax.value_and_grad(fn), params, x, labels)
    return result
