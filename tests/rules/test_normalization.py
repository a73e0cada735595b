"""Normalisation and dropout: PyTorch's numbers, constant channels, dropout's mask, bad input,
and the mistakes the planted mutations (``tests/mutations/normalization.py``) cannot carry.

The registry-wide checks (every check in both dtypes, the module order, the exercises, the
planted mutations and their diagnoses) run in ``test_rules.py``, ``test_exercise.py`` and
``test_checker.py``.
"""

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad import cli
from manualgrad.check import diagnose
from manualgrad.rules import normalization as nz

f32, f64 = jnp.float32, jnp.float64
RNG = np.random.default_rng(13)
X = jnp.asarray(RNG.standard_normal((3, 4, 5, 6)) * 2 + 0.5)  # NHWC, C = 6
GAMMA, BETA = jnp.asarray(RNG.standard_normal(6) * 0.5 + 1), jnp.asarray(RNG.standard_normal(6))
G = jnp.asarray(RNG.standard_normal(X.shape))


def _pull(fn, *args):
    """The output and the hand VJP of ``fn`` at ``args`` under ``G``."""
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(G.astype(out.dtype))


# --------------------------------------------------------------------------- PyTorch


def _torch_reason():
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch==2.13.0 installs the local CPU wheel)"
    return None


def _torch_cases():
    """(name, manualgrad call on NHWC arrays, the same in PyTorch on the NCHW transpose)."""
    import torch.nn.functional as F

    def nchw(a):
        return a.permute(0, 3, 1, 2)

    return [
        (
            "batch_norm",
            lambda x, g, b: mg.batch_norm(x, g, b, 1e-5),
            lambda x, g, b: F.batch_norm(nchw(x), None, None, g, b, training=True, eps=1e-5).permute(0, 2, 3, 1),
        ),
        ("layer_norm", lambda x, g, b: mg.layer_norm(x, g, b, 1e-5), lambda x, g, b: F.layer_norm(x, (6,), g, b, 1e-5)),
        (
            "group_norm",
            lambda x, g, b: mg.group_norm(x, g, b, 3, 1e-5),
            lambda x, g, b: F.group_norm(nchw(x), 3, g, b, 1e-5).permute(0, 2, 3, 1),
        ),
        ("rms_norm", lambda x, g, b: mg.rms_norm(x, g, 1e-6), lambda x, g, b: F.rms_norm(x, (6,), g, 1e-6)),
    ]


@pytest.mark.skipif(_torch_reason() is not None, reason=str(_torch_reason()))
# sync_batch_norm, a collective, is compared with batch_norm of the whole batch in test_collectives.py.
@pytest.mark.parametrize("name", [r.name for r in mg.rules() if r.name.endswith("_norm") and not r.split])
def test_equal_to_pytorch_forward_and_gradients(name):
    import torch

    ours, theirs = {case: (a, b) for case, a, b in _torch_cases()}[name]
    out, grads = _pull(ours, X, GAMMA, BETA)
    tensors = [torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in (X, GAMMA, BETA)]
    expected = theirs(*tensors)
    expected.backward(torch.tensor(np.asarray(G)))
    # Both sides compute in float64 by different formulas: agreement to 1e-12 is round-off.
    np.testing.assert_allclose(np.asarray(out), expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, t in zip(grads, tensors):
        reference = np.zeros(t.shape) if t.grad is None else t.grad.numpy()  # rms_norm ignores beta
        np.testing.assert_allclose(np.asarray(mine), reference, rtol=1e-10, atol=1e-11, err_msg=name)


# --------------------------------------------------------------------------- constant channels


@pytest.mark.parametrize(
    "call, reference, constant",
    [
        (
            lambda x: mg.batch_norm(x, GAMMA, BETA),
            lambda x: nz.batch_norm_reference(x, GAMMA, BETA),
            lambda x: x.at[..., 2].set(0.7),
        ),
        (
            lambda x: mg.group_norm(x, GAMMA, BETA, 6),
            lambda x: nz.group_norm_reference(x, GAMMA, BETA, 6),
            lambda x: x.at[1, ..., 2].set(0.7),
        ),
        (
            lambda x: mg.layer_norm(x, GAMMA, BETA),
            lambda x: nz.layer_norm_reference(x, GAMMA, BETA),
            lambda x: x.at[1, 2, 3].set(0.7),
        ),
    ],
    ids=["batch_norm", "group_norm (groups = C)", "layer_norm (a constant row)"],
)
def test_a_constant_channel_normalises_to_beta_with_finite_gradients(call, reference, constant):
    """At the default ε: ``v = 0``, so ``x̂`` is the round-off of ``x − μ`` (about 1e-16) over
    ``√ε``, a few 1e-14 at most, and ``1/σ = 1/√ε`` keeps the gradient finite."""
    x = constant(X)
    where = np.asarray(constant(jnp.zeros(X.shape))) == 0.7
    out, (dx,) = _pull(call, x)
    np.testing.assert_allclose(
        np.asarray(out)[where], np.broadcast_to(np.asarray(BETA), X.shape)[where], rtol=0, atol=1e-12
    )
    assert np.all(np.isfinite(np.asarray(dx)))
    # Against the reference's autodiff: 1/√ε ≈ 316 scales the round-off of both.
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jax.vjp(reference, x)[1](G)[0]), rtol=1e-10, atol=1e-10)


def test_a_zero_row_of_rms_norm_is_zero_with_finite_gradients():
    x = X.at[0, 1, 2].set(0.0)
    out, (dx,) = _pull(lambda a: mg.rms_norm(a, GAMMA), x)
    assert np.all(np.asarray(out)[0, 1, 2] == 0) and np.all(np.isfinite(np.asarray(dx)))
    # There 1/r = 1/√ε: dx = γ G/√ε exactly (x̂ = 0 removes the path through r).
    np.testing.assert_allclose(np.asarray(dx)[0, 1, 2], np.asarray(GAMMA * G[0, 1, 2] / np.sqrt(1e-6)), rtol=1e-12)


# --------------------------------------------------------------------------- residuals and dtypes


def test_batch_norm_saves_xhat_and_one_over_sigma_not_x():
    _, (xhat, inv, gamma) = nz.batch_norm_forward(X, GAMMA, BETA)
    mu, var = np.mean(np.asarray(X), axis=(0, 1, 2)), np.var(np.asarray(X), axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(xhat), (np.asarray(X) - mu) / np.sqrt(var + 1e-5), rtol=1e-12, atol=1e-12)
    assert inv.shape == (1, 1, 1, 6) and gamma is GAMMA
    np.testing.assert_allclose(np.ravel(inv), 1 / np.sqrt(var + 1e-5), rtol=1e-12)


@pytest.mark.parametrize(
    "name, call",
    [
        ("batch_norm", lambda x, g, b: mg.batch_norm(x, g, b)),
        ("layer_norm", lambda x, g, b: mg.layer_norm(x, g, b)),
        ("group_norm", lambda x, g, b: mg.group_norm(x, g, b, 2)),
        ("rms_norm", lambda x, g, b: mg.rms_norm(x, g)),
    ],
)
def test_statistics_and_gradients_in_the_inputs_dtype(name, call):
    args = [a.astype(f32) for a in (X, GAMMA, BETA)]
    out, grads = _pull(call, *args)
    assert out.dtype == f32 and all(g.dtype == f32 for g in grads)
    residuals = jax.tree_util.tree_leaves(
        mg.get(name).fn.fwd(*args[: 2 if name == "rms_norm" else 3], *([2] if name == "group_norm" else []))[1]
    )
    assert all(r.dtype == f32 for r in residuals)


# --------------------------------------------------------------------------- dropout


def test_dropout_same_key_same_mask_and_rate_zero_is_the_identity():
    x = jnp.asarray(RNG.standard_normal((50, 40)))
    key = jax.random.key(3)
    y = mg.dropout(x, key, 0.25)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(mg.dropout(x, key, 0.25)))
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.75, rtol=1e-15)
    # 2000 Bernoulli(0.75) draws: the kept fraction is within 4 standard deviations (0.039) of 0.75.
    assert abs(kept.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / kept.size)
    assert not np.array_equal(kept, np.asarray(mg.dropout(x, jax.random.key(4), 0.25)) != 0)
    # The mask does not depend on x's dtype, nor on the kind of key holding the same bits.
    np.testing.assert_array_equal(np.asarray(mg.dropout(x.astype(f32), key, 0.25)) != 0, kept)
    np.testing.assert_array_equal(np.asarray(mg.dropout(x, jax.random.key_data(key), 0.25)) != 0, kept)
    np.testing.assert_array_equal(np.asarray(mg.dropout(x, key, 0.0)), np.asarray(x))


def test_dropout_key_gets_a_float0_cotangent_and_vmaps_over_keys():
    x = jnp.asarray(RNG.standard_normal((4, 5)))
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        y, pullback = jax.vjp(lambda a, k: mg.dropout(a, k, 0.5), x, key)
        dx, dkey = pullback(jnp.ones_like(y))
        assert dkey.dtype == jax.dtypes.float0 and dkey.shape == key.shape
        np.testing.assert_array_equal(np.asarray(dx), np.where(np.asarray(y) != 0, 2.0, 0.0))
    keys = jax.random.split(jax.random.key(1), 3)
    stacked = jax.vmap(lambda k: mg.dropout(x, k, 0.5))(keys)
    for k, y in zip(keys, stacked):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(mg.dropout(x, k, 0.5)))


# --------------------------------------------------------------------------- bad input

KEY = jax.random.PRNGKey(0)
CASES = [
    (
        mg.RuleInputError,
        r"^batch_norm: gamma must have shape \(6,\) to match the channels \(last axis\) of x "
        r"\(x: \(3, 4, 5, 6\), gamma: \(5,\)\)",
        lambda: mg.batch_norm(X, GAMMA[:5], BETA),
    ),
    (
        mg.RuleInputError,
        r"^layer_norm: beta must have shape \(6,\) .* \(x: \(3, 4, 5, 6\), beta: \(1, 6\)\)",
        lambda: mg.layer_norm(X, GAMMA, BETA[None]),
    ),
    (mg.RuleInputError, r"^rms_norm: gamma must have shape \(6,\)", lambda: mg.rms_norm(X, jnp.ones(3))),
    (
        mg.RuleInputError,
        r"^group_norm: groups must be a positive Python int that divides the 6 channels of x, "
        r"got 4 \(x: \(3, 4, 5, 6\)\)",
        lambda: mg.group_norm(X, GAMMA, BETA, 4),
    ),
    (mg.RuleInputError, r"^group_norm: groups must be .* got 2.0", lambda: mg.group_norm(X, GAMMA, BETA, 2.0)),
    (
        mg.RuleInputError,
        r"^group_norm: x must have at least 2 axes \(N, \*spatial, C\), got shape \(6,\)",
        lambda: mg.group_norm(GAMMA, GAMMA, BETA, 2),
    ),
    (
        mg.RuleInputError,
        r"^batch_norm: each channel needs more than one value to normalise over, got 1 \(x: \(1, 6\)\)",
        lambda: mg.batch_norm(X[:1, 0, 0], GAMMA, BETA),
    ),
    (
        mg.RuleInputError,
        r"^batch_norm: eps must be a Python number > 0 .* got 0",
        lambda: mg.batch_norm(X, GAMMA, BETA, 0),
    ),
    (
        mg.RuleDTypeError,
        r"^batch_norm: x must be a floating-point array, got int32 with shape \(2, 3\)",
        lambda: mg.batch_norm(jnp.ones((2, 3), jnp.int32), jnp.ones(3), jnp.ones(3)),
    ),
    (
        mg.RuleDTypeError,
        r"^layer_norm: gamma must be a floating-point array, got int32",
        lambda: mg.layer_norm(X, jnp.ones(6, jnp.int32), BETA),
    ),
    (
        mg.RuleDTypeError,
        r"^rms_norm: arguments must share one dtype, got x: float32, gamma: float64",
        lambda: mg.rms_norm(X.astype(f32), GAMMA),
    ),
    (
        mg.RuleInputError,
        r"^dropout: rate must be a Python number in \[0, 1\), .* got 1.0",
        lambda: mg.dropout(X, KEY, 1.0),
    ),
    (mg.RuleInputError, r"^dropout: rate must be .* got -0.1", lambda: mg.dropout(X, KEY, -0.1)),
    (
        mg.RuleDTypeError,
        r"^dropout: key must be one PRNG key, jax.random.key\(seed\) or jax.random.PRNGKey\(seed\) "
        r"\(uint32 of shape \(2,\)\), got float32 with shape \(2,\)",
        lambda: mg.dropout(X, jnp.zeros(2, f32), 0.5),
    ),
    (
        mg.RuleInputError,
        r"^dropout: key must be one PRNG key.* got uint32 with shape \(3, 2\)",
        lambda: mg.dropout(X, jax.random.split(KEY, 3), 0.5),
    ),
    (
        mg.RuleDTypeError,
        r"^dropout: x must be a floating-point array, got int32",
        lambda: mg.dropout(jnp.ones(3, jnp.int32), KEY, 0.5),
    ),
]


@pytest.mark.parametrize("error, message, call", CASES, ids=[c[1][1:40] for c in CASES])
def test_clear_error(error, message, call):
    with pytest.raises(error, match=message):
        call()
    with pytest.raises(error, match=message):
        jax.jit(lambda: call())()


# --------------------------------------------------------------------------- mistakes beyond the mutations


def test_dgamma_not_summed_is_diagnosed_as_a_broadcast_axis_left_in():
    """A shape-changing mistake: ``custom_vjp`` refuses it, so the diagnosis reads the raw
    backward (:func:`manualgrad.diagnose.diagnose_raw`). ``dγ = G ⊙ x̂`` not summed at all,
    ``dβ`` summed over the batch but not over H and W."""
    rule = mg.get("batch_norm")

    def not_summed(eps, res, g):
        xhat, inv, gamma = res
        dgamma, dbeta = nz.batch_norm_gradient(xhat, g)
        return nz.batch_norm_backward(xhat, inv, gamma, dgamma, dbeta, g), g * xhat, jnp.sum(g, axis=0)

    @functools.wraps(rule.fn.fun)
    def fn(*args):
        return rule.fn(*args)

    wrong = jax.custom_vjp(fn, nondiff_argnums=rule.fn.nondiff_argnums)
    wrong.defvjp(nz.batch_norm_forward, not_summed)
    planted = dataclasses.replace(rule, fn=wrong, name="batch_norm (planted)")
    for sample in rule.sample_inputs(jax.random.PRNGKey(0), f64):
        x = sample.args[0]
        g = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))
        found = diagnose.diagnose_raw(planted, sample.args, g, "float64")
        assert set(found) == ({1, 2} if x.ndim > 2 else {1}), sample.label  # (N, C): Σ over N is all of dβ
        assert found[1].diagnosis == (
            f"your gradient equals the right one with axis {tuple(range(x.ndim - 1)) if x.ndim > 2 else 0} "
            f"not summed: a broadcast axis left in (shape {x.shape}, expected {x.shape[-1:]})"
        )
        if x.ndim > 2:
            assert f"axis {tuple(range(x.ndim - 2)) if x.ndim > 3 else 0} not summed" in found[2].diagnosis


def test_the_candidates_do_not_name_the_right_answer():
    """Every usual mistake differs from the right answer on the first sample of each rule,
    so a right backward is never "explained" by one."""
    for name in ("batch_norm", "layer_norm", "group_norm", "rms_norm", "dropout"):
        rule = mg.get(name)
        args = rule.sample_inputs(jax.random.PRNGKey(0), f64)[0].args
        g = jnp.asarray(np.random.default_rng(0).standard_normal(jnp.shape(rule.fn(*args))))
        for i in rule.differentiable:
            right = diagnose.vjp(
                lambda a, i=i, args=args, rule=rule: rule.reference(*args[:i], a, *args[i + 1 :]), args[i], g
            )
            assert diagnose.diagnose(rule, args, i, right, g, "float64") == diagnose.NO_EXPLANATION


# The closed form written by hand, as a student would (the library's own backward scores 0 in grade).
BATCH_NORM_BY_HAND = (
    "    xhat, inv, gamma = residuals\n"
    "    axes = tuple(range(g.ndim - 1))\n"
    "    per_channel = (1,) * (g.ndim - 1) + (-1,)\n"
    "    m = g.size // g.shape[-1]\n"
    "    dgamma, dbeta = jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)\n"
    "    dx = jnp.reshape(gamma, per_channel) * inv / m * (\n"
    "        m * g - jnp.reshape(dbeta, per_channel) - xhat * jnp.reshape(dgamma, per_channel))\n"
    "    return dx, dgamma, dbeta\n"
)


def test_batch_norm_exercise_solved_by_hand_gets_full_marks(tmp_path, capsys):
    from teach.test_exercise import _write

    assert cli.main(["grade", str(_write(tmp_path, "batch_norm", BATCH_NORM_BY_HAND))]) == 0
    out = capsys.readouterr().out
    assert "score: 6/6 checks passed" in out and "FAIL" not in out


# The backward as the derivation reads: M drawn from the key again, its probability a Python float.
DROPOUT_FLOAT64_MASK = (
    "    keep = jax.random.bernoulli(residuals, 1 - rate, g.shape)\n"
    "    return jnp.where(keep, g / (1 - rate), 0.0), None\n"
)


def test_dropout_exercise_says_how_the_mask_is_drawn_and_names_a_float64_draw(tmp_path, capsys):
    """Graded with x64 on, ``bernoulli(key, 1 − rate)`` draws float64 uniforms, another mask
    than the forward's float32 ones: the exercise must say how ``M`` is drawn, and the grade name the slip."""
    from teach.test_exercise import _write

    path = _write(tmp_path, "dropout", DROPOUT_FLOAT64_MASK)
    assert "jax.random.bernoulli(key, np.float32(1 − rate), x.shape)" in path.read_text()
    assert cli.main(["grade", "--in-process", str(path)]) == 1
    assert (
        "diagnosis: dropout, argument x: your gradient equals the right one for the mask drawn with the "
        "probability in float64 (jax.random.bernoulli(key, 1 − rate, shape) with x64 on)"
    ) in capsys.readouterr().out


def test_a_rank_promoting_backward_is_told_to_broadcast_explicitly(tmp_path, capsys):
    """``γ * G`` with ``γ`` of shape ``(C,)`` is NumPy's broadcasting, which the checks refuse:
    the grade says so and how to write it, instead of JAX's message alone."""
    from teach.test_exercise import _write

    body = BATCH_NORM_BY_HAND.replace("jnp.reshape(gamma, per_channel)", "gamma")
    assert cli.main(["grade", "--in-process", str(_write(tmp_path, "batch_norm", body))]) == 1
    out = capsys.readouterr().out
    assert (
        "the checks refuse NumPy's implicit rank promotion (jax_numpy_rank_promotion='raise'): give the "
        "array of fewer axes its size-1 axes yourself, e.g. jnp.reshape(v, (1,) * (g.ndim - 1) + (-1,)) "
        "for a (C,) vector v"
    ) in out
