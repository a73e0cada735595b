"""Seed 004: batched backprop with row vectors, ``Z = O W + 1 b``, for a whole batch at once.

For ``m`` samples stacked as rows, layer ``l`` computes ``Z^l = O^{l−1} W^l + 1 b^l`` and
``O^l = f(Z^l)``. Starting from ``G = ∇_{O^l} L`` (one row per sample) the notes give

    G ← G ⊙ f'(Z^l)           undo the activation
    ∇_{W^l} L = O^{l−1 ᵀ} G    (n^i × m)(m × n^o)
    ∇_{b^l} L = 1ᵀ G           the column sums
    ∇_{O^{l−1}} L = G W^{lᵀ}   the G of the layer below

and with regularisation ``∇_{W^l} J = O^{l−1 ᵀ} G + λ ∇_{W^l} Ω(θ)``. Here: an MLP 3 → 4 → 2,
sigmoid hidden layer, identity output, batch m = 5, ``L`` = manualgrad's ``mse`` (the batch
mean of ``½‖O² − Y‖²``, so the top ``G = (O² − Y)/m``), and ``Ω(θ) = ½ Σ ‖W‖²`` as in
manualgrad's ``l2_penalty`` (so ``∇_W Ω = W``). These are manualgrad's own conventions.

Run: ``python comparisons/seed_004.py``.
"""

from __future__ import annotations

import jax
import numpy as np

import manualgrad as mg
from manualgrad import backprop, compare, registry
from manualgrad.backprop import Layer

jax.config.update("jax_enable_x64", True)

LAMBDA = 0.1


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def by_hand(params, x, y) -> dict[str, np.ndarray]:
    """The notes' formulas, layer by layer, in numpy."""
    (w1, b1), (w2, b2) = params
    m = len(x)
    z1 = x @ w1 + np.ones((m, 1)) @ b1[None, :]
    o1 = sigmoid(z1)
    o2 = o1 @ w2 + np.ones((m, 1)) @ b2[None, :]  # identity output: f' = 1
    g = (o2 - y) / m  # ∇_{O²} of the batch mean of ½‖O² − Y‖²
    out = {"∇W2 = O¹ᵀ G": o1.T @ g, "∇b2 = 1ᵀ G": np.ones(m) @ g}
    g = g @ w2.T  # ∇_{O¹} L = G W²ᵀ
    out["∇O¹ = G W²ᵀ"] = g
    g = g * sigmoid(z1) * (1 - sigmoid(z1))  # G ← G ⊙ f'(Z¹)
    out["∇W1 = Oᵀ G"] = x.T @ g
    out["∇b1 = 1ᵀ G"] = np.ones(m) @ g
    out["∇X = G W¹ᵀ"] = g @ w1.T
    return out


def main() -> float:
    rng = np.random.default_rng(4)
    params = [(rng.normal(size=(3, 4)), rng.normal(size=4)), (rng.normal(size=(4, 2)), rng.normal(size=2))]
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    hand = by_hand(params, x, y)
    network = [Layer("dense", "sigmoid"), Layer("dense")]

    def loss(p, x, rules: bool):
        version = (lambda name: registry.get(name).fn) if rules else (lambda name: registry.get(name).reference)
        h = version("sigmoid")(version("bias_add")(version("dense")(x, p[0][0]), p[0][1]))
        o = version("bias_add")(version("dense")(h, p[1][0]), p[1][1])
        return version("mse")(o, y)

    def hidden(o1, rules: bool):  # the loss as a function of the hidden layer's output O¹
        version = (lambda name: registry.get(name).fn) if rules else (lambda name: registry.get(name).reference)
        return version("mse")(version("bias_add")(version("dense")(o1, params[1][0]), params[1][1]), y)

    manual = jax.grad(loss, argnums=(0, 1))(params, x, True)
    auto = jax.grad(loss, argnums=(0, 1))(params, x, False)
    _, alg = backprop.gradients(network, params, x, y)
    o1 = sigmoid(x @ params[0][0] + params[0][1])
    rows = [
        compare.Row("∇W2 = O¹ᵀ G", hand["∇W2 = O¹ᵀ G"], manual[0][1][0], alg[1][0], auto[0][1][0]),
        compare.Row("∇b2 = 1ᵀ G", hand["∇b2 = 1ᵀ G"], manual[0][1][1], alg[1][1], auto[0][1][1]),
        compare.Row("∇O¹ = G W²ᵀ", hand["∇O¹ = G W²ᵀ"], jax.grad(hidden)(o1, True), None, jax.grad(hidden)(o1, False)),
        compare.Row("∇W1 = Xᵀ (G ⊙ f'(Z¹))", hand["∇W1 = Oᵀ G"], manual[0][0][0], alg[0][0], auto[0][0][0]),
        compare.Row("∇b1 = 1ᵀ (G ⊙ f'(Z¹))", hand["∇b1 = 1ᵀ G"], manual[0][0][1], alg[0][1], auto[0][0][1]),
        compare.Row("∇X = G W¹ᵀ", hand["∇X = G W¹ᵀ"], manual[1], None, auto[1]),
    ]
    # Regularised: J = L + Ω with Ω(θ) = λ/2 Σ‖W‖² over the weights, so ∇_W J = Oᵀ G + λ W.
    weights = [params[0][0], params[1][0]]
    reg_manual = jax.grad(lambda p: loss(p, x, True) + mg.l2_penalty([p[0][0], p[1][0]], LAMBDA))(params)
    reg_auto = jax.grad(lambda p: loss(p, x, False) + registry.get("l2_penalty").reference([p[0][0], p[1][0]], LAMBDA))(params)
    for k, (name, w) in enumerate(zip(("∇W1", "∇W2"), weights)):
        gradient = hand[f"{name} = O¹ᵀ G" if k else f"{name} = Oᵀ G"]
        rows.append(compare.Row(f"{name} J = Oᵀ G + λ ∇Ω(θ), λ = {LAMBDA}", gradient + LAMBDA * w,
                                reg_manual[k][0], alg[k][0] + LAMBDA * w, reg_auto[k][0]))
    return compare.report("Seed 004: batched row form, MLP 3-4-2 (sigmoid, identity), batch 5, mse", rows)


if __name__ == "__main__":
    main()
