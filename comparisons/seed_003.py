"""Seed 003: ``y = cᵀ Ψ((W + V) Φ(Wx + b))`` — W is used twice, and its gradient sums both paths.

The tutorial (columns, ``W, V ∈ R^{n×n}``) names the intermediate values

    z_0 = W x,  z_1 = z_0 + b,  z_2 = Φ(z_1),  Z_3 = W + V,  z_4 = Z_3 z_2,  z_5 = Ψ(z_4),  y = cᵀ z_5

and backpropagates the differential ``dy = ⟨g, dW⟩`` to the closed form

    g = Ψ'(z_4) c z_2ᵀ  +  Φ'(z_1) (W + V)ᵀ Ψ'(z_4) c xᵀ
        └ path through Z_3 = W + V ┘   └ path through z_0 = W x ┘

(``Ψ'(z_4)`` is the diagonal matrix of seed 003's element-wise Jacobian.) Here ``Φ = tanh`` and
``Ψ = sigmoid``. manualgrad builds the same function from its rules — ``dense`` appears twice
with weights derived from the one ``W`` — and ``jax.grad`` adds the two paths' cotangents.
Algorithm 1 sees a two-layer network with independent weights ``W_1 = W`` and ``W_2 = W + V``;
its two weight gradients are exactly the two paths, and their sum (transposed back to
columns) is ``g``: the "Algorithm 1/2" column shows that sum.

Run: ``python comparisons/seed_003.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg
from manualgrad import backprop, compare
from manualgrad.backprop import Layer

jax.config.update("jax_enable_x64", True)

N = 4


def network(w, v, x, b, c, rules: bool):
    """``cᵀ Ψ((W + V) Φ(Wx + b))`` in manualgrad's row form (``x W`` with ``W`` of shape (in, out) is ``Wᵀ`` here)."""
    if rules:
        z2 = mg.tanh(mg.bias_add(mg.dense(x[None], w.T), b))
        return mg.dense(mg.sigmoid(mg.dense(z2, (w + v).T)), c[:, None])[0, 0]
    z2 = jnp.tanh(w @ x + b)
    return c @ jax.nn.sigmoid((w + v) @ z2)


def network_split(w0, w3, v, x, b, c):
    """The network with W's two uses as separate arguments: ``w0`` in ``W x``, ``w3`` in ``W + V``."""
    z2 = mg.tanh(mg.bias_add(mg.dense(x[None], w0.T), b))
    return mg.dense(mg.sigmoid(mg.dense(z2, (w3 + v).T)), c[:, None])[0, 0]


def main() -> float:
    rng = np.random.default_rng(3)
    w, v = rng.normal(size=(N, N)), rng.normal(size=(N, N))
    x, b, c = rng.normal(size=N), rng.normal(size=N), rng.normal(size=N)

    z1 = w @ x + b
    z2 = np.tanh(z1)
    z4 = (w + v) @ z2
    psi_prime = np.diag(1 / (1 + np.exp(-z4)) * (1 - 1 / (1 + np.exp(-z4))))  # Ψ'(z_4), sigmoid
    phi_prime = np.diag(1 - np.tanh(z1) ** 2)  # Φ'(z_1), tanh
    path_z3 = psi_prime @ np.outer(c, z2)
    path_z0 = phi_prime @ (w + v).T @ psi_prime @ np.outer(c, x)
    g = path_z3 + path_z0

    manual = jax.grad(network)(w, v, x, b, c, True)
    auto = jax.grad(network)(w, v, x, b, c, False)
    # The path-by-path gradients: differentiate with respect to each use of W separately.
    through_z3 = jax.grad(lambda w3: network_split(w, w3, v, x, b, c))(w)
    through_z0 = jax.grad(lambda w0: network_split(w0, w, v, x, b, c))(w)
    # Algorithm 1 on layers W_1 = W (tanh), W_2 = W + V (sigmoid); y = cᵀ F_2 is a third, linear layer
    # with the fixed weight c; the loss y is linear in F_3, so L = 1: use mse with target F_3 − 1.
    layers = [Layer("dense", "tanh"), Layer("dense", "sigmoid"), Layer("dense")]
    params = [(w.T, b), ((w + v).T, np.zeros(N)), (c[:, None], np.zeros(1))]
    f3 = backprop.output(layers, params, x[None])
    _, grads = backprop.gradients(layers, params, x[None], f3 - 1.0)  # ½‖F_3 − (F_3 − 1)‖²: dℓ/dF_3 = 1
    algorithm = grads[0][0].T + grads[1][0].T
    rows = [
        compare.Row("path via Z_3 = W + V: Ψ'(z_4) c z_2ᵀ", path_z3, through_z3, grads[1][0].T, None),
        compare.Row("path via z_0 = W x: Φ'(z_1)(W+V)ᵀΨ'(z_4) c xᵀ", path_z0, through_z0, grads[0][0].T, None),
        compare.Row("g = sum of both paths", g, manual, algorithm, auto),
    ]
    return compare.report("Seed 003: y = cᵀΨ((W + V)Φ(Wx + b)), Φ = tanh, Ψ = sigmoid, n = 4", rows)


if __name__ == "__main__":
    main()
