"""Seed 002: Theorem 7's product formula and Theorem 10's adjoints, evaluated literally.

Part 1, Theorem 7 (Section 3). For ``F_k = σ_k(W_k F_{k−1} + b_k)`` (columns, ``W_k`` of shape
``d_k × d_{k−1}``), ``ℓ = ‖y − F_n‖²``, ``L = 2(F_n − y)ᵀ`` and ``D_k = diag(σ'_k(W_k F_{k−1} + b_k))``:

    (D_{W_k} ℓ)ᵀ = F_{k−1} L D_n W_n ⋯ D_{k+1} W_{k+1} D_k,     (D_{b_k} ℓ)ᵀ = L D_n W_n ⋯ D_{k+1} W_{k+1} D_k

built here with explicit ``diag`` matrices and multiplied left to right, exactly as printed.
``(D_{W_k} ℓ)ᵀ`` is ``d_{k−1} × d_k``: manualgrad's row-form ``W`` (shape ``(in, out)``) is the
seed's ``W_kᵀ``, so the product is directly the gradient of manualgrad's ``W``.

Part 2, Theorem 10 (Section 4) for a small CNN (conv → ReLU → conv → tanh → dense). Each map
``T_k h = D_k ⊙ C_k(h, W_k)``, ``S_k H = D_k ⊙ C_k(F_{k−1}, H)`` and ``R_k h = D_k ⊙ ι_k(h)`` is
built as an explicit matrix from its action on the standard basis, and its adjoint is taken
by Equation (3), ``T* x = Σ_i ⟨x, T e_i⟩ e_i`` (the transposed matrix). Then

    D_{W_k} ℓ = S_k* T_{k+1}* ⋯ T_n* (L),        D_{b_k} ℓ = R_k* T_{k+1}* ⋯ T_n* (L).

The convolution in the hand column is the definition ``a[i, j, o] = Σ_{p,q,c} x[i+p, j+q, c] W[p, q, c, o]``
in numpy loops; nothing in it comes from manualgrad or JAX.

Run: ``python comparisons/seed_002.py``.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from manualgrad.nn import backprop
from manualgrad.nn.layers import Conv2D, Dense
from manualgrad.teach import compare

jax.config.update("jax_enable_x64", True)

SIGMA = {
    "sigmoid": lambda a: 1 / (1 + np.exp(-a)),
    "tanh": np.tanh,
    "relu": lambda a: np.maximum(a, 0),
    "identity": lambda a: a,
}
SIGMA_PRIME = {
    "sigmoid": lambda a: SIGMA["sigmoid"](a) * (1 - SIGMA["sigmoid"](a)),
    "tanh": lambda a: 1 - np.tanh(a) ** 2,
    "relu": lambda a: (a > 0).astype(a.dtype),
    "identity": np.ones_like,
}


def theorem_7(
    weights: list[np.ndarray], biases: list[np.ndarray], activations: list[str], x: np.ndarray, y: np.ndarray
):
    """``[(D_{W_k} ℓ)ᵀ, (D_{b_k} ℓ)ᵀ]`` for one sample: seed 002 Theorem 7 with ``ℓ = ‖y − F_n‖²``."""
    f = [x]
    d = []
    for w, b, s in zip(weights, biases, activations):
        a = w @ f[-1] + b
        d.append(np.diag(SIGMA_PRIME[s](a)))
        f.append(SIGMA[s](a))
    big_l = 2 * (f[-1] - y)[None, :]  # L(y, F_n) = 2(F_n − y)ᵀ, a row
    n = len(weights)
    result = []
    for k in range(1, n + 1):
        chain = big_l @ d[n - 1]
        for j in range(n, k, -1):  # L D_n W_n D_{n−1} ⋯ W_{k+1} D_k
            chain = chain @ weights[j - 1] @ d[j - 2]
        result.append((f[k - 1][:, None] @ chain, chain[0]))
    return result


def part_1() -> list[compare.Row]:
    rng = np.random.default_rng(2)
    widths, activations = (4, 5, 3, 2), ["sigmoid", "tanh", "identity"]
    weights = [rng.normal(size=(widths[k + 1], widths[k])) for k in range(3)]  # seed's W_k: d_k × d_{k−1}
    biases = [rng.normal(size=widths[k + 1]) for k in range(3)]
    x, y = rng.normal(size=widths[0]), rng.normal(size=widths[-1])
    hand = theorem_7(weights, biases, activations, x, y)

    network = [Dense(widths[k + 1], s) for k, s in enumerate(activations)]
    params = [(w.T, b) for w, b in zip(weights, biases)]  # manualgrad's row form: W of shape (in, out)
    xb, yb = x[None, :], y[None, :]
    # ℓ = ‖y − F_n‖² is twice manualgrad's mse (½‖·‖², batch of one); gradients are linear in L.
    grad_vjp = jax.grad(lambda p: 2 * backprop.loss(network, p, xb, yb))(params)
    grad_ref = jax.grad(lambda p: 2 * backprop.loss(network, p, xb, yb, reference=True))(params)
    grad_alg = jax.tree_util.tree_map(lambda g: 2 * g, backprop.gradients(network, params, xb, yb)[1])
    rows = []
    for k in range(3):
        rows.append(
            compare.Row(
                f"(D_W{k + 1} ℓ)ᵀ = F_{k} L D_3 ⋯ D_{k + 1}", hand[k][0], grad_vjp[k][0], grad_alg[k][0], grad_ref[k][0]
            )
        )
        rows.append(
            compare.Row(
                f"(D_b{k + 1} ℓ)ᵀ = L D_3 ⋯ D_{k + 1}", hand[k][1], grad_vjp[k][1], grad_alg[k][1], grad_ref[k][1]
            )
        )
    return rows


def conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``C(x, W)[i, j, o] = Σ_{p,q,c} x[i+p, j+q, c] W[p, q, c, o]`` ("VALID", stride 1), one HWC image."""
    kh, kw, _, c_out = w.shape
    out = np.zeros((x.shape[0] - kh + 1, x.shape[1] - kw + 1, c_out))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.einsum("pqc,pqco->o", x[i : i + kh, j : j + kw], w)
    return out


def dense_flat(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``C(x, W) = vec(x) W`` with row-major ``vec``, as manualgrad flattens an image for a dense layer."""
    return x.reshape(-1) @ w


def matrix(linear, shape: tuple[int, ...]) -> np.ndarray:
    """The matrix of a linear map on arrays of ``shape``: column ``i`` is ``vec(linear(e_i))``."""
    size = int(np.prod(shape))
    return np.stack([np.ravel(linear(np.eye(size)[i].reshape(shape))) for i in range(size)], axis=1)


def theorem_10(cs, weights, biases, activations, x, y) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(D_{W_k} ℓ, D_{b_k} ℓ)]`` for ``ℓ = ½‖F_n − y‖²`` by Theorem 10 with adjoints from Equation (3)."""
    f, d = [x], []
    for c, w, b, s in zip(cs, weights, biases, activations):
        a = c(f[-1], w) + b  # ι_k(b): one bias per channel, broadcast over positions
        d.append(SIGMA_PRIME[s](a).ravel())
        f.append(SIGMA[s](a))
    big_l = (f[-1] - y).ravel()  # L(y, F_n) for ½‖F_n − y‖²
    n = len(cs)
    t_adj = [
        matrix(functools.partial(lambda h, c, w: c(h, w), c=c, w=w), f[k].shape).T * d[k][None, :]
        for k, (c, w) in enumerate(zip(cs, weights))
    ]  # T_k* = (D_k C_k(·, W_k))ᵀ
    result = []
    for k in range(n):
        h = big_l
        for j in range(n - 1, k, -1):  # T_{k+1}* ⋯ T_n* (L)
            h = t_adj[j] @ h
        s_adj = matrix(lambda big_h, c=cs[k], fk=f[k]: c(fk, big_h), weights[k].shape).T * d[k][None, :]
        r_adj = (
            matrix(lambda bias, c=cs[k], w=weights[k], fk=f[k]: np.zeros_like(c(fk, w)) + bias, biases[k].shape).T
            * d[k][None, :]
        )
        result.append(((s_adj @ h).reshape(weights[k].shape), r_adj @ h))
    return result


def part_2() -> list[compare.Row]:
    rng = np.random.default_rng(3)
    activations = ["relu", "tanh", "identity"]
    weights = [rng.normal(size=(3, 3, 1, 2)), rng.normal(size=(2, 2, 2, 2)) / 2, rng.normal(size=(8, 3)) / 3]
    biases = [rng.normal(size=2) / 4, rng.normal(size=2) / 4, rng.normal(size=3)]
    x, y = rng.normal(size=(5, 5, 1)), rng.normal(size=3)
    hand = theorem_10([conv, conv, dense_flat], weights, biases, activations, x, y)

    network = [Conv2D(2, (3, 3), activation="relu"), Conv2D(2, (2, 2), activation="tanh"), Dense(3)]
    params = list(zip(weights, biases))
    xb, yb = x[None], y[None, :]
    grad_vjp = jax.grad(lambda p: backprop.loss(network, p, xb, yb))(params)
    grad_ref = jax.grad(lambda p: backprop.loss(network, p, xb, yb, reference=True))(params)
    grad_alg = backprop.gradients(network, params, xb, yb)[1]
    rows = []
    for k, name in enumerate(["conv", "conv", "dense"]):
        rows.append(
            compare.Row(
                f"D_W{k + 1} ℓ = S_{k + 1}* T* ⋯ (L)  ({name})",
                hand[k][0],
                grad_vjp[k][0],
                grad_alg[k][0],
                grad_ref[k][0],
            )
        )
        rows.append(
            compare.Row(
                f"D_b{k + 1} ℓ = R_{k + 1}* T* ⋯ (L)  ({name})",
                hand[k][1],
                grad_vjp[k][1],
                grad_alg[k][1],
                grad_ref[k][1],
            )
        )
    return rows


def main() -> float:
    worst = compare.report(
        "Seed 002, Theorem 7 (diag matrices, literally) vs Algorithm 1: MLP 4-5-3-2, sigmoid/tanh/identity", part_1()
    )
    return max(
        worst,
        compare.report(
            "Seed 002, Theorem 10 (adjoints by Equation (3)) vs Algorithm 2: CNN 5×5×1 → conv3×3×2 → "
            "ReLU → conv2×2×2 → tanh → dense 3",
            part_2(),
        ),
    )


if __name__ == "__main__":
    main()
