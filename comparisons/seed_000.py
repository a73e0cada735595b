"""Seed 000: the adjoint identities of §6.2 on finite signals, and the MSE, Linear, Add, Correlation1D rules.

§6.1 defines, for infinite signals, correlation ``(x ⋆ w)_i = Σ_j x_{i+j} w_j`` and convolution
``(x ∗ w)_i = Σ_j x_{i−j} w_j`` (the extracted text prints them as ⊙ and ⊗), and §6.2 states

    1) ⟨A, B ⋆ C⟩ = ⟨C, B ⋆ A⟩        2) ⟨A, B ∗ C⟩ = ⟨A, B ∗ A⟩ (as printed)
    3) ⟨A, B ⋆ C⟩ = ⟨B, A ∗ C⟩        4) ⟨A, B ∗ C⟩ = ⟨B, A ⋆ C⟩

The seed asks where the proof breaks for finite signals. Answer, in numbers: the proofs swap
the order of summation and shift the index (``p = i + j``) over all integers. A finite signal
is an infinite one that is zero outside its support, and the identities hold exactly if every
output keeps every index where it can be non-zero: numpy's ``"full"`` mode (the first signal
zero-padded by the second one's length − 1 on both sides), placed at its true offset. numpy's
``"same"`` and ``"valid"`` modes cut the output to less than that (less or no padding), and the
terms cut off one side of an identity are still counted on the other: the identities break at
the boundary. Identity 2 as printed is a typo (it cannot hold: ``C`` has vanished); "just
interchanging correlation and convolution" in 1), as the seed suggests, gives ``⟨C, B ∗ A⟩``,
which is also false unless ``B`` is even (``B_{−k} = B_k``); the numbers confirm the correct
form ``⟨A, B ∗ C⟩ = ⟨C, A ⋆ B⟩``.

Then §3–§7's rules, each as the seed derives it — MSE ``dx = dy (x − y*)``; Linear ``y = w x``:
``dx = wᵀ dy``, ``dw = dy xᵀ``; Add ``dx = dy``, ``dw = dy``; Correlation1D ``y = x ⋆ w``:
``dx = dy ∗ w`` (a full convolution), ``dw = x ⋆ dy`` (a valid correlation) — against
manualgrad's custom_vjp rules, Algorithm 1 (for the Linear → Add → MSE chain) and ``jax.grad``.
§7.2's middle line ``⟨dL/dy ⋆ w, Δx⟩`` has ⋆ where its conclusion ``dL/dy ∗ w`` has ∗; the
numbers decide for ∗.

Run: ``python comparisons/seed_000.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg
from manualgrad import registry
from manualgrad.nn import backprop
from manualgrad.nn.layers import Dense
from manualgrad.teach import compare

jax.config.update("jax_enable_x64", True)

# Where numpy's output of each mode starts inside the "full" output, for a second argument of length M.
MODE_OFFSET = {"full": lambda m: 0, "same": lambda m: (m - 1) // 2, "valid": lambda m: m - 1}


class Signal:
    """A finite signal as the seed's infinite one: ``values`` at indices ``start, start+1, …``, zero elsewhere."""

    def __init__(self, values: np.ndarray, start: int = 0):
        self.values, self.start = np.asarray(values, np.float64), start

    def dot(self, other: Signal) -> float:
        """``⟨A, B⟩ = Σ_i A_i B_i`` over every integer ``i``."""
        lo, hi = max(self.start, other.start), min(self.start + len(self.values), other.start + len(other.values))
        if hi <= lo:
            return 0.0
        return float(self.values[lo - self.start : hi - self.start] @ other.values[lo - other.start : hi - other.start])


def corr(b: Signal, c: Signal, mode: str) -> Signal:
    """``(B ⋆ C)_i = Σ_j B_{i+j} C_j``: ``np.correlate(B, C, mode)``, placed at its true indices."""
    m = len(c.values)
    assert len(b.values) >= m, "numpy swaps the arguments when the second is longer"
    full_start = b.start - c.start - (m - 1)  # the smallest i with B_{i+j} C_j ≠ 0 for some j
    return Signal(np.correlate(b.values, c.values, mode), full_start + MODE_OFFSET[mode](m))


def conv(b: Signal, c: Signal, mode: str) -> Signal:
    """``(B ∗ C)_i = Σ_j B_{i−j} C_j``: ``np.convolve(B, C, mode)``, placed at its true indices."""
    m = len(c.values)
    assert len(b.values) >= m, "numpy swaps the arguments when the second is longer"
    full_start = b.start + c.start  # the smallest i with B_{i−j} C_j ≠ 0 for some j
    return Signal(np.convolve(b.values, c.values, mode), full_start + MODE_OFFSET[mode](m))


# Each identity as (left side, right side), functions of the signals A, B, C and numpy's mode.
IDENTITIES = {
    "1) ⟨A, B⋆C⟩ = ⟨C, B⋆A⟩": (lambda a, b, c, m: a.dot(corr(b, c, m)), lambda a, b, c, m: c.dot(corr(b, a, m))),
    "3) ⟨A, B⋆C⟩ = ⟨B, A∗C⟩": (lambda a, b, c, m: a.dot(corr(b, c, m)), lambda a, b, c, m: b.dot(conv(a, c, m))),
    "4) ⟨A, B∗C⟩ = ⟨B, A⋆C⟩": (lambda a, b, c, m: a.dot(conv(b, c, m)), lambda a, b, c, m: b.dot(corr(a, c, m))),
    "2) corrected: ⟨A, B∗C⟩ = ⟨C, A⋆B⟩": (
        lambda a, b, c, m: a.dot(conv(b, c, m)),
        lambda a, b, c, m: c.dot(corr(a, b, m)),
    ),
}
# Identity 2 as printed, and as "interchanging correlation and convolution" in 1) gives it: false.
WRONG = {
    "2) as printed: ⟨A, B∗C⟩ = ⟨A, B∗A⟩": (
        lambda a, b, c: a.dot(conv(b, c, "full")),
        lambda a, b, c: a.dot(conv(b, a, "full")),
    ),
    "2) ⋆→∗ in 1): ⟨A, B∗C⟩ = ⟨C, B∗A⟩": (
        lambda a, b, c: a.dot(conv(b, c, "full")),
        lambda a, b, c: c.dot(conv(b, a, "full")),
    ),
}


def identities() -> float:
    """Every identity with numpy's "full" (exact), "same" and "valid" (broken at the boundary) outputs."""
    rng = np.random.default_rng(0)
    a, b, c = Signal(rng.normal(size=9)), Signal(rng.normal(size=9)), Signal(rng.normal(size=3))
    print("Seed 000 §6.2 on finite signals A, B (9 samples) and C (3 samples), all starting at index 0;")
    print("each side is computed with np.correlate / np.convolve in the mode named, placed at its true indices:\n")
    digits = {"full": 15, "same": 6, "valid": 6}  # decimals shown for each mode's two sides
    print(
        f"{'identity':37} │ "
        + " │ ".join(f"{mode + ': left':>{d + 5}} {'right':>{d + 5}} {'gap':>7}" for mode, d in digits.items())
    )
    worst = dict.fromkeys(digits, 0.0)
    for name, (left, right) in IDENTITIES.items():
        cells = []
        for mode, d in digits.items():
            lhs, rhs = left(a, b, c, mode), right(a, b, c, mode)
            gap = abs(lhs - rhs) / max(abs(lhs), abs(rhs))
            worst[mode] = max(worst[mode], gap)
            cells.append(f"{lhs:+{d + 5}.{d}f} {rhs:+{d + 5}.{d}f} {gap:7.1e}")
        print(f"{name:37} │ " + " │ ".join(cells))
    for name, (left, right) in WRONG.items():
        lhs, rhs = left(a, b, c), right(a, b, c)
        print(f"{name:37} │ {lhs:+20.15f} {rhs:+20.15f} {abs(lhs - rhs) / abs(lhs):7.1e} │ false even in full mode")
        assert abs(lhs - rhs) > 1e-3 * abs(lhs), f"{name} should not hold"
    print(
        f"\nIn full mode every identity holds to {worst['full']:.1e}; same and valid outputs lose the boundary "
        f"terms and break them by up to {worst['same']:.0%} and {worst['valid']:.0%}."
    )
    assert worst["full"] <= 1e-12 and worst["same"] > 1e-3 and worst["valid"] > 1e-3
    return worst["full"]


def rules() -> list[compare.Row]:
    rng = np.random.default_rng(1)
    x, t, b = rng.normal(size=4), rng.normal(size=3), rng.normal(size=3)
    w = rng.normal(size=(3, 4))  # the seed's w ∈ R^{m×n}, y = w x; manualgrad's dense weight is wᵀ
    # Linear → Add → MSE, one sample: y = w x + b, L = ½‖y − t‖². The MSE layer's own dy is dL/dL = 1,
    # so its dx = 1·(y − t) (§3): that is the dy the Add and Linear layers receive.
    y = w @ x + b
    dy = 1.0 * (y - t)
    hand = {"dx": w.T @ dy, "dw": np.outer(dy, x), "db": dy}

    def chain(fns):
        dense, bias_add, mse = fns
        return lambda x, wt, b: mse(bias_add(dense(x[None], wt), b), t[None])

    vjp_rules = chain((mg.dense, mg.bias_add, mg.mse))
    ref_rules = chain(tuple(registry.get(n).reference for n in ("dense", "bias_add", "mse")))
    manual = jax.grad(vjp_rules, argnums=(0, 1, 2))(x, w.T, b)
    auto = jax.grad(ref_rules, argnums=(0, 1, 2))(x, w.T, b)
    _, alg = backprop.gradients([Dense(b.size)], [(w.T, b)], x[None], t[None], "mse")
    rows = [
        compare.Row(
            "MSE: dx = dy·(x − y*)",
            dy,
            jax.grad(mg.mse)(y[None], t[None])[0],
            None,
            jax.grad(registry.get("mse").reference)(y[None], t[None])[0],
        ),
        compare.Row("Linear: dx = wᵀ dy", hand["dx"], manual[0], None, auto[0]),
        compare.Row("Linear: dw = dy xᵀ", hand["dw"], manual[1].T, alg[0][0].T, auto[1].T),
        compare.Row("Add: dw = dy", hand["db"], manual[2], alg[0][1], auto[2]),
    ]
    # Add alone: y = x + w, both cotangents are dy.
    g = rng.normal(size=3)
    _, add_vjp = jax.vjp(lambda z, b: mg.bias_add(z[None], b)[0], y, b)
    _, add_ref = jax.vjp(lambda z, b: registry.get("bias_add").reference(z[None], b)[0], y, b)
    rows.append(compare.Row("Add: dx = dy", g, add_vjp(g)[0], None, add_ref(g)[0]))
    # Correlation1D, "valid": y = x ⋆ w, dx = dy ∗ w (full convolution), dw = x ⋆ dy (valid correlation).
    xs, ws = rng.normal(size=10), rng.normal(size=3)
    dys = rng.normal(size=8)
    _, corr_vjp = jax.vjp(lambda x, w: mg.correlate1d(x, w, "valid"), xs, ws)
    _, corr_ref = jax.vjp(lambda x, w: registry.get("correlate1d").reference(x, w, "valid"), xs, ws)
    (dx_rule, dw_rule), (dx_ref, dw_ref) = corr_vjp(jnp.asarray(dys)), corr_ref(jnp.asarray(dys))
    # §7.2's middle line, dx = dy ⋆ w: (dy ⋆ w)_i = Σ_j dy_{i+j} w_j at dx's indices i = 0…9 (dy zero-extended).
    as_printed = np.correlate(np.pad(dys, (0, len(xs) + len(ws) - 1 - len(dys))), ws, "valid")
    gap = np.max(np.abs(as_printed - dx_ref)) / np.max(np.abs(dx_ref))
    print(
        f"\nSeed 000 §7.2's middle line as printed, dx = dy ⋆ w: differs from jax.grad by {gap:.0%} — TYPO; "
        "its conclusion dx = dy ∗ w is right (below)."
    )
    assert gap > 1e-3, "§7.2's ⋆ should be a typo"
    rows += [
        compare.Row("Correlation1D: dx = dy ∗ w (full)", np.convolve(dys, ws, "full"), dx_rule, None, dx_ref),
        compare.Row("Correlation1D: dw = x ⋆ dy (valid)", np.correlate(xs, dys, "valid"), dw_rule, None, dw_ref),
    ]
    return rows


def main() -> float:
    worst = identities()
    return max(worst, compare.report("Seed 000 §3–§7: MSE, Linear, Add, Correlation1D", rules()))


if __name__ == "__main__":
    main()
