"""Deliberately wrong backward rules for the recurrences (``manualgrad/rules/recurrence.py``).

Same format as the other families; the rules have no nondiff arguments, so every wrong VJP
takes ``(residuals, g)``. Each mistake of BPTT spoils every cotangent; a mutation keeps the
rule's own cotangents but for one argument (the checker must name exactly that one), computed
by :func:`_rnn_bptt` or :func:`_lstm_bptt`, BPTT written again with the slip in it.
"""

import jax.numpy as jnp
from jax import lax

from manualgrad.rules import linear
from manualgrad.rules import recurrence as rc
from mutations.mutation import Mutation

tm = rc._time_major


def _only(i, wrong, right):
    """``right``'s cotangents with the ``i``-th one replaced by ``wrong``'s."""
    return (*right[:i], wrong[i], *right[i + 1 :])


def _weight_sums(x, h_prev, dz):
    return linear.dense_gradient(tm(x), dz), linear.dense_gradient(h_prev, dz), linear.bias_add_gradient(dz)


def _rnn_bptt(res, g, derivative):
    """The RNN's BPTT with ``D_t`` = ``derivative`` (time-major) in place of ``1 − h_t²``."""
    x, h0, hs, w_x, w_h = res[:5]

    def step(dh_next, inputs):
        d, g_t = inputs
        da = (g_t + dh_next) * d
        return da @ w_h.T, (da @ w_x.T, da)

    dh0, (dx, da) = lax.scan(step, jnp.zeros_like(h0), (derivative, tm(g)), reverse=True)
    return (tm(dx), dh0, *_weight_sums(x, rc._previous(h0, hs), da))


def _rnn_truncated_dx(res, g):
    """dx_t = (G_t ⊙ (1 − h_t²)) w_xᵀ, vectorised outside the loop from G alone."""
    x, h0, hs, w_x, w_h = res
    dx = linear.dense_backward(w_x, tm(g) * (1 - hs * hs))
    return (tm(dx), *rc._rnn_vjp(res, g)[1:])


def _rnn_tanh_at_output(res, g):
    hs = res[2]
    return _only(3, _rnn_bptt(res, g, 1 - jnp.tanh(hs) ** 2), rc._rnn_vjp(res, g))


def _saving_pre_activations(x, h0, w_x, w_h, b):
    """The rule's forward, its residuals followed by the pre-activations ``a_t`` (time-major)."""
    out, res = rc.rnn_forward(x, h0, w_x, w_h, b)
    a = rc._input_part(x, w_x, b) + rc._previous(h0, res[2]) @ w_h
    return out, (*res, a)


def _rnn_one_minus_a_squared(res, g):
    a = res[5]
    return _only(4, _rnn_bptt(res, g, 1 - a * a), rc._rnn_vjp(res[:5], g))


def _rnn_last_step_weights(res, g):
    x, h0, hs, w_x, w_h = res
    h_prev = rc._previous(h0, hs)
    last = rc.rnn_gradient(tm(x)[-1], h_prev[-1], hs[-1], tm(g)[-1])  # dh_T = G_T
    return _only(2, (None, None, *last), rc._rnn_vjp(res, g))


def _lstm_bptt(res, g, carry_h=True, forget=True, cell_derivative=None, order=rc.GATES):
    """The LSTM's BPTT with a slip: ``dh`` not carried back, the forget-gate path dropped,
    ``cell_derivative(c_t)`` in place of ``1 − tanh²(c_t)``, or ``dz`` laid out in ``order``."""
    x, h0, c0, hs, cs, gates, w_x, w_h = res

    def step(carry, inputs):
        dh_next, dc_next = carry
        gates_t, c_prev, c, g_t = inputs
        i, f, cell, o = gates_t
        dh = g_t + dh_next if carry_h else g_t
        slope = 1 - jnp.tanh(c) ** 2 if cell_derivative is None else cell_derivative(c)
        dc = dc_next + dh * o * slope
        d = {
            "i": dc * cell * i * (1 - i),
            "f": dc * c_prev * f * (1 - f),
            "g": dc * i * (1 - cell * cell),
            "o": dh * jnp.tanh(c) * o * (1 - o),
        }
        dz = jnp.concatenate([d[k] for k in order], axis=-1)
        return (dz @ w_h.T, dc * f if forget else jnp.zeros_like(dc)), (dz @ w_x.T, dz)

    zeros = (jnp.zeros_like(h0), jnp.zeros_like(c0))
    (dh0, dc0), (dx, dz) = lax.scan(step, zeros, (gates, rc._previous(c0, cs), cs, tm(g)), reverse=True)
    return (tm(dx), dh0, dc0, *_weight_sums(x, rc._previous(h0, hs), dz))


def _lstm_slip(i, **slip):
    """The rule's cotangents, but for argument ``i``, taken from :func:`_lstm_bptt` with ``slip``."""
    return lambda res, g: _only(i, _lstm_bptt(res, g, **slip), rc._lstm_vjp(res, g))


def _lstm_last_step_bias(res, g):
    x, h0, c0, hs, cs, gates, w_x, w_h = res
    last = [a[-1] for a in (tm(x), rc._previous(h0, hs), rc._previous(c0, cs), cs)]
    last.insert(2, tuple(a[-1] for a in gates))
    db = rc.lstm_gradient(*last, jnp.zeros_like(c0), tm(g)[-1])[2]  # dh_T = G_T, nothing reaches c_T from later
    return _only(5, (None,) * 5 + (db,), rc._lstm_vjp(res, g))


MUTATIONS = [
    Mutation(
        "rnn",
        "dx from G alone: dh not carried to the previous step",
        "x",
        _rnn_truncated_dx,
        diagnosis="dh not carried back (BPTT truncated after one step)",
    ),
    Mutation(
        "rnn",
        "tanh' taken at the saved output: 1 − tanh²(h_t)",
        "w_h",
        _rnn_tanh_at_output,
        diagnosis="tanh' taken at the output F = tanh(a) instead of a",
    ),
    Mutation(
        "rnn",
        "1 − a_t² with the pre-activation where the output h_t was meant",
        "b",
        _rnn_one_minus_a_squared,
        diagnosis="but fed the pre-activation a: 1 − a²",
        forward=_saving_pre_activations,
    ),
    Mutation(
        "rnn",
        "dw_x of the last step only",
        "w_x",
        _rnn_last_step_weights,
        diagnosis="the weights' gradients of the last step t = T only",
    ),
    Mutation(
        "lstm",
        "dh not carried to the previous step",
        "w_h",
        _lstm_slip(4, carry_h=False),
        diagnosis="dh not carried back (BPTT truncated after one step)",
    ),
    Mutation(
        "lstm",
        "the forget-gate path dc_{t−1} = dc_t ⊙ σ(f) dropped",
        "x",
        _lstm_slip(0, forget=False),
        diagnosis="the path dc_{t−1} = dc_t ⊙ σ(f) dropped",
    ),
    Mutation(
        "lstm",
        "1 − c_t² where 1 − tanh²(c_t) was meant",
        "w_x",
        _lstm_slip(3, cell_derivative=lambda c: 1 - c * c),
        diagnosis="1 − c_t², the output's formula fed the cell state",
    ),
    Mutation(
        "lstm",
        "db of the last step only",
        "b",
        _lstm_last_step_bias,
        diagnosis="the weights' gradients of the last step t = T only",
    ),
    Mutation(
        "lstm",
        "gates' cotangents in CS231n's order (i, f, o, g)",
        "h0",
        _lstm_slip(1, order="ifog"),
        diagnosis="laid out as (i, f, o, g), CS231n's order",
    ),
]
