"""Seed 003: ``y = cᵀ Ψ((W + V) Φ(Wx + b))`` — W is used twice, and its gradient sums both paths.

The tutorial (columns, ``W, V ∈ R^{n×n}``) names the intermediate values

    z_0 = W x,  z_1 = z_0 + b,  z_2 = Φ(z_1),  Z_3 = W + V,  z_4 = Z_3 z_2,  z_5 = Ψ(z_4),  y = cᵀ z_5

and backpropagates the differential ``dy = ⟨g, dW⟩`` to the closed form

    g = Ψ'(z_4) c z_2ᵀ  +  Φ'(z_1) (W + V)ᵀ Ψ'(z_4) c xᵀ
        └ path through Z_3 = W + V ┘   └ path through z_0 = W x ┘

(``Ψ'(z_4)`` is the diagonal matrix of seed 003's element-wise Jacobian.) Here ``Φ = tanh`` and
``Ψ = sigmoid``, ``n = 4``. The seed's last line substitutes the z's back and writes
``Ψ(Wx + b)`` where ``z_2 = Φ(Wx + b)``; with ``Φ ≠ Ψ`` the numbers show that line is a typo.

manualgrad builds the same function from its rules — ``dense`` appears twice, with weights
made from the one ``W`` — and ``jax.grad`` adds the two paths' cotangents by itself. Each path
alone is the gradient with respect to one use of ``W``, the other held fixed.

Algorithm 1 has no column for ``g`` itself: it computes one gradient per layer, and layers
that share a weight are not a chain of independent layers. Run on the network with
independent weights ``W_1 = W`` (tanh) and ``W_2 = W + V`` (sigmoid), its two weight
gradients are the two paths, and their sum is ``g``.

Run: ``python comparisons/seed_003.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg
from manualgrad.nn import backprop
from manualgrad.nn.layers import Dense
from manualgrad.teach import compare

jax.config.update("jax_enable_x64", True)

N = 4


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def network(w_inner, w_outer, v, x, b, c, rules: bool):
    """``cᵀ Ψ((W_outer + V) Φ(W_inner x + b))``; the seed's ``y`` is ``w_inner = w_outer = W``.

    With ``rules`` it is built from manualgrad's rules in row form (``x W`` with ``W`` of shape
    (in, out), so the seed's ``W`` enters as ``Wᵀ``); otherwise it is plain ``jnp`` in columns.
    """
    if rules:
        z2 = mg.tanh(mg.bias_add(mg.dense(x[None], w_inner.T), b))
        return mg.dense(mg.sigmoid(mg.dense(z2, (w_outer + v).T)), c[:, None])[0, 0]
    z2 = jnp.tanh(w_inner @ x + b)
    return c @ jax.nn.sigmoid((w_outer + v) @ z2)


def main() -> float:
    rng = np.random.default_rng(3)
    w, v = rng.normal(size=(N, N)), rng.normal(size=(N, N))
    x, b, c = rng.normal(size=N), rng.normal(size=N), rng.normal(size=N)

    z1 = w @ x + b
    z2 = np.tanh(z1)
    z4 = (w + v) @ z2
    psi_prime = np.diag(sigmoid(z4) * (1 - sigmoid(z4)))  # Ψ'(z_4)
    phi_prime = np.diag(1 - np.tanh(z1) ** 2)  # Φ'(z_1)
    path_z3 = psi_prime @ np.outer(c, z2)
    path_z0 = phi_prime @ (w + v).T @ psi_prime @ np.outer(c, x)
    g = path_z3 + path_z0

    # W used twice: jax.grad of y(W) sums both paths; argnums 0 and 1 give each path alone.
    manual = jax.grad(lambda w: network(w, w, v, x, b, c, True))(w)
    auto = jax.grad(lambda w: network(w, w, v, x, b, c, False))(w)
    manual_z0, manual_z3 = jax.grad(network, argnums=(0, 1))(w, w, v, x, b, c, True)
    auto_z0, auto_z3 = jax.grad(network, argnums=(0, 1))(w, w, v, x, b, c, False)

    # The seed's last line as printed: Ψ(Wx + b) in place of z_2 = Φ(Wx + b).
    z4_printed = (w + v) @ sigmoid(z1)
    psi_prime_printed = np.diag(sigmoid(z4_printed) * (1 - sigmoid(z4_printed)))
    g_printed = psi_prime_printed @ np.outer(c, sigmoid(z1)) + phi_prime @ (w + v).T @ psi_prime_printed @ np.outer(
        c, x
    )
    gap = np.max(np.abs(g_printed - auto)) / np.max(np.abs(auto))
    print(
        f"Seed 003's last line as printed (Ψ(Wx + b) for z_2): differs from jax.grad by {gap:.0%} — TYPO; "
        "with Φ(Wx + b) it is the first line, g below."
    )
    assert gap > 1e-3, "seed 003's last line should be a typo"

    # Algorithm 1 on layers W_1 = W (tanh), W_2 = W + V (sigmoid); y = cᵀ F_2 is a third, linear layer
    # with the fixed weight c. The loss y is linear in F_3, so L = 1: mse with target F_3 − 1 has that L.
    layers = [Dense(N, "tanh"), Dense(N, "sigmoid"), Dense(1)]
    params = [(w.T, b), ((w + v).T, np.zeros(N)), (c[:, None], np.zeros(1))]
    f3 = backprop.output(layers, params, x[None])
    _, grads = backprop.gradients(layers, params, x[None], f3 - 1.0)  # ½‖F_3 − (F_3 − 1)‖²: dℓ/dF_3 = 1
    alg_z0, alg_z3 = grads[0][0].T, grads[1][0].T  # back to the seed's columns
    rows = [
        compare.Row("path via Z_3 = W + V: Ψ'(z_4) c z_2ᵀ", path_z3, manual_z3, alg_z3, auto_z3),
        compare.Row("path via z_0 = W x: Φ'(z_1)(W+V)ᵀΨ'(z_4) c xᵀ", path_z0, manual_z0, alg_z0, auto_z0),
        compare.Row("g = sum of both paths", g, manual, alg_z0 + alg_z3, auto),
    ]
    return compare.report("Seed 003: y = cᵀΨ((W + V)Φ(Wx + b)), Φ = tanh, Ψ = sigmoid, n = 4", rows)


if __name__ == "__main__":
    main()
