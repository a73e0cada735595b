"""The signal rules (``manualgrad/rules/correlation.py``): numpy's semantics, the cross-checker, seed 000's
adjoint identities on finite signals, known values, bad input, and planted mistakes.
Every check of the cross-checker runs on both rules in ``tests/rules/test_rules.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad.rules import correlation
from manualgrad.rules.windows import MODES, mode_window

NAMES = ("correlate1d", "convolve1d")


@pytest.fixture(scope="module")
def sig():
    return correlation


def rule_fns(sig):
    return {"correlate1d": (sig.correlate1d, np.correlate), "convolve1d": (sig.convolve1d, np.convolve)}


# --------------------------------------------------------------------------- numpy's semantics

PAIRS = [(n, k) for n in (1, 2, 3, 4, 7) for k in (1, 2, 3, 5, 8)]


def test_forward_matches_numpy(sig):
    """Both rules and their references, every mode, N from 1 to 7 and K from 1 to 8 (K > N too)."""
    rules = {name: (fn, np_fn, manualgrad.get(name).reference) for name, (fn, np_fn) in rule_fns(sig).items()}

    @jax.jit  # one program per (N, K): compiling is what costs here
    def outputs(x, w):
        return {
            (name, mode): (fn(x, w, mode), ref(x, w, mode)) for name, (fn, _, ref) in rules.items() for mode in MODES
        }

    rng = np.random.default_rng(0)
    for n, k in PAIRS:
        x, w = rng.normal(size=n), rng.normal(size=k)
        for (name, mode), pair in outputs(x, w).items():
            expected = rules[name][1](x, w, mode)
            for got in pair:
                np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-14, err_msg=f"{name} {n=} {k=} {mode}")


def test_facts_about_numpy_windows(sig):
    """The window arithmetic the rules rely on, measured on numpy itself."""
    rng = np.random.default_rng(1)
    for n, k in PAIRS:
        x, w = rng.normal(size=n), rng.normal(size=k)
        full = np.correlate(x, w, "full")
        shifts = np.array([sum(x[s + j] * w[j] for j in range(k) if 0 <= s + j < n) for s in range(-(k - 1), n)])
        np.testing.assert_allclose(full, shifts, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(full, np.convolve(x, w[::-1], "full"), rtol=1e-13, atol=1e-14)
        for rule, np_fn in (("correlate1d", np.correlate), ("convolve1d", np.convolve)):
            full = np_fn(x, w, "full")
            for mode in MODES:
                pad = mode_window(rule, n, k, mode)
                start = pad.offset + k - 1
                np.testing.assert_array_equal(np_fn(x, w, mode), full[start : start + pad.length])


def test_batch_axis_is_independent_samples(sig):
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(3, 5)), rng.normal(size=7)
    for fn, np_fn in rule_fns(sig).values():
        for mode in MODES:
            expected = np.stack([np_fn(row, w, mode) for row in x])
            np.testing.assert_allclose(fn(x, w, mode), expected, rtol=1e-13, atol=1e-14)


def test_samples_cover_the_awkward_cases():
    for name in NAMES:
        labels = " ".join(s.label for s in manualgrad.get(name).sample_inputs(jax.random.PRNGKey(0), "float32"))
        for case in ("valid", "same", "full", "N > K", "N < K", "N == K", "K == 1", "batch 1", "odd K", "even K"):
            assert case in labels


# --------------------------------------------------------------------------- seed 000 §6.2 on finite signals


def _inner(a, b):
    """⟨A, B⟩ of two finite signals ``(values, first index)``, both read as zero elsewhere."""
    (va, oa), (vb, ob) = a, b
    lo, hi = max(oa, ob), min(oa + len(va), ob + len(vb))
    return float(np.dot(va[lo - oa : hi - oa], vb[lo - ob : hi - ob])) if hi > lo else 0.0


def test_adjoint_identities_hold_for_zero_extended_signals(sig):
    """Seed 000 §6.2, 1)–4), with B ⋆ C and B ∗ C taken in mode 'full' (all shifts).

    A signal is ``(values, first index)``: ``(B ⋆ C)_i = Σ_j B_{i+j} C_j`` starts at index
    ``o_B − o_C − (K_C − 1)``, ``(B ∗ C)_i = Σ_j B_{i−j} C_j`` at ``o_B + o_C``.
    """

    def corr(b, c):
        return np.asarray(sig.correlate1d(b[0], c[0], "full")), b[1] - c[1] - (len(c[0]) - 1)

    def conv(b, c):
        return np.asarray(sig.convolve1d(b[0], c[0], "full")), b[1] + c[1]

    rng = np.random.default_rng(3)
    for _ in range(3):
        # lengths ≥ 4 and first indices in −1 … 1, so that every inner product has overlapping supports
        a, b, c = ((rng.normal(size=rng.integers(4, 8)), int(rng.integers(-1, 2))) for _ in range(3))
        lhs_corr, lhs_conv = _inner(a, corr(b, c)), _inner(a, conv(b, c))
        identities = {
            "1) ⟨A, B⋆C⟩ = ⟨C, B⋆A⟩": (lhs_corr, _inner(c, corr(b, a))),
            "2) ⟨A, B∗C⟩ = ⟨C, A⋆B⟩": (lhs_conv, _inner(c, corr(a, b))),
            "3) ⟨A, B⋆C⟩ = ⟨B, A∗C⟩": (lhs_corr, _inner(b, conv(a, c))),
            "4) ⟨A, B∗C⟩ = ⟨B, A⋆C⟩": (lhs_conv, _inner(b, corr(a, c))),
        }
        for label, (left, right) in identities.items():
            assert abs(left) > 1e-3, label  # the supports overlap: not 0 = 0
            assert left == pytest.approx(right, rel=1e-12, abs=1e-12), label
        # Identity 2 as printed ("just interchanging" 1): ⟨A, B∗C⟩ = ⟨C, B∗A⟩ is false.
        assert abs(lhs_conv - _inner(c, conv(b, a))) > 1e-6


def test_naive_valid_identity_drops_boundary_terms(sig):
    """The seed's question: identity 3 with the cotangent cropped like the output fails.

    y = valid(x ⋆ w) has shifts 0 … N−K. ``dy ∗ w`` in the same mode ('valid') covers only
    ``p = K−1 … N−K``: the terms with ``p − j`` outside the window, at the first and last
    ``K − 1`` entries of ``x``, are dropped. Zero-extending ``dy`` (mode 'full', the adjoint
    of the crop) restores them, and that is the rule's backward pass.
    """
    rng = np.random.default_rng(4)
    n, k = 9, 3
    x, w, dy = rng.normal(size=n), rng.normal(size=k), rng.normal(size=n - k + 1)
    lhs = float(np.dot(dy, sig.correlate1d(x, w, "valid")))

    naive = float(np.dot(x[k - 1 : n - k + 1], sig.convolve1d(dy, w, "valid")))
    assert abs(lhs - naive) > 1e-3

    extended = np.asarray(sig.convolve1d(dy, w, "full"))  # dy zero-extended over all shifts
    assert len(extended) == n
    assert float(np.dot(x, extended)) == pytest.approx(lhs, rel=1e-12)
    boundary = np.r_[0 : k - 1, n - k + 1 : n]
    assert float(np.dot(x[boundary], extended[boundary])) == pytest.approx(lhs - naive, rel=1e-12)
    np.testing.assert_allclose(
        sig.correlate1d_backward(jnp.asarray(w), n, "valid", jnp.asarray(dy)), extended, rtol=1e-13, atol=1e-14
    )


@pytest.mark.parametrize("k, holds", [(3, True), (4, False)])
def test_naive_same_identity_holds_only_for_odd_k(sig, k, holds):
    """⟨dy, same(x ⋆ w)⟩ = ⟨x, same(dy ∗ w)⟩ only when 'same' is centred, i.e. K odd."""
    rng = np.random.default_rng(5)
    x, w, dy = rng.normal(size=8), rng.normal(size=k), rng.normal(size=8)
    lhs = float(np.dot(dy, sig.correlate1d(x, w, "same")))
    rhs = float(np.dot(x, sig.convolve1d(dy, w, "same")))
    assert (abs(lhs - rhs) <= 1e-12 * abs(lhs)) == holds


# --------------------------------------------------------------------------- known values


def _vjp(fn, x, w, mode, g):
    y, pull = jax.vjp(lambda x, w: fn(x, w, mode), jnp.asarray(x), jnp.asarray(w))
    return (np.asarray(y), *(np.asarray(d) for d in pull(jnp.asarray(g))))


def test_known_values(sig):
    x, w = [1.0, 2.0, 3.0], [1.0, 0.0, -1.0]
    # correlation, valid: y_0 = 1·1 + 2·0 + 3·(−1) = −2; dx = dy·w, dw = dy·x
    y, dx, dw = _vjp(sig.correlate1d, x, w, "valid", [2.0])
    np.testing.assert_array_equal(y, [-2.0])
    np.testing.assert_array_equal(dx, [2.0, 0.0, -2.0])
    np.testing.assert_array_equal(dw, [2.0, 4.0, 6.0])
    # correlation, full: shifts −2 … 2; the cotangent picks shift −2, y = x_0 w_2
    y, dx, dw = _vjp(sig.correlate1d, x, w, "full", [1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(y, [-1.0, -2.0, -2.0, 2.0, 3.0])
    np.testing.assert_array_equal(dx, [-1.0, 0.0, 0.0])
    np.testing.assert_array_equal(dw, [0.0, 0.0, 1.0])
    # convolution, valid: y_0 = Σ_j x_{2−j} w_j = 3 − 1 = 2; dx_p = dy·w_{2−p}, dw_j = dy·x_{2−j}
    y, dx, dw = _vjp(sig.convolve1d, x, w, "valid", [2.0])
    np.testing.assert_array_equal(y, [2.0])
    np.testing.assert_array_equal(dx, [-2.0, 0.0, 2.0])
    np.testing.assert_array_equal(dw, [6.0, 4.0, 2.0])
    # K > N, 'same': symmetric w, so x ⋆ w and x ∗ w have the same full output [1, 3, 3, 2],
    # but numpy.correlate keeps [3, 3, 2] and numpy.convolve [1, 3, 3]
    x, w = [1.0, 2.0], [1.0, 1.0, 1.0]
    assert list(np.correlate(x, w, "same")) == [3.0, 3.0, 2.0] and list(np.convolve(x, w, "same")) == [1.0, 3.0, 3.0]
    y, dx, dw = _vjp(sig.correlate1d, x, w, "same", [1.0, 0.0, 0.0])  # y_0 = shift −1 = x_0 w_1 + x_1 w_2
    np.testing.assert_array_equal(y, [3.0, 3.0, 2.0])
    np.testing.assert_array_equal(dx, [1.0, 1.0])
    np.testing.assert_array_equal(dw, [0.0, 1.0, 2.0])
    y, dx, dw = _vjp(sig.convolve1d, x, w, "same", [1.0, 0.0, 0.0])  # y_0 = x_0 w_0
    np.testing.assert_array_equal(y, [1.0, 3.0, 3.0])
    np.testing.assert_array_equal(dx, [1.0, 0.0])
    np.testing.assert_array_equal(dw, [1.0, 0.0, 0.0])


def test_batch_gradient_sums_over_the_batch(sig):
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, dx, dw = _vjp(sig.correlate1d, x, [1.0, -1.0], "valid", np.ones((2, 2)))
    np.testing.assert_array_equal(dx, [[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    np.testing.assert_array_equal(dw, [1 + 2 + 4 + 5, 2 + 3 + 5 + 6])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(sig, name):
    fn = getattr(sig, name)
    x, w = jnp.ones(5), jnp.ones(3)
    with pytest.raises(
        manualgrad.RuleInputError, match=rf"^{name}: mode must be 'valid', 'same' or 'full', got 'circular'"
    ):
        fn(x, w, "circular")
    with pytest.raises(
        manualgrad.RuleInputError, match=rf"{name}: x must have shape \(N,\) or \(batch, N\).*\(2, 3, 5\)"
    ):
        fn(jnp.ones((2, 3, 5)), w)
    with pytest.raises(manualgrad.RuleInputError, match=rf"{name}: x must have shape"):
        fn(jnp.ones(()), w)
    with pytest.raises(manualgrad.RuleInputError, match=rf"{name}: x must have shape .* got shape \(2, 0\)"):
        fn(jnp.ones((2, 0)), w)
    with pytest.raises(manualgrad.RuleInputError, match=rf"{name}: w must be a non-empty 1-D filter .* \(3, 1\)"):
        fn(x, jnp.ones((3, 1)))
    with pytest.raises(manualgrad.RuleInputError, match=rf"{name}: w must be a non-empty 1-D filter"):
        fn(x, jnp.ones(0))
    with pytest.raises(manualgrad.RuleDTypeError, match=rf"{name}: x must be a floating-point array, got int"):
        fn(jnp.arange(5), w)
    with pytest.raises(manualgrad.RuleDTypeError, match=rf"{name}: arguments must share one dtype"):
        fn(x.astype(jnp.float32), w.astype(jnp.float64))
    backward = getattr(sig, f"{name}_backward")
    with pytest.raises(
        manualgrad.RuleInputError, match=rf"{name}: the cotangent must have shape \(3,\) for mode 'valid'"
    ):
        backward(w, 5, "valid", jnp.ones(4))


def test_rank_promotion_stays_raise_and_mode_is_static(sig):
    assert jax.config.jax_numpy_rank_promotion == "raise"
    x, w = jnp.ones((2, 5)), jnp.ones(3)
    f = jax.jit(lambda x, w: jnp.sum(sig.correlate1d(x, w, "same") ** 2))
    dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
    assert dx.shape == (2, 5) and dw.shape == (3,)
