"""Seed 004: batched backprop with row vectors, ``Z = O W + 1 b``, for a whole batch at once.

For ``m`` samples stacked as rows, layer ``l`` computes ``Z^l = O^{l−1} W^l + 1 b^l`` and
``O^l = f(Z^l)``, with ``O^0 = X``. Starting from ``G = ∇_{O^l} L`` (one row per sample) the
notes give

    G ← G ⊙ f'(Z^l)              undo the activation
    ∇_{W^l} L = O^{l−1}ᵀ G        (n^i × m)(m × n^o)
    ∇_{b^l} L = 1ᵀ G              the column sums
    ∇_{O^{l−1}} L = G W^lᵀ        the G of the layer below

and with regularisation ``∇_{W^l} J = O^{l−1}ᵀ G + λ ∇_{W^l} Ω(θ)``. (The notes' intermediate
lines write ``b_i`` for ``b_j`` in ``Z_ij`` and ``G_ij`` for ``∂Z_ij/∂b_k``; the final formulas,
checked here, are right.) Here: an MLP 3 → 4 → 2, sigmoid hidden layer, identity output, batch
m = 5, ``L`` = manualgrad's ``mse`` (the batch mean of ``½‖O² − Y‖²``, so the top ``G = (O² − Y)/m``),
and ``J = L + λ Ω(θ)`` with ``Ω(θ) = ½ Σ_l ‖W^l‖²`` as in manualgrad's ``l2_penalty`` (so
``∇_W Ω = W``). These are manualgrad's own conventions.

Run: ``python comparisons/seed_004.py``.
"""

from __future__ import annotations

import types

import jax
import numpy as np

import manualgrad as mg
from manualgrad import registry
from manualgrad.nn import backprop
from manualgrad.nn.layers import Dense
from manualgrad.teach import compare

jax.config.update("jax_enable_x64", True)

LAMBDA = 0.1
# The plain-jnp references of the rules, under the same names as manualgrad's rules (mg.dense, …).
REFERENCE = types.SimpleNamespace(
    **{name: registry.get(name).reference for name in ("dense", "bias_add", "sigmoid", "mse", "l2_penalty")}
)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def by_hand(params, x, y) -> dict[str, np.ndarray]:
    """The notes' formulas, layer by layer, in numpy."""
    (w1, b1), (w2, b2) = params
    m = len(x)
    ones = np.ones(m)
    z1 = x @ w1 + np.outer(ones, b1)  # Z¹ = O⁰ W¹ + 1 b¹
    o1 = sigmoid(z1)
    o2 = o1 @ w2 + np.outer(ones, b2)  # identity output: O² = Z²
    grads = {}
    g = (o2 - y) / m  # ∇_{O²} L for the batch mean of ½‖O² − Y‖²; G ⊙ f'(Z²) = G, as f' = 1
    grads["W2"], grads["b2"] = o1.T @ g, ones @ g
    g = g @ w2.T  # ∇_{O¹} L = G W²ᵀ
    grads["O1"] = g
    g = g * sigmoid(z1) * (1 - sigmoid(z1))  # G ← G ⊙ f'(Z¹)
    grads["W1"], grads["b1"] = x.T @ g, ones @ g
    grads["X"] = g @ w1.T  # ∇_{O⁰} L = G W¹ᵀ
    return grads


def top_loss(o1, w2, b2, y, ops):
    """``L`` as a function of the hidden layer's output ``O¹``."""
    return ops.mse(ops.bias_add(ops.dense(o1, w2), b2), y)


def loss(params, x, y, ops):
    """``L`` of the MLP, built from ``ops``: manualgrad's rules (``mg``) or their references."""
    (w1, b1), (w2, b2) = params
    return top_loss(ops.sigmoid(ops.bias_add(ops.dense(x, w1), b1)), w2, b2, y, ops)


def objective(params, x, y, ops):
    """``J = L + λ Ω(θ)``, the penalty over the weights only."""
    return loss(params, x, y, ops) + ops.l2_penalty([params[0][0], params[1][0]], LAMBDA)


def main() -> float:
    rng = np.random.default_rng(4)
    params = [(rng.normal(size=(3, 4)), rng.normal(size=4)), (rng.normal(size=(4, 2)), rng.normal(size=2))]
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    hand = by_hand(params, x, y)
    (w1, b1), (w2, b2) = params
    o1 = sigmoid(x @ w1 + b1)

    (manual, manual_x), (auto, auto_x) = (jax.grad(loss, argnums=(0, 1))(params, x, y, ops) for ops in (mg, REFERENCE))
    manual_o1, auto_o1 = (jax.grad(top_loss)(o1, w2, b2, y, ops) for ops in (mg, REFERENCE))
    manual_j, auto_j = (jax.grad(objective)(params, x, y, ops) for ops in (mg, REFERENCE))
    _, alg = backprop.gradients([Dense(4, "sigmoid"), Dense(2)], params, x, y)
    rows = [
        compare.Row("∇_{W²} L = O¹ᵀ G", hand["W2"], manual[1][0], alg[1][0], auto[1][0]),
        compare.Row("∇_{b²} L = 1ᵀ G", hand["b2"], manual[1][1], alg[1][1], auto[1][1]),
        compare.Row("∇_{O¹} L = G W²ᵀ", hand["O1"], manual_o1, None, auto_o1),
        compare.Row("∇_{W¹} L = O⁰ᵀ (G ⊙ f'(Z¹))", hand["W1"], manual[0][0], alg[0][0], auto[0][0]),
        compare.Row("∇_{b¹} L = 1ᵀ (G ⊙ f'(Z¹))", hand["b1"], manual[0][1], alg[0][1], auto[0][1]),
        compare.Row("∇_{O⁰} L = G W¹ᵀ", hand["X"], manual_x, None, auto_x),
        compare.Row(
            f"∇_{{W¹}} J = O⁰ᵀ G + λ W¹, λ = {LAMBDA}",
            hand["W1"] + LAMBDA * w1,
            manual_j[0][0],
            alg[0][0] + LAMBDA * w1,
            auto_j[0][0],
        ),
        compare.Row(
            f"∇_{{W²}} J = O¹ᵀ G + λ W², λ = {LAMBDA}",
            hand["W2"] + LAMBDA * w2,
            manual_j[1][0],
            alg[1][0] + LAMBDA * w2,
            auto_j[1][0],
        ),
    ]
    return compare.report("Seed 004: batched row form, MLP 3-4-2 (sigmoid, identity), batch 5, mse", rows)


if __name__ == "__main__":
    main()
