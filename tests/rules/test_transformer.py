"""The rules of a transformer — embedding, gelu, softmax, log_softmax, attention — against PyTorch and
``jax.nn``, attention's O(T) residuals, its causal alignment for ``S ≠ T``, the planted mistakes
that wrong several arguments at once (``tests/mutations/attention.py``'s ``JOINT``), and the
exercises' grading.

The registry-wide checks (every check in both dtypes, the module order, the exercises, the
single-argument mutations and their diagnoses) run in ``test_rules.py``, ``test_exercise.py`` and
``test_checker.py``; the known values and the bad input in ``test_known_values.py`` and
``test_bad_input.py``.
"""

import importlib.util
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad import cli
from manualgrad.check.report import NOT_RUN
from manualgrad.rules import attention as attention_module
from manualgrad.rules.attention import _pulled_back, attention_forward
from manualgrad.teach import exercise
from mutations import mutant
from mutations.attention import JOINT


def _normal(*shape):
    """Standard normal draws, the same for the same shape whatever ran before."""
    return jnp.asarray(np.random.default_rng(shape).standard_normal(shape))


def _pull(fn, *args):
    """The output and the hand VJP of ``fn`` at ``args`` under a fixed random cotangent."""
    out, pullback = jax.vjp(fn, *args)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape))
    return out, g, pullback(g)


def _torch_reason():
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch==2.13.0 installs the local CPU wheel)"
    return None


needs_torch = pytest.mark.skipif(_torch_reason() is not None, reason=str(_torch_reason()))


def _torch_vjp(fn, args, g):
    """PyTorch's output and gradients of ``fn`` at ``args`` (float64) under the cotangent ``g``."""
    import torch

    tensors = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
    out = fn(*tensors)
    out.backward(torch.tensor(np.asarray(g)))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


# Both sides compute in float64 by different formulas, the values of order one: agreement to
# 1e-12 (relative and absolute) is round-off.
def _assert_round_off(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-12, atol=1e-12)


def _assert_equals_pytorch(q, k, v, causal):
    """``mg.attention`` and its VJP against PyTorch's ``scaled_dot_product_attention`` to round-off."""
    import torch.nn.functional as F

    out, g, grads = _pull(lambda q, k, v: mg.attention(q, k, v, causal=causal), q, k, v)

    def theirs(q, k, v):  # PyTorch's layout is (B, N, T, H); is_causal is top-left aligned there too
        heads_first = [a.permute(0, 2, 1, 3) for a in (q, k, v)]
        return F.scaled_dot_product_attention(*heads_first, is_causal=causal).permute(0, 2, 1, 3)

    expected, expected_grads = _torch_vjp(theirs, [q, k, v], g)
    _assert_round_off(out, expected)
    for mine, reference in zip(grads, expected_grads):
        _assert_round_off(mine, reference)


# --------------------------------------------------------------------------- gelu


def test_gelu_default_is_jax_nn_gelus():
    """The default form follows the installed ``jax.nn.gelu`` (tanh in jax 0.10 and 0.11)."""
    ours = inspect.signature(mg.gelu).parameters["approximate"].default
    assert ours is inspect.signature(jax.nn.gelu).parameters["approximate"].default is True


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_equals_jax_nn_gelu(approximate):
    z = jnp.linspace(-6.0, 6.0, 121)
    np.testing.assert_array_equal(mg.gelu(z, approximate), jax.nn.gelu(z, approximate))  # the same formula
    ours = jax.vmap(jax.grad(lambda x: mg.gelu(x, approximate)))(z)
    theirs = jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate)))(z)
    # jax.grad of the tanh form cancels in 1 + tanh u and 1 − tanh² u for z ≪ 0 (our backward
    # does not): there both are tiny, and the difference stays below 1e-13 in absolute terms.
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-12, atol=1e-13)


@needs_torch
@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_equals_pytorch(approximate):
    import torch.nn.functional as F

    z = _normal(4, 5) * 2
    out, g, (dz,) = _pull(lambda z: mg.gelu(z, approximate), z)
    expected, (expected_dz,) = _torch_vjp(lambda z: F.gelu(z, approximate="tanh" if approximate else "none"), [z], g)
    _assert_round_off(out, expected)
    _assert_round_off(dz, expected_dz)


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_reference_has_a_finite_gradient_far_in_the_tail(approximate):
    """float32 z = −60: e^{−2u} overflows, and jax.grad of 1/(1 + e^{−2u}) would be ∞/∞ = NaN (the
    GPT's cross-check once printed nan). The reference's gradient is the rule's: 0 (F' ≈ −z φ(z) < 1e-700)."""
    z = jnp.array([-60.0, 0.5], jnp.float32)
    expected = jax.grad(lambda z: jnp.sum(mg.get("gelu").reference(z, approximate)))(z)
    np.testing.assert_array_equal(expected[0], 0.0)
    np.testing.assert_allclose(expected, jax.grad(lambda z: jnp.sum(mg.gelu(z, approximate)))(z), rtol=1e-6)


# --------------------------------------------------------------------------- softmax, log_softmax


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmaxes_equal_jax_nn_and_pytorch(name, axis):
    z = _normal(3, 4, 5) * 3
    out, g, (dz,) = _pull(lambda z: getattr(mg, name)(z, axis), z)
    _assert_round_off(out, getattr(jax.nn, name)(z, axis=axis))
    _assert_round_off(dz, jax.vjp(lambda z: getattr(jax.nn, name)(z, axis=axis), z)[1](g)[0])
    if _torch_reason() is None:
        import torch

        expected, (expected_dz,) = _torch_vjp(lambda z: getattr(torch, name)(z, axis), [z], g)
        _assert_round_off(out, expected)
        _assert_round_off(dz, expected_dz)


def test_log_softmax_keeps_the_digits_of_a_dominant_entry():
    """``y = −log(1 + e^{−30} + e^{−31})`` and ``∂y/∂z = 1 − p`` at the dominant entry, to 1e-15
    relative, where ``jax.nn.log_softmax`` (``log`` of a sum rounded near 1) keeps three digits."""
    z = jnp.array([30.0, 0.0, -1.0])
    rest = np.exp(-30.0) + np.exp(-31.0)
    y, pull = jax.vjp(mg.log_softmax, z)
    np.testing.assert_allclose(float(y[0]), -np.log1p(rest), rtol=1e-15)
    np.testing.assert_allclose(float(pull(jnp.array([1.0, 0.0, 0.0]))[0][0]), rest / (1 + rest), rtol=1e-15)
    assert abs(float(jax.nn.log_softmax(z)[0]) / -np.log1p(rest) - 1) > 1e-4


def test_log_softmax_reference_stays_finite_where_a_probability_underflows():
    """A trained model's confident row: e^{−200} underflows in float32, so log(softmax) would give −∞
    there and NaN in jax.grad of a loss that weights that entry by 0 (the GPT's cross-check once
    printed nan). The reference, like the rule, gives −200 and a finite gradient."""
    z = jnp.array([0.0, -200.0], jnp.float32)
    weights = jnp.array([1.0, 0.0], jnp.float32)
    reference = mg.get("log_softmax").reference
    np.testing.assert_array_equal(reference(z), [0.0, -200.0])
    expected = jax.grad(lambda z: -jnp.sum(weights * reference(z)))(z)
    np.testing.assert_array_equal(expected, jax.grad(lambda z: -jnp.sum(weights * mg.log_softmax(z)))(z))


# --------------------------------------------------------------------------- attention


def _qkv(t, s, b=2, n=3, h=4):
    rng = np.random.default_rng([b, t, s, n, h])
    return tuple(jnp.asarray(rng.standard_normal((b, r, n, h))) for r in (t, s, s))


# T = S, S < T (queries t ≥ S see every key) and S > T (the last keys are seen by none).
SIZES = [(4, 4), (6, 3), (3, 6), (1, 5)]


@needs_torch
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", SIZES)
def test_attention_equals_pytorch(t, s, causal):
    _assert_equals_pytorch(*_qkv(t, s), causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", SIZES)
def test_attention_equals_jax_nn_dot_product_attention(t, s, causal):
    """The same layout, scale and causal alignment as ``jax.nn``; its softmax runs in float32
    whatever the inputs' dtype, so the outputs agree to float32's round-off (values of order one)."""
    q, k, v = _qkv(t, s)
    out, g, grads = _pull(lambda q, k, v: mg.attention(q, k, v, causal=causal), q, k, v)
    expected, pullback = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal), q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=2e-6)
    for mine, reference in zip(grads, pullback(g)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(reference), rtol=0, atol=2e-6)


# Tiles of 4 (the backend's edge forced small): several tiles each way, ragged last tiles, S < T
# (query tiles past the keys) and S > T (key tiles no query sees under causal).
TILED = [(11, 11), (11, 6), (6, 11), (9, 3)]


@pytest.fixture
def tiles_of_4(monkeypatch):
    """The attention rule traced with tiles of 4; shapes of their own (batch 1, 2 heads of 3) so that
    no trace cached with the backend's tile is reused."""
    monkeypatch.setitem(attention_module.TILES, jax.default_backend(), 4)


@needs_torch
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", TILED)
def test_tiled_attention_equals_pytorch(t, s, causal, tiles_of_4):
    q, k, v = _qkv(t, s, b=1, n=2, h=3)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention_forward(q, k, v, causal))(q, k, v))
    assert "scan" in jaxpr and ("cond" in jaxpr) == (causal and s > 4)  # tiled; unseen key tiles skipped
    _assert_equals_pytorch(q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", TILED)
def test_tiled_attention_equals_the_whole_row_reference(t, s, causal, tiles_of_4):
    """The tiles against jax.grad of the whole-row reference, whether PyTorch is installed or not."""
    q, k, v = _qkv(t, s, b=1, n=2, h=3)
    out, g, grads = _pull(lambda q, k, v: mg.attention(q, k, v, causal=causal), q, k, v)
    expected, pullback = jax.vjp(lambda q, k, v: attention_module.attention_reference(q, k, v, causal), q, k, v)
    _assert_round_off(out, expected)
    for mine, reference in zip(grads, pullback(g)):
        _assert_round_off(mine, reference)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rows_dominated_by_one_logit(causal):
    """q and k drawn with scale 3: scores of spread 9, a row's largest probability 0.8 or more on
    average. Against
    jax.grad of the reference (and PyTorch where installed), with an absolute tolerance at the
    scale of the scores (100 ulps of 9²; the registry's samples keep entries of order one)."""
    q, k, v = (3 * a for a in _qkv(t=5, s=6, h=2))
    v = v / 3
    out, g, grads = _pull(lambda q, k, v: mg.attention(q, k, v, causal=causal), q, k, v)
    assert float(jnp.mean(jnp.max(jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(2)), -1))) > 0.8
    expected = jax.vjp(lambda q, k, v: mg.get("attention").reference(q, k, v, causal), q, k, v)[1](g)
    for mine, reference in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(reference), rtol=1e-12, atol=2e-12)


def test_attention_residuals_are_o_of_t():
    """Saved: q, k, v, the output and one log-sum-exp per row — nothing with a T × S axis pair."""
    q, k, v = _qkv(t=32, s=48)
    out, residuals = attention_forward(q, k, v, causal=True)
    assert [r.shape for r in residuals] == [q.shape, k.shape, v.shape, out.shape, (2, 3, 32)]  # (B, N, T)
    extra = sum(r.size for r in residuals) - q.size - k.size - v.size
    assert extra == out.size + 2 * 3 * 32  # where the probabilities alone would be B·N·T·S = 9216
    np.testing.assert_array_equal(residuals[3], out)


def test_attention_causal_is_given_by_name_and_traced_once():
    q, k, v = _qkv(t=4, s=4)
    assert not np.allclose(mg.attention(q, k, v, causal=True), mg.attention(q, k, v))
    np.testing.assert_array_equal(
        jax.jit(mg.attention, static_argnames="causal")(q, k, v, causal=True), mg.attention(q, k, v, causal=True)
    )


@pytest.mark.parametrize("causal", [False, True])
def test_the_flash_backward_is_the_gradient_of_the_pulled_back_pairing(causal):
    """The premise of the attention mistakes' wrong answers: with the forward's mask, ``ℓ`` and
    ``δ = rowsum(G ⊙ O)`` held, the gradient of ``Σ exp(S − ℓ)(G Vᵀ − δ)`` is the hand VJP."""
    q, k, v = _qkv(t=5, s=3)
    out, g, grads = _pull(lambda q, k, v: mg.attention(q, k, v, causal=causal), q, k, v)
    _, (_, _, _, _, lse) = attention_forward(q, k, v, causal)
    rowsum = jnp.einsum("btnh,btnh->bnt", g, out)
    pairing = jax.grad(lambda q, k, v: _pulled_back(q, k, v, g, lse, rowsum, causal), argnums=(0, 1, 2))(q, k, v)
    for mine, expected in zip(grads, pairing):
        _assert_round_off(mine, expected)


@pytest.mark.parametrize("mutation", JOINT, ids=lambda m: m.mistake)
def test_checker_catches_mistakes_in_several_arguments(mutation):
    """As ``tests/check/test_checker.py`` does for one argument: every failure names the rule and
    one of the wronged arguments, each of them fails, and every diagnosis names the mistake."""
    wrong = mutant(mutation)
    report = mg.check(wrong, checks=("vjp", "finite_diff", "adjoint"))
    failures = report.failures()
    arguments = set(mutation.argument.split(", "))
    assert all(f.rule == wrong.name for f in failures)
    ran = [f for f in failures if f.where != NOT_RUN]
    compared = [f for f in ran if f.check != "adjoint"]
    assert {f.argument for f in compared} == arguments
    assert {f.check for f in compared} == {"vjp", "finite_diff"}
    assert ("v" in arguments) == any(f.check == "adjoint" for f in ran)  # attention is linear in v
    diagnosed = [f for f in compared if f.check == "vjp"]
    assert diagnosed and all(mutation.diagnosis in f.diagnosis for f in diagnosed), [f.diagnosis for f in diagnosed]
    # A swap cannot even be returned where S ≠ T: dQ has k's shape, and custom_vjp refuses it, a failure named so.
    refused = {f.sample for f in failures if f.where == NOT_RUN}
    shapes = {
        s.label: s.args[0].shape[1] == s.args[1].shape[1] for s in wrong.sample_inputs(jax.random.PRNGKey(0), "float64")
    }
    assert refused == (
        {label for label, square in shapes.items() if not square} if "swapped" in mutation.mistake else set()
    )


# --------------------------------------------------------------------------- exercises

ATTENTION = """    q, k, v, o, lse = residuals
    p = jnp.exp(scores(q, k, causal) - lse[..., None])
    ds = p * (jnp.einsum("btnh,bsnh->bnts", g, v) - jnp.einsum("btnh,btnh->bnt", g, o)[..., None])
    scale = 1 / np.sqrt(q.shape[-1])
    dq, dk = jnp.einsum("bnts,bsnh->btnh", ds, k) * scale, jnp.einsum("bnts,btnh->bsnh", ds, q) * scale
    return dq, dk, jnp.einsum("bnts,btnh->bsnh", p, g)
"""
EMBEDDING_SET = """    ids, table = residuals
    return np.zeros(ids.shape, jax.dtypes.float0), jnp.zeros_like(table).at[ids].set(g)
"""


@pytest.mark.parametrize(
    "name, body, code, expected",
    [
        ("attention", ATTENTION, 0, "score: 7/7 checks passed"),
        (
            "embedding",
            EMBEDDING_SET,
            1,
            "diagnosis: embedding, argument table: your gradient equals the right one with .set instead of .add",
        ),
    ],
)
def test_exercises_grade_like_the_others(name, body, code, expected, tmp_path, capsys):
    """A hand solution of the attention exercise (the scores its file defines for the forward) passes every check;
    the embedding's scatter written with .set fails, diagnosed."""
    text = exercise.exercise(name)
    path = tmp_path / f"{name}_exercise.py"
    path.write_text(text[: text.index("    raise NotImplementedError(")] + body)
    assert cli.main(["grade", str(path)]) == code
    out, err = capsys.readouterr()
    assert err == "" and expected in out, out
