"""Seed 001: the handwritten 2-2-1 sigmoid network, every ∂L/∂w_i and ∂L/∂b_i at concrete numbers.

    z_0 = w_0 x_0 + w_1 x_1 + b_0     a_0 = σ(z_0)
    z_1 = w_2 x_0 + w_3 x_1 + b_1     a_1 = σ(z_1)
    z_2 = w_4 a_0 + w_5 a_1 + b_2     a_2 = σ(z_2)       L = ½ (a_2 − y)²

The seed's scalar section (③) has index typos. This script evaluates each formula exactly as
written and as corrected, and lets the numbers decide which is right; then it checks the
corrected scalars, the seed's matrix form ``∂L/∂W = ∂L/∂z xᵀ`` (and its ``vec``/Kronecker proof)
against manualgrad's custom_vjp rules, seed 002's Algorithm 1 and ``jax.grad``.

Run: ``python comparisons/seed_001.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.nn import backprop
from manualgrad.nn.layers import Dense
from manualgrad.teach import compare

jax.config.update("jax_enable_x64", True)

X = (0.35, 0.9)
Y = 0.5
W = (0.1, 0.8, 0.4, 0.6, 0.3, 0.9)
B = (0.05, -0.1, 0.2)


def sigma(z: float) -> float:
    return 1 / (1 + np.exp(-z))


def scalars() -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """The seed's formulas: (as written, corrected, what was corrected)."""
    (x0, x1), (w0, w1, w2, w3, w4, w5), (b0, b1, b2) = X, W, B
    z0 = w0 * x0 + w1 * x1 + b0
    z1 = w2 * x0 + w3 * x1 + b1
    a0, a1 = sigma(z0), sigma(z1)
    z2 = w4 * a0 + w5 * a1 + b2
    a2 = sigma(z2)

    def d(a):  # σ'(z) = σ(z)(1 − σ(z)), seed 001 ①
        return a * (1 - a)

    dz2 = d(a2) * (a2 - Y)
    as_written = {
        "b_2": dz2,
        "w_4": dz2 * a0,
        "w_5": dz2 * a1,
        "b_1": (a2 - Y) * d(a2) * w5 * d(a1),
        "w_1": (a2 - Y) * d(a2) * w5 * d(a1) * a0,
        "w_3": (a2 - Y) * d(a2) * w5 * d(a1) * a1,
        "b_0": (a2 - Y) * d(a2) * w4 * d(a0),
        "w_0": (a2 - Y) * d(a2) * w4 * d(a0) * a0,
        "w_2": (a2 - Y) * d(a2) * w4 * d(a0) * a1,
    }
    dz1 = dz2 * w5 * d(a1)  # the seed writes w_4 here; z_2 = w_4 a_0 + w_5 a_1 reaches z_1 through w_5
    dz0 = dz2 * w4 * d(a0)
    corrected = {
        "b_2": dz2,
        "w_4": dz2 * a0,
        "w_5": dz2 * a1,
        "b_1": dz1,
        "w_2": dz1 * x0,
        "w_3": dz1 * x1,
        "b_0": dz0,
        "w_0": dz0 * x0,
        "w_1": dz0 * x1,
    }
    fixes = {
        "w_1": "w_1 sits in z_0 (eq. 3), not z_1: (a_2−y)σ'(z_2) w_4 σ'(z_0) x_1",
        "w_3": "z_1's inputs are x_0, x_1, not a_0, a_1: (a_2−y)σ'(z_2) w_5 σ'(z_1) x_1",
        "w_0": "z_0's inputs are x_0, x_1, not a_0, a_1: (a_2−y)σ'(z_2) w_4 σ'(z_0) x_0",
        "w_2": "w_2 sits in z_1 (eq. 5), not z_0: (a_2−y)σ'(z_2) w_5 σ'(z_1) x_0",
    }
    return as_written, corrected, fixes


def matrices() -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """The network in manualgrad's row form: ``x W + b`` with ``W`` of shape ``(in, out)``."""
    w0, w1, w2, w3, w4, w5 = W
    params = [(np.array([[w0, w2], [w1, w3]]), np.array(B[:2])), (np.array([[w4], [w5]]), np.array(B[2:]))]
    return params, np.array([X]), np.array([[Y]])


def main() -> float:
    as_written, corrected, fixes = scalars()
    params, x, y = matrices()
    network = [Dense(2, "sigmoid"), Dense(1, "sigmoid")]
    p = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]
    grad_vjp = jax.grad(lambda p: backprop.loss(network, p, x, y))(p)
    grad_ref = jax.grad(lambda p: backprop.loss(network, p, x, y, reference=True))(p)
    _, grad_alg = backprop.gradients(network, p, x, y)
    # Where each scalar lives in the row-form parameters: (layer, W or b, index).
    where = {
        "w_0": (0, 0, (0, 0)),
        "w_1": (0, 0, (1, 0)),
        "w_2": (0, 0, (0, 1)),
        "w_3": (0, 0, (1, 1)),
        "w_4": (1, 0, (0, 0)),
        "w_5": (1, 0, (1, 0)),
        "b_0": (0, 1, (0,)),
        "b_1": (0, 1, (1,)),
        "b_2": (1, 1, (0,)),
    }

    def pick(g, name):
        return g[where[name][0]][where[name][1]][where[name][2]]

    print("Seed 001 ③ as written against the numbers (jax.grad of the reference decides):")
    for name in sorted(as_written):
        truth = float(pick(grad_ref, name))
        verdict = "right" if np.isclose(as_written[name], truth, rtol=1e-12, atol=0) else "TYPO"
        print(
            f"  ∂L/∂{name}: as written {as_written[name]:+.15f}, jax.grad {truth:+.15f}  {verdict}"
            + (f" — corrected: {fixes[name]}" if name in fixes else "")
        )
        assert (verdict == "TYPO") == (name in fixes), f"seed 001: the typo list is wrong about {name}"
    print(
        "  also: the seed's ∂L/∂z_1 line has w_4 where z_2 = w_4 a_0 + w_5 a_1 + b_2 gives w_5 (its ∂L/∂b_1 uses w_5)."
    )

    rows = [
        compare.Row(f"∂L/∂{name}", corrected[name], pick(grad_vjp, name), pick(grad_alg, name), pick(grad_ref, name))
        for name in ("w_0", "w_1", "w_2", "w_3", "w_4", "w_5", "b_0", "b_1", "b_2")
    ]

    # The matrix form (B): ∂L/∂z_N = σ'(z_N)(x_N − y), ∂L/∂W_N = ∂L/∂z_N x_{N−1}ᵀ, ∂L/∂x_{N−1} = W_Nᵀ ∂L/∂z_N,
    # in columns with the seed's W_n of shape (m_n, m_{n−1}), i.e. the transpose of manualgrad's.
    (w_1, b_1), (w_2, b_2) = params
    x0 = x.T
    x1 = sigma(w_1.T @ x0 + b_1[:, None])
    x2 = sigma(w_2.T @ x1 + b_2[:, None])
    dz2 = x2 * (1 - x2) * (x2 - y.T)
    dz1 = x1 * (1 - x1) * (w_2 @ dz2)
    vec_dw1 = np.kron(x0, np.eye(2)) @ dz1  # (x ⊗ I) ∂L/∂z = vec(∂L/∂z xᵀ), column-major vec
    rows += [
        compare.Row(
            "∂L/∂W_2 = ∂L/∂z_2 x_1ᵀ (matrix form)", (dz2 @ x1.T).T, grad_vjp[1][0], grad_alg[1][0], grad_ref[1][0]
        ),
        compare.Row(
            "∂L/∂W_1 = ∂L/∂z_1 x_0ᵀ (matrix form)", (dz1 @ x0.T).T, grad_vjp[0][0], grad_alg[0][0], grad_ref[0][0]
        ),
        compare.Row(
            "devec((x_0 ⊗ I) ∂L/∂z_1) (Kronecker)",
            vec_dw1.reshape(2, 2, order="F").T,
            grad_vjp[0][0],
            grad_alg[0][0],
            grad_ref[0][0],
        ),
        compare.Row("∂L/∂b_1 = ∂L/∂z_1 (matrix form)", dz1[:, 0], grad_vjp[0][1], grad_alg[0][1], grad_ref[0][1]),
    ]
    return compare.report("Seed 001: 2-2-1 sigmoid network, corrected scalar and matrix formulas", rows)


if __name__ == "__main__":
    main()
