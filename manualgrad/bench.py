"""Benchmarks: what do the hand rules cost against ``jax.grad`` of the same network in ``lax`` ops?

Only ratios of interleaved runs mean anything on a shared machine whose speed drifts, so each
contender is timed in turn, step after step, and the figure reported is the median of the
per-step ratios (hand rules first: ``ratio_manual_over_jax_grad``).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import manualgrad as mg
from manualgrad import backprop

_NHWC = ("NHWC", "HWIO", "NHWC")


def cnn_params(key: jax.Array, channels: int = 1, classes: int = 10, size: int = 28) -> dict[str, jax.Array]:
    """conv 3×3×32 → ReLU → conv 3×3×64 stride 2 → ReLU → flatten → dense, He-initialised."""
    k1, k2, k3 = jax.random.split(key, 3)
    side = (size - 2 - 3) // 2 + 1
    features = side * side * 64
    return {
        "w1": jax.random.normal(k1, (3, 3, channels, 32)) * (2 / (9 * channels)) ** 0.5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (3, 3, 32, 64)) * (2 / (9 * 32)) ** 0.5,
        "b2": jnp.zeros(64),
        "w3": jax.random.normal(k3, (features, classes)) * (1 / features) ** 0.5,
        "b3": jnp.zeros(classes),
    }


def cnn_loss_manual(params, x, labels):
    """The CNN built from manualgrad's rules: every gradient comes from a hand rule."""
    h = mg.relu(mg.bias_add(mg.conv2d(x, params["w1"]), params["b1"]))
    h = mg.relu(mg.bias_add(mg.conv2d(h, params["w2"], 2), params["b2"]))
    logits = mg.bias_add(mg.dense(mg.flatten(h), params["w3"]), params["b3"])
    return mg.softmax_cross_entropy(logits, labels)


def cnn_loss_lax(params, x, labels):
    """The same CNN in plain ``lax``/``jnp``, for ``jax.grad``."""
    h = lax.conv_general_dilated(x, params["w1"], (1, 1), "VALID", dimension_numbers=_NHWC)
    h = jax.nn.relu(h + params["b1"][None, None, None, :])
    h = lax.conv_general_dilated(h, params["w2"], (2, 2), "VALID", dimension_numbers=_NHWC)
    h = jax.nn.relu(h + params["b2"][None, None, None, :])
    logits = h.reshape(h.shape[0], -1) @ params["w3"] + params["b3"][None, :]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, timed in turn ``repeats`` times after a warm-up."""
    for run in contenders.values():
        jax.block_until_ready(run())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return times


def cnn_gradient(batch: int = 128, repeats: int = 30, seed: int = 0) -> dict[str, Any]:
    """Jitted gradient of the 3-layer CNN on ``batch`` 28×28×1 images: hand rules vs ``jax.grad``."""
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = cnn_params(kp)
    x = jax.random.normal(kx, (batch, 28, 28, 1))
    labels = jax.random.randint(ky, (batch,), 0, 10)
    grads = {"manual": jax.jit(jax.grad(cnn_loss_manual)), "jax_grad": jax.jit(jax.grad(cnn_loss_lax))}
    compile_s = {}
    for name, fn in grads.items():
        start = time.perf_counter()
        grads[name] = fn.lower(params, x, labels).compile()
        compile_s[name] = time.perf_counter() - start
    times = interleaved({name: (lambda fn=fn: fn(params, x, labels)) for name, fn in grads.items()}, repeats)
    manual, reference = grads["manual"](params, x, labels), grads["jax_grad"](params, x, labels)
    difference = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(reference))
    )
    ratios = [m / a for m, a in zip(times["manual"], times["jax_grad"])]
    return {
        "benchmark": f"cnn_gradient batch {batch} 28x28x1 (conv3x3x32, conv3x3x64/2, dense)",
        "manual_ms": 1e3 * statistics.median(times["manual"]),
        "jax_grad_ms": 1e3 * statistics.median(times["jax_grad"]),
        "ratio_manual_over_jax_grad": statistics.median(ratios),
        "compile_s_manual": compile_s["manual"],
        "compile_s_jax_grad": compile_s["jax_grad"],
        "max_gradient_difference_relative": difference,
        "repeats": repeats,
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}",
    }


def compiled_bytes(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()) -> int:
    """The compiled footprint of ``jax.jit(fn)(*args)``: temporaries + arguments + outputs − aliased bytes."""
    memory = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile().memory_analysis()
    return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
               + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def residual_bytes(loss: Callable[..., Any], params: Any, *args: Any) -> int:
    """Bytes that reverse mode keeps between forward and backward for ``loss(params, *args)``.

    The residuals are the leaves of the function ``jax.vjp`` returns; leaves that are the
    arguments themselves cost nothing new and are not counted.
    """
    given = {id(leaf) for leaf in jax.tree_util.tree_leaves((params, args))}
    _, pullback = jax.vjp(lambda p: loss(p, *args), params)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(pullback) if id(leaf) not in given)


def backprop_memory(widths: tuple[int, ...] = (784, 1024, 1024, 10), batch: int = 256, seed: int = 0) -> dict[str, Any]:
    """Remark 8's storage choices for Algorithm 1 on a ReLU MLP, against ``jax.grad`` (float32).

    For each ``store`` of :func:`manualgrad.backprop.gradients`: the bytes its tape keeps
    and the compiled footprint of the jitted algorithm; for ``jax.grad`` of the custom_vjp
    composition and of the references: the residual bytes and the compiled footprint.
    """
    network = [backprop.Layer("dense", "relu")] * (len(widths) - 2) + [backprop.Layer("dense")]
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = backprop.init(kp, network, widths[:1], widths[1:], jnp.float32)
    x = jax.random.normal(kx, (batch, widths[0]), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, widths[-1])
    loss = "softmax_cross_entropy"
    result: dict[str, Any] = {"network": f"MLP {'-'.join(map(str, widths))} ReLU, batch {batch}, float32"}
    for store in backprop.STORES:
        result[f"algorithm_{store}_tape_bytes"] = backprop.stored_bytes(network, params, x, store)
        result[f"algorithm_{store}_compiled_bytes"] = compiled_bytes(
            lambda p, x, y, store=store: backprop.gradients(network, p, x, y, loss, store), params, x, labels)
    for name, reference in (("custom_vjp", False), ("jax_grad", True)):
        fn = lambda p, x, y, reference=reference: backprop.loss(network, p, x, y, loss, reference=reference)  # noqa: E731
        result[f"{name}_residual_bytes"] = residual_bytes(fn, params, x, labels)
        result[f"{name}_compiled_bytes"] = compiled_bytes(jax.value_and_grad(fn), params, x, labels)
    return result
