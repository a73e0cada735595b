"""Seed 000: the adjoint identities of §6.2 on finite signals, and the MSE, Linear, Add, Correlation1D rules.

§6.1 defines, for infinite signals, correlation ``(x ⋆ w)_i = Σ_j x_{i+j} w_j`` and convolution
``(x ∗ w)_i = Σ_j x_{i−j} w_j`` (the extracted text prints them as ⊙ and ⊗), and §6.2 states

    1) ⟨A, B ⋆ C⟩ = ⟨C, B ⋆ A⟩        2) ⟨A, B ∗ C⟩ = ⟨A, B ∗ A⟩ (as printed)
    3) ⟨A, B ⋆ C⟩ = ⟨B, A ∗ C⟩        4) ⟨A, B ∗ C⟩ = ⟨B, A ⋆ C⟩

The seed asks where the proof breaks for finite signals. Answer, in numbers: the proofs swap
the order of summation and shift the index (``p = i + j``) over all integers. A finite signal
is an infinite one that is zero outside its support, and the identities hold exactly if every
signal is indexed that way (zero extension: numpy's ``"full"`` outputs placed at their true
offsets). They break when an output is cut to where the window lies inside the signal
(``"valid"``, no padding), because terms that fell off one side are still counted on the other. Identity 2
as printed is a typo (it cannot hold: ``C`` has vanished); changing ⋆ to ∗ in 1), as the seed
suggests, gives ``⟨C, B ∗ A⟩``, which is also false unless ``B`` is symmetric; the numbers
confirm the correct form ``⟨A, B ∗ C⟩ = ⟨C, A ⋆ B⟩``.

Then §3–§7's rules, each as the seed derives it — MSE ``dx = dy (x − y*)``; Linear ``y = w x``:
``dx = wᵀ dy``, ``dw = dy xᵀ``; Add ``dx = dy``, ``dw = dy``; Correlation1D ``y = x ⋆ w``:
``dx = dy ∗ w`` (a full convolution), ``dw = x ⋆ dy`` (a valid correlation) — against
manualgrad's custom_vjp rules, Algorithm 1 (for the Linear → Add → MSE chain) and ``jax.grad``.

Run: ``python comparisons/seed_000.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg
from manualgrad import backprop, compare, registry
from manualgrad.backprop import Layer

jax.config.update("jax_enable_x64", True)


class Signal:
    """A finite signal as the seed's infinite one: ``values`` at indices ``start, start+1, …``, zero elsewhere."""

    def __init__(self, values: np.ndarray, start: int = 0):
        self.values, self.start = np.asarray(values, np.float64), start

    def dot(self, other: Signal) -> float:
        """``⟨A, B⟩ = Σ_i A_i B_i`` over every integer ``i``."""
        lo, hi = max(self.start, other.start), min(self.start + len(self.values), other.start + len(other.values))
        if hi <= lo:
            return 0.0
        return float(self.values[lo - self.start:hi - self.start] @ other.values[lo - other.start:hi - other.start])


def corr(b: Signal, c: Signal, mode: str = "full") -> Signal:
    """``(B ⋆ C)_i = Σ_j B_{i+j} C_j`` at every ``i`` where it can be non-zero (``"full"``: numpy's output at its
    true indices), or only where ``C``'s window lies inside ``B`` (``"valid"``: no padding)."""
    full = Signal(np.correlate(b.values, c.values, "full"), b.start - c.start - (len(c.values) - 1))
    return full if mode == "full" else _cut(full, b.start - c.start, b.start - c.start + len(b.values) - len(c.values) + 1)


def conv(b: Signal, c: Signal, mode: str = "full") -> Signal:
    """``(B ∗ C)_i = Σ_j B_{i−j} C_j``, ``"full"`` or ``"valid"`` as in :func:`corr`."""
    full = Signal(np.convolve(b.values, c.values, "full"), b.start + c.start)
    lo = b.start + c.start + len(c.values) - 1
    return full if mode == "full" else _cut(full, lo, b.start + c.start + len(b.values))


def _cut(signal: Signal, lo: int, hi: int) -> Signal:
    """``signal`` kept at indices ``lo ≤ i < hi`` only."""
    return Signal(signal.values[max(lo - signal.start, 0):max(hi - signal.start, 0)], max(lo, signal.start))


IDENTITIES = {
    "1) ⟨A, B⋆C⟩ = ⟨C, B⋆A⟩": (lambda a, b, c, m: a.dot(corr(b, c, m)), lambda a, b, c, m: c.dot(corr(b, a, m))),
    "3) ⟨A, B⋆C⟩ = ⟨B, A∗C⟩": (lambda a, b, c, m: a.dot(corr(b, c, m)), lambda a, b, c, m: b.dot(conv(a, c, m))),
    "4) ⟨A, B∗C⟩ = ⟨B, A⋆C⟩": (lambda a, b, c, m: a.dot(conv(b, c, m)), lambda a, b, c, m: b.dot(corr(a, c, m))),
    "2) corrected: ⟨A, B∗C⟩ = ⟨C, A⋆B⟩": (lambda a, b, c, m: a.dot(conv(b, c, m)), lambda a, b, c, m: c.dot(corr(a, b, m))),
}
WRONG = {
    "2) as printed: ⟨A, B∗C⟩ = ⟨A, B∗A⟩": (lambda a, b, c: a.dot(conv(b, c)), lambda a, b, c: a.dot(conv(b, a))),
    "2) ⋆↔∗ in 1): ⟨A, B∗C⟩ = ⟨C, B∗A⟩": (lambda a, b, c: a.dot(conv(b, c)), lambda a, b, c: c.dot(conv(b, a))),
}


def identities() -> float:
    """Every identity with zero extension (exact) and with "valid" outputs (broken at the boundary)."""
    rng = np.random.default_rng(0)
    a, b, c = Signal(rng.normal(size=9)), Signal(rng.normal(size=9)), Signal(rng.normal(size=3))
    print("Seed 000 §6.2 on finite signals A, B (9 samples) and C (3 samples), all starting at index 0:")
    print(f"{'identity':38} {'zero-extended: left':>20} {'right':>20} {'gap':>8}   {'valid only: left':>16} {'right':>10}")
    worst_exact, worst_valid = 0.0, 0.0
    for name, (left, right) in IDENTITIES.items():
        lf, rf, lv, rv = left(a, b, c, "full"), right(a, b, c, "full"), left(a, b, c, "valid"), right(a, b, c, "valid")
        gap = abs(lf - rf) / abs(lf)
        worst_exact, worst_valid = max(worst_exact, gap), max(worst_valid, abs(lv - rv) / max(abs(lv), abs(rv)))
        print(f"{name:38} {lf:+20.15f} {rf:+20.15f} {gap:8.1e}   {lv:+16.6f} {rv:+10.6f}")
    for name, (left, right) in WRONG.items():
        lf, rf = left(a, b, c), right(a, b, c)
        print(f"{name:38} {lf:+20.15f} {rf:+20.15f} {abs(lf - rf) / abs(lf):8.1e}   false even with zero extension")
        assert abs(lf - rf) > 1e-3 * abs(lf), f"{name} should not hold"
    print(f"With zero extension every identity holds to {worst_exact:.1e}; with valid-only outputs (no padding) the "
          f"boundary terms are lost and they break by up to {worst_valid:.0%}.")
    assert worst_exact <= 1e-12 and worst_valid > 1e-3
    return worst_exact


def rules() -> list[compare.Row]:
    rng = np.random.default_rng(1)
    x, t, b = rng.normal(size=4), rng.normal(size=3), rng.normal(size=3)
    w = rng.normal(size=(3, 4))  # the seed's w ∈ R^{m×n}, y = w x; manualgrad's dense weight is wᵀ
    # Linear → Add → MSE, one sample: y = w x + b, L = ½‖y − t‖², so dy = y − t (seed 000 §3).
    y = w @ x + b
    dy = y - t
    hand = {"dx": w.T @ dy, "dw": np.outer(dy, x), "db": dy}

    def chain(fns):
        dense, bias_add, mse = fns
        return lambda x, wt, b: mse(bias_add(dense(x[None], wt), b), t[None])

    vjp_rules = chain((mg.dense, mg.bias_add, mg.mse))
    ref_rules = chain(tuple(registry.get(n).reference for n in ("dense", "bias_add", "mse")))
    manual = jax.grad(vjp_rules, argnums=(0, 1, 2))(x, w.T, b)
    auto = jax.grad(ref_rules, argnums=(0, 1, 2))(x, w.T, b)
    _, alg = backprop.gradients([Layer("dense")], [(w.T, b)], x[None], t[None], "mse")
    rows = [
        compare.Row("MSE: dx = dy·(x − y*)", y - t, jax.grad(mg.mse)(y[None], t[None])[0], None,
                    jax.grad(registry.get("mse").reference)(y[None], t[None])[0]),
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
