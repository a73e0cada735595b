"""The recurrences: PyTorch's numbers, the backward as one reverse scan over saved outputs, bad input,
and the exercise graded.

The registry-wide checks (every check in both dtypes, the module order, the exercises, the
planted mutations of ``tests/mutations/recurrence.py`` and their diagnoses) run in
``test_rules.py``, ``test_exercise.py`` and ``test_checker.py``.
"""

import importlib.util

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad import cli
from manualgrad.check import diagnose
from manualgrad.rules import mistakes
from manualgrad.rules import recurrence as rc

f32 = jnp.float32
RNG = np.random.default_rng(15)
N, T, D, H = 3, 6, 4, 5
X = jnp.asarray(RNG.standard_normal((N, T, D)) * 0.5)
H0, C0 = jnp.asarray(RNG.standard_normal((N, H)) * 0.5), jnp.asarray(RNG.standard_normal((N, H)) * 0.5)
G = jnp.asarray(RNG.standard_normal((N, T, H)))


def _weights(gates):
    scale = (D + H) ** -0.5
    return tuple(
        jnp.asarray(RNG.standard_normal(shape) * s)
        for shape, s in (((D, gates * H), scale), ((H, gates * H), scale), ((gates * H,), 0.5))
    )


RNN_W, LSTM_W = _weights(1), _weights(4)
CASES = {"rnn": (mg.rnn, (X, H0, *RNN_W)), "lstm": (mg.lstm, (X, H0, C0, *LSTM_W))}

# --------------------------------------------------------------------------- PyTorch


def _torch_reason():
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch==2.13.0 installs the local CPU wheel)"
    return None


def _torch_run(name, args):
    """PyTorch's output and gradients for the same numbers, float64: ``nn.RNN`` (tanh) or ``nn.LSTM``
    with ``weight_ih = w_xᵀ``, ``weight_hh = w_hᵀ``, ``bias_ih = b`` and ``bias_hh = 0``."""
    import torch

    x, *states, w_x, w_h, b = (torch.tensor(np.asarray(a), dtype=torch.float64) for a in args)
    module = (torch.nn.RNN if name == "rnn" else torch.nn.LSTM)(D, H, batch_first=True).double()
    with torch.no_grad():
        module.weight_ih_l0.copy_(w_x.T)
        module.weight_hh_l0.copy_(w_h.T)
        module.bias_ih_l0.copy_(b)
        module.bias_hh_l0.zero_()
    inputs = [t.requires_grad_() for t in (x, *(s[None] for s in states))]
    out, _ = module(inputs[0], inputs[1] if name == "rnn" else tuple(inputs[1:]))
    out.backward(torch.tensor(np.asarray(G)))
    weights = (module.weight_ih_l0.grad.T, module.weight_hh_l0.grad.T, module.bias_ih_l0.grad)
    return out.detach().numpy(), [t.grad.numpy().reshape(np.shape(a)) for t, a in zip(inputs, args)] + [
        w.numpy() for w in weights
    ]


@pytest.mark.skipif(_torch_reason() is not None, reason=str(_torch_reason()))
@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_equal_to_pytorch_forward_and_gradients(name):
    fn, args = CASES[name]
    out, pull = jax.vjp(fn, *args)
    expected_out, expected_grads = _torch_run(name, args)
    # Both sides compute in float64 by different formulas and summation orders: 1e-12 is round-off.
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=1e-12, atol=1e-13)
    for argname, mine, theirs in zip(mg.get(name).argnames, pull(G), expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(mine), theirs, rtol=1e-10, atol=1e-12, err_msg=f"{name}: {argname}")


# --------------------------------------------------------------------------- what the backward is


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_the_backward_is_one_reverse_scan_and_no_autodiff(name):
    """The VJP's program: one forward scan and one reverse scan (the hand BPTT), and nothing else loops."""
    fn, args = CASES[name]
    jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(fn, *a)[1](G))(*args)
    scans = [eqn for eqn in _equations(jaxpr.jaxpr) if eqn.primitive.name == "scan"]
    assert [eqn.params["reverse"] for eqn in scans] == [False, True]


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _equations(sub)


def test_rnn_saves_its_outputs_and_no_pre_activation():
    out, (x, h0, hs, w_x, w_h) = rc.rnn_forward(X, H0, *RNN_W)
    np.testing.assert_array_equal(np.asarray(rc._time_major(hs)), np.asarray(out))
    assert x is X and h0 is H0 and w_x is RNN_W[0] and w_h is RNN_W[1]


def test_lstm_saves_cell_states_and_gate_activations_in_pytorchs_order():
    _, (_, _, _, hs, cs, gates, _, _) = rc.lstm_forward(X, H0, C0, *LSTM_W)
    z = X[:, 0] @ LSTM_W[0] + H0 @ LSTM_W[1] + LSTM_W[2][None]  # step 1's pre-activations
    i, f, g, o = (np.asarray(a) for a in jnp.split(z, 4, axis=-1))
    sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    np.testing.assert_allclose(
        np.stack([a[0] for a in gates]), np.stack([sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)]), rtol=1e-14
    )
    c1 = sigmoid(f) * np.asarray(C0) + sigmoid(i) * np.tanh(g)
    np.testing.assert_allclose(np.asarray(cs[0]), c1, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(hs[0]), sigmoid(o) * np.tanh(c1), rtol=1e-14)


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_outputs_gradients_and_residuals_in_the_inputs_dtype(name):
    fn, args = CASES[name]
    args = [a.astype(f32) for a in args]
    out, pull = jax.vjp(fn, *args)
    assert out.dtype == f32 and all(g.dtype == f32 for g in pull(G.astype(f32)))
    assert all(r.dtype == f32 for r in jax.tree_util.tree_leaves(fn.fwd(*args)[1]))


def test_every_usual_mistake_differs_from_the_right_answer():
    """On a sample with several steps, every candidate of ``Rule.mistakes`` is at least 1e-3 (relative)
    away from the right cotangent, far beyond round-off (1e-12): a right backward is never "explained"
    by one. All of a rule's candidates are computed in one program."""
    for name in ("rnn", "lstm"):
        rule = mg.get(name)
        args = rule.sample_inputs(jax.random.PRNGKey(0), jnp.float64)[0].args
        g = jnp.asarray(np.random.default_rng(0).standard_normal(jnp.shape(rule.fn(*args))))

        texts = []  # (argument, text) of each candidate, filled while tracing

        def program(args, g, rule=rule, texts=texts):
            pairs = []
            for m in rule.mistakes:
                right = mistakes.reference_vjp(rule.reference, args, m.argument, g, diagnose.vjp)
                for text, wrong in m.candidates(diagnose.vjp, args, g):
                    texts.append((m.argument, text))
                    pairs.append((right, wrong))
            return pairs

        pairs = jax.jit(program)(args, g)
        assert {i for i, _ in texts} == set(rule.differentiable)
        for (i, text), (right, wrong) in zip(texts, pairs, strict=True):
            gap = np.max(np.abs(np.asarray(wrong) - np.asarray(right))) / np.max(np.abs(np.asarray(right)))
            assert gap > 1e-3, f"{name}, {rule.argnames[i]}: {text}"


# --------------------------------------------------------------------------- bad input

BAD = [
    (
        mg.RuleInputError,
        r"^rnn: x must have shape \(N, T, D\) \(batch, time, features\) with T ≥ 1, got \(3, 4\)",
        lambda: mg.rnn(X[:, 0], H0, *RNN_W),
    ),
    (
        mg.RuleInputError,
        r"^lstm: x must have shape \(N, T, D\) .* got \(3, 0, 4\)",
        lambda: mg.lstm(X[:, :0], H0, C0, *LSTM_W),
    ),
    (
        mg.RuleInputError,
        r"^rnn: w_h must have shape \(H, H\), got \(5, 6\)",
        lambda: mg.rnn(X, H0, RNN_W[0], jnp.ones((5, 6)), RNN_W[2]),
    ),
    (
        mg.RuleInputError,
        r"^lstm: w_h must have shape \(H, 4H\), got \(5, 5\)",
        lambda: mg.lstm(X, H0, C0, LSTM_W[0], RNN_W[1], LSTM_W[2]),
    ),
    (
        mg.RuleInputError,
        r"^rnn: h0 must have shape \(N, H\) = \(3, 5\) for x: \(3, 6, 4\) and w_h: \(5, 5\), got \(2, 5\)",
        lambda: mg.rnn(X, H0[:2], *RNN_W),
    ),
    (
        mg.RuleInputError,
        r"^lstm: c0 must have shape \(N, H\) = \(3, 5\) for x: \(3, 6, 4\) and w_h: \(5, 20\), got \(3, 4\)",
        lambda: mg.lstm(X, H0, C0[:, :4], *LSTM_W),
    ),
    (
        mg.RuleInputError,
        r"^lstm: w_x must have shape \(D, 4H\) = \(4, 20\) for x: \(3, 6, 4\) and w_h: \(5, 20\), got \(4, 5\)",
        lambda: mg.lstm(X, H0, C0, RNN_W[0], *LSTM_W[1:]),
    ),
    (
        mg.RuleInputError,
        r"^rnn: b must have shape \(H,\) = \(5,\) .* got \(1, 5\)",
        lambda: mg.rnn(X, H0, *RNN_W[:2], RNN_W[2][None]),
    ),
    (
        mg.RuleDTypeError,
        r"^rnn: x must be a floating-point array, got int32 with shape \(3, 6, 4\)",
        lambda: mg.rnn(X.astype(jnp.int32), H0, *RNN_W),
    ),
    (
        mg.RuleDTypeError,
        r"^lstm: arguments must share one dtype, got x: float32, h0: float64, c0: float64, w_x: float64",
        lambda: mg.lstm(X.astype(f32), H0, C0, *LSTM_W),
    ),
]


@pytest.mark.parametrize("error, message, call", BAD, ids=[c[1][1:40] for c in BAD])
def test_clear_error(error, message, call):
    with pytest.raises(error, match=message):
        call()
    with pytest.raises(error, match=message):
        jax.jit(lambda: call())()


# --------------------------------------------------------------------------- the exercise

# BPTT written by hand, as a student would (the library's own backward scores 0 in grade).
RNN_BY_HAND = """    x, h0, hs, w_x, w_h = residuals  # hs time-major, (T, N, H)
    gs, xs = jnp.swapaxes(g, 0, 1), jnp.swapaxes(x, 0, 1)
    dh, das = jnp.zeros_like(h0), []
    for t in reversed(range(hs.shape[0])):
        da = (gs[t] + dh) * (1 - hs[t] ** 2)
        das.insert(0, da)
        dh = da @ w_h.T
    da = jnp.stack(das)
    h_prev = jnp.concatenate([h0[None], hs[:-1]])
    dw_x, dw_h = jnp.einsum("tnd,tnh->dh", xs, da), jnp.einsum("tnk,tnh->kh", h_prev, da)
    return jnp.swapaxes(da @ w_x.T, 0, 1), dh, dw_x, dw_h, jnp.sum(da, axis=(0, 1))
"""


def test_rnn_exercise_solved_by_hand_gets_full_marks(tmp_path, capsys):
    from teach.test_exercise import _write

    assert cli.main(["grade", str(_write(tmp_path, "rnn", RNN_BY_HAND))]) == 0
    out = capsys.readouterr().out
    assert "score: 6/6 checks passed" in out and "FAIL" not in out, out
