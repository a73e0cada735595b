"""Recurrences over a whole sequence, backpropagation through time by hand: the tanh RNN and the LSTM.

Both read ``x`` of shape ``(N, T, D)`` (batch, time, features) and return every hidden state,
``(N, T, H)``. One step is a layer of seed 002 §4's form ``σ(C(u, W) + ι(b))``: the bilinear
``C((x_t, h_{t−1}), (w_x, w_h)) = x_t w_x + h_{t−1} w_h``, the bias copied to every row, an
element-wise non-linearity; the sequence is ``T`` such layers sharing one ``(w_x, w_h, b)``.
Seed 002's Theorem 10 composes the adjoints of the steps backwards, and seed 003's variable on
several paths gives the two sums that make it *through time*: ``h_t`` is both an output and
the next step's input, so its cotangent is ``G_t`` plus what step ``t + 1`` sends back; the
weights are used at every step, so their gradients are summed over the steps.

Each rule is one ``jax.custom_vjp`` for the whole sequence. The forward is a ``lax.scan``; the
backward (``_NAME_vjp``) is one reverse ``lax.scan`` that carries ``dh`` (and ``dc``) from
``t = T`` down to ``t = 1``, calling ``NAME_backward``, one step's backward pass ``C†``. The
gradient pass ``NAME_gradient`` is one step's ``C††`` written for any leading axes, so that
applied to the stacked steps its sums over the batch run over time too: the weights' sums over
the steps are one contraction each, outside the loop. The forwards save outputs, not
pre-activations (seed 002 Remark 8: ``tanh' = 1 − F²``, ``σ' = F (1 − F)``).

The usual mistakes (``dh`` not carried back, the forget-gate path dropped, ``tanh'`` at the
wrong point, the weights' gradients of one step only, the gates in another order) are
reproduced by the references' ``slip`` keyword (:data:`SLIPS`) and attached to the rules as
:class:`~manualgrad.registry.Mistake` s (:func:`manualgrad.rules.mistakes.slipped`).

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import validation
from manualgrad.registry import Rule, Sample, register
from manualgrad.rules import activations, devices, linear, mistakes
from manualgrad.rules.samples import keys, normal

_SEEDS = (
    (
        "002",
        "§4, Proposition 9 and Theorem 10: one step's partial Fréchet derivatives, then their adjoints; "
        "Remark 8: tanh' = 1 − F² and σ' = F(1 − F) from the saved outputs",
    ),
    ("003", "a variable on several paths: h_t in the output and in step t + 1, the weights in every step"),
    ("004", "∇_W = Oᵀ G, ∇_b = 1ᵀ G, ∇_O = G Wᵀ: batched rows, summed over the batch and the steps"),
)
GATES = "ifgo"  # PyTorch's order of the LSTM's gate blocks: input, forget, cell (g), output

# --------------------------------------------------------------------------- shared


def _time_major(a: jax.Array) -> jax.Array:
    """``(N, T, ...)`` as ``(T, N, ...)``, and back: ``lax.scan`` runs over the leading axis."""
    return jnp.swapaxes(a, 0, 1)


def _previous(first: jax.Array, states: jax.Array) -> jax.Array:
    """``s_{t−1}`` for every step, time-major: ``first`` (``s_0``) then ``states`` (``s_1 … s_T``) but the last."""
    return jnp.concatenate([first[None], states[:-1]], axis=0)


def _input_part(x: jax.Array, w_x: jax.Array, b: jax.Array) -> jax.Array:
    """``x_t w_x + b`` for every step at once, time-major ``(T, N, width)``: the part of each
    pre-activation that does not wait for ``h_{t−1}``, one matrix product outside the loop."""
    return _time_major(x) @ w_x + b[None, None, :]


def _weight_sums(x, h_prev, dz):
    """``(Σ xᵀ dz, Σ h_{t−1}ᵀ dz, Σ 1ᵀ dz)`` summed over every leading axis: the weights' gradients
    from the pre-activations' cotangents (``da`` of the rnn, ``dz`` of the lstm).

    The pre-activation is one bilinear map of the stacked row ``[x_t, h_{t−1}]`` and the stacked
    weight ``[w_x; w_h]``, so the two sums are the two row blocks of one product
    ``Σ [x_t, h_{t−1}]ᵀ dz`` over every row of every step. One product of ``D + H`` rows, not two:
    on XLA's CPU backend the ``D``-row product alone ran at a third of its matmul rate."""
    rows = jnp.concatenate([x, h_prev], axis=-1)
    rows = rows.reshape(-1, rows.shape[-1])
    dw = linear.dense_gradient(rows, dz.reshape(rows.shape[0], dz.shape[-1]))
    inputs = x.shape[-1]
    return dw[:inputs], dw[inputs:], linear.bias_add_gradient(dz)


def _validate(rule: str, x, states: dict, w_x, w_h, b, gates: int) -> None:
    """``x`` ``(N, T, D)`` with ``T ≥ 1``, ``w_h`` ``(H, gates·H)`` and the rest to match, one floating dtype."""
    arrays = {"x": x, **states, "w_x": w_x, "w_h": w_h, "b": b}
    for name, a in arrays.items():
        validation.floating(rule, name, a)
    width = "H" if gates == 1 else f"{gates}H"
    if jnp.ndim(x) != 3 or jnp.shape(x)[1] < 1:
        raise validation.RuleInputError(
            f"{rule}: x must have shape (N, T, D) (batch, time, features) with T ≥ 1, got {jnp.shape(x)}"
        )
    if jnp.ndim(w_h) != 2 or jnp.shape(w_h)[1] != gates * jnp.shape(w_h)[0]:
        raise validation.RuleInputError(f"{rule}: w_h must have shape (H, {width}), got {jnp.shape(w_h)}")
    (n, _, d), h = jnp.shape(x), jnp.shape(w_h)[0]
    expected = {
        **{name: ((n, h), "(N, H)") for name in states},
        "w_x": ((d, gates * h), f"(D, {width})"),
        "b": ((gates * h,), f"({width},)"),
    }
    for name, (shape, layout) in expected.items():
        if jnp.shape(arrays[name]) != shape:
            raise validation.RuleInputError(
                f"{rule}: {name} must have shape {layout} = {shape} for x: {jnp.shape(x)} and w_h: "
                f"{jnp.shape(w_h)}, got {jnp.shape(arrays[name])}"
            )
    validation.same_dtype(rule, **arrays)


# --------------------------------------------------------------------------- the slips of the references

SLIPS = {
    "truncated": "h_{t−1} held constant in step t: dh not carried back (BPTT truncated after one step)",
    "forget path": "c_{t−1} held constant in c_t = σ(f) ⊙ c_{t−1} + …: the path dc_{t−1} = dc_t ⊙ σ(f) dropped",
    "tanh' at the output": "tanh' taken at the output F = tanh(a) instead of a: 1 − tanh²(F)",
    "1 − a²": "tanh' written in terms of the output, 1 − F², but fed the pre-activation a: 1 − a²",
    "tanh' at the output of tanh(c)": "tanh' of h_t = σ(o) ⊙ tanh(c_t) taken at tanh(c_t): 1 − tanh²(tanh c_t)",
    "1 − c²": "tanh' of h_t = σ(o) ⊙ tanh(c_t) as 1 − c_t², the output's formula fed the cell state",
    "last step": "the weights' gradients of the last step t = T only",
    "ifog": "the gates' cotangents laid out as (i, f, o, g), CS231n's order, instead of PyTorch's (i, f, g, o)",
}
"""Every ``slip`` the references take, and the wrong backward it reproduces: the reference's
value is unchanged, only its derivative is the slipped one (the ``stop_gradient`` s below)."""


def _tanh(a: jax.Array, slip: str, wrong: tuple[str, str]) -> jax.Array:
    """``tanh a``; where ``slip`` is ``wrong[0]`` its derivative is ``tanh'(tanh a)``, where it is
    ``wrong[1]`` it is ``1 − a²`` (the value stays ``tanh a``)."""
    slopes = {wrong[0]: lambda: 1 - jnp.tanh(jnp.tanh(a)) ** 2, wrong[1]: lambda: 1 - a * a}
    if slip not in slopes:
        return jnp.tanh(a)
    return lax.stop_gradient(jnp.tanh(a)) + lax.stop_gradient(slopes[slip]()) * (a - lax.stop_gradient(a))


def _weights_at(t, steps: int, slip: str, weights: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The weights as step ``t`` uses them: for the slip ``"last step"``, with their derivative at
    the last step only."""
    if slip != "last step":
        return weights
    return tuple(jnp.where(t == steps - 1, w, lax.stop_gradient(w)) for w in weights)


def _carried(h: jax.Array, slip: str) -> jax.Array:
    return lax.stop_gradient(h) if slip == "truncated" else h


def _slips(*names: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, "the right one with " + SLIPS[name]) for name in names)


# --------------------------------------------------------------------------- rnn


def rnn_reference(x, h0, w_x, w_h, b, slip=""):
    steps = jnp.shape(x)[1]
    h0 = devices.vary_like(h0, x, w_x, w_h, b)  # inside shard_map the carry varies as its step does

    def step(h, inputs):
        x_t, t = inputs
        wx, wh, bb = _weights_at(t, steps, slip, (w_x, w_h, b))
        h_t = _tanh(x_t @ wx + h @ wh + bb[None, :], slip, ("tanh' at the output", "1 − a²"))
        return _carried(h_t, slip), h_t

    return _time_major(lax.scan(step, h0, (_time_major(x), jnp.arange(steps)))[1])


@devices.custom_vjp
def rnn(x: jax.Array, h0: jax.Array, w_x: jax.Array, w_h: jax.Array, b: jax.Array) -> jax.Array:
    """Elman RNN over a whole sequence: ``h_t = tanh(x_t w_x + h_{t−1} w_h + b)``, every ``h_t`` returned.

    ``x`` has shape ``(N, T, D)``, ``h0`` ``(N, H)``, ``w_x`` ``(D, H)``, ``w_h`` ``(H, H)``,
    ``b`` ``(H,)``; the output stacks ``h_1 … h_T`` as ``(N, T, H)``. PyTorch's
    ``torch.nn.RNN(D, H, batch_first=True)`` (tanh) with ``weight_ih_l0 = w_xᵀ``,
    ``weight_hh_l0 = w_hᵀ`` and ``bias_ih_l0 + bias_hh_l0 = b``.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients Using
    Fréchet Calculus", §4, Proposition 9 and Theorem 10: the partial Fréchet derivative of
    each argument of a layer, the others held fixed, then its adjoint; Remark 8: ``tanh'``
    from the output; seed 003: a variable on several paths; seed 004: batched rows). One step
    ``h_t = f(x_t, h_{t−1}; w_x, w_h, b) = tanh(a_t)``, ``a_t = x_t w_x + h_{t−1} w_h + ι(b)``,
    is seed 002's layer ``σ(C(u, W) + ι(b))`` with ``σ = tanh`` and ``C`` bilinear, and the
    sequence is ``T`` of them sharing one ``(w_x, w_h, b)``. Write ``D_t = tanh'(a_t)`` and
    ``⟨A, B⟩ = Σ A ⊙ B``; the cotangent of ``h_t`` is ``dh_t``, that of the output ``G``
    (``G_t`` its step ``t``). Take the partial derivatives of one step in each argument, their
    adjoints (seed 002's ``T_t*``, ``S_t*``, ``R_t*``), and then ask what ``dh_t`` is, ``h_t``
    being both an output and step ``t + 1``'s input, and what the gradient of a weight that
    every step uses is.

    Result:

        D_{h_{t−1}} f(k) = D_t ⊙ (k w_h),    D_{x_t} f(k) = D_t ⊙ (k w_x),
        D_{w_h} f(K) = D_t ⊙ (h_{t−1} K),    D_{w_x} f(K) = D_t ⊙ (x_t K),    D_b f(k) = D_t ⊙ ι(k)

    With ``da_t = D_t ⊙ dh_t`` and ``D_t = 1 − h_t²`` (Remark 8: from the saved output),
    ``⟨dh_t, D_t ⊙ (k w_h)⟩ = ⟨da_t w_hᵀ, k⟩`` and so on, one step's adjoints are

        backward pass   dh_{t−1} ← da_t w_hᵀ,    dx_t = da_t w_xᵀ
        gradient pass   dw_h ← h_{t−1}ᵀ da_t,    dw_x ← x_tᵀ da_t,    db ← 1ᵀ da_t

    ``h_t`` reaches the loss along two paths, as the output and through step ``t + 1``, and by
    seed 003 its cotangent is the sum of both; the weights are used at every step, so theirs
    are the sums over the steps:

        dh_T = G_T,    dh_t = G_t + da_{t+1} w_hᵀ,    dh0 = da_1 w_hᵀ
        dw_h = Σ_t h_{t−1}ᵀ da_t,    dw_x = Σ_t x_tᵀ da_t,    db = Σ_t 1ᵀ da_t

    computed from ``t = T`` down (backpropagation through time): one reverse ``lax.scan``
    carrying ``dh``, then the three sums over the batch and the steps at once (seed 004's
    ``Oᵀ G`` and ``1ᵀ G``). Dropping the carried ``da_{t+1} w_hᵀ`` truncates BPTT after one
    step; keeping ``t = T`` alone in the sums is the last step's gradient. Residuals: ``x``,
    ``h0``, every ``h_t`` (the output: ``tanh'`` and ``h_{t−1}`` both come from it, so no
    pre-activation is saved), ``w_x`` and ``w_h``.
    """
    return rnn_forward(x, h0, w_x, w_h, b)[0]


def rnn_forward(x, h0, w_x, w_h, b):
    _validate("rnn", x, {"h0": h0}, w_x, w_h, b, 1)
    hs = _rnn_scan(x, h0, w_x, w_h, b)  # time-major (T, N, H), as the scan makes it
    return _time_major(hs), (x, h0, hs, w_x, w_h)


@jax.jit
def _rnn_scan(x, h0, w_x, w_h, b):
    """``h_1 … h_T``, time-major ``(T, N, H)``."""

    def step(h, xw_t):
        h = jnp.tanh(xw_t + h @ w_h)
        return h, h

    return lax.scan(step, h0, _input_part(x, w_x, b))[1]


def rnn_backward(h, w_x, w_h, g):
    """One step's backward pass ``C†``: ``da = g ⊙ (1 − h_t²)``, ``dx_t = da w_xᵀ`` and
    ``dh_{t−1} = da w_hᵀ``, where ``g`` is all of ``h_t``'s cotangent (``G_t`` and what step
    ``t + 1`` sent back)."""
    da = activations.tanh_backward(h, g)
    return linear.dense_backward(w_x, da), linear.dense_backward(w_h, da)


def rnn_gradient(x, h_prev, h, g):
    """The gradient pass ``C††``: ``dw_x = Σ xᵀ da``, ``dw_h = Σ h_{t−1}ᵀ da``, ``db = Σ 1ᵀ da``
    with ``da = g ⊙ (1 − h_t²)``, summed over every leading axis: the batch of one step, or the
    batch and the steps of a whole sequence (time-major)."""
    return _weight_sums(x, h_prev, activations.tanh_backward(h, g))


@jax.jit
def _rnn_vjp(residuals, g):
    x, h0, hs, w_x, w_h = residuals

    def step(dh_next, inputs):
        h, g_t = inputs
        dh = g_t + dh_next
        dx, dh_prev = rnn_backward(h, w_x, w_h, dh)
        return dh_prev, (dx, dh)

    dh0, (dx, dh) = lax.scan(step, jnp.zeros_like(h0), (hs, _time_major(g)), reverse=True)
    return (_time_major(dx), dh0, *rnn_gradient(_time_major(x), _previous(h0, hs), hs, dh))


rnn.defvjp(rnn_forward, _rnn_vjp)


def _recurrent_samples(gates: int, states: int):
    """``(x, *states, w_x, w_h, b)`` samples. ``x`` is drawn with scale ½ and the weights with
    ``1/√(D + H)``, so that the pre-activations are of order one: no step saturates ``tanh`` or
    ``σ`` (where ``1 − F²`` keeps few correct digits in float32), no gradient vanishes within
    12 steps, and the float32 round-off of the sums over the steps stays under the checker's
    absolute tolerance (ten ulps of 1)."""
    configs = [
        ((3, 4, 2, 3), "batch 3, 4 steps"),
        ((2, 1, 3, 2), "one step (T = 1)"),
        ((3, 4, 1, 1), "width 1 (H = 1, D = 1)"),
        ((1, 12, 2, 2), "batch 1 (N = 1), 12 steps"),
    ]

    def samples(key, dtype):
        k = keys(key)
        out = []
        for (n, t, d, h), label in configs:
            scale = (d + h) ** -0.5
            x = normal(next(k), (n, t, d), dtype, 0.5)
            initial = [normal(next(k), (n, h), dtype, 0.5) for _ in range(states)]
            w_x, w_h = normal(next(k), (d, gates * h), dtype, scale), normal(next(k), (h, gates * h), dtype, scale)
            out.append(Sample((x, *initial, w_x, w_h, normal(next(k), (gates * h,), dtype, 0.5)), label))
        return out

    return samples


register(
    Rule(
        name="rnn",
        fn=rnn,
        reference=rnn_reference,
        sample_inputs=_recurrent_samples(1, 1),
        differentiable=(0, 1, 2, 3, 4),
        seeds=_SEEDS,
        mistakes=mistakes.slipped(
            rnn_reference,
            {
                (0, 1, 2, 3, 4): _slips("truncated", "tanh' at the output", "1 − a²"),
                (2, 3, 4): _slips("last step"),
            },
        ),
    )
)

# --------------------------------------------------------------------------- lstm


def _gate_blocks(z: jax.Array, slip: str) -> dict[str, jax.Array]:
    """The pre-activations of the gates, ``z`` split into PyTorch's blocks (i, f, g, o). For a
    slip naming another order, each gate keeps its value but takes its derivative from the
    block that order puts it in: a backward that lays out the gates' cotangents in that order."""
    blocks = dict(zip(GATES, jnp.split(z, 4, axis=-1)))
    if slip != "ifog":
        return blocks
    wrong = dict(zip(slip, jnp.split(z, 4, axis=-1)))
    return {k: lax.stop_gradient(blocks[k]) + wrong[k] - lax.stop_gradient(wrong[k]) for k in GATES}


def lstm_reference(x, h0, c0, w_x, w_h, b, slip=""):
    steps = jnp.shape(x)[1]
    h0, c0 = devices.vary_like((h0, c0), x, w_x, w_h, b)  # inside shard_map the carry varies as its step does

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        wx, wh, bb = _weights_at(t, steps, slip, (w_x, w_h, b))
        z = _gate_blocks(x_t @ wx + h @ wh + bb[None, :], slip)
        kept = lax.stop_gradient(c) if slip == "forget path" else c
        c_t = jax.nn.sigmoid(z["f"]) * kept + jax.nn.sigmoid(z["i"]) * jnp.tanh(z["g"])
        h_t = jax.nn.sigmoid(z["o"]) * _tanh(c_t, slip, ("tanh' at the output of tanh(c)", "1 − c²"))
        return (_carried(h_t, slip), c_t), h_t

    return _time_major(lax.scan(step, (h0, c0), (_time_major(x), jnp.arange(steps)))[1])


@devices.custom_vjp
def lstm(x: jax.Array, h0: jax.Array, c0: jax.Array, w_x: jax.Array, w_h: jax.Array, b: jax.Array) -> jax.Array:
    """LSTM over a whole sequence, gates in PyTorch's order (input, forget, cell, output); every ``h_t`` returned.

    ``x`` has shape ``(N, T, D)``, ``h0`` and ``c0`` ``(N, H)``, ``w_x`` ``(D, 4H)``, ``w_h``
    ``(H, 4H)``, ``b`` ``(4H,)``; the output stacks ``h_1 … h_T`` as ``(N, T, H)``. Step ``t``:

        z_t = x_t w_x + h_{t−1} w_h + ι(b) = (z_i, z_f, z_g, z_o)    (four blocks of H)
        i = σ(z_i),  f = σ(z_f),  g = tanh(z_g),  o = σ(z_o)
        c_t = f ⊙ c_{t−1} + i ⊙ g,    h_t = o ⊙ tanh(c_t)

    PyTorch's ``torch.nn.LSTM(D, H, batch_first=True)`` with ``weight_ih_l0 = w_xᵀ``,
    ``weight_hh_l0 = w_hᵀ``, ``bias_ih_l0 + bias_hh_l0 = b``, and ``(h0, c0)`` as its state.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients Using
    Fréchet Calculus", §4, Proposition 9 and Theorem 10: partial Fréchet derivatives of one
    step, then adjoints; Remark 8: ``σ'`` and ``tanh'`` from the outputs; seed 003: a variable
    on several paths; seed 004: batched rows). One step maps ``(x_t, h_{t−1}, c_{t−1})`` to
    ``(h_t, c_t)``; the gates are seed 002's layer ``σ(C(u, W) + ι(b))`` with ``C`` bilinear,
    one element-wise non-linearity per block. Its cotangents are ``dh_t`` and ``dc_t``. Take
    the partial derivatives of ``c_t`` and ``h_t`` in ``z_t`` and ``c_{t−1}``, and of ``z_t``
    in ``x_t``, ``h_{t−1}`` and the weights; then their adjoints; then ask what reaches
    ``h_t`` and ``c_t`` from step ``t + 1`` and what the gradient of a weight that every step
    uses is.

    Result:

        D_z c_t(k) = g ⊙ σ'(z_i) ⊙ k_i + c_{t−1} ⊙ σ'(z_f) ⊙ k_f + i ⊙ tanh'(z_g) ⊙ k_g
        D_{c_{t−1}} c_t(k) = f ⊙ k,    D_{c_t} h_t(k) = o ⊙ tanh'(c_t) ⊙ k,    D_z h_t(k) = tanh(c_t) ⊙ σ'(z_o) ⊙ k_o
        D_{h_{t−1}} z(k) = k w_h,    D_{x_t} z(k) = k w_x,
        D_{w_h} z(K) = h_{t−1} K,    D_{w_x} z(K) = x_t K,    D_b z(k) = ι(k)

    By Remark 8 every derivative comes from a saved output: ``σ' = F (1 − F)`` of the gates
    ``i, f, o``, ``tanh' = 1 − g²``, and ``1 − tanh²(c_t)`` from ``c_t``. ``c_t`` reaches the
    loss through ``h_t`` and through ``c_{t+1}``, so (adjoints, block by block)

        dc_t = dc_t^{(t+1)} + dh_t ⊙ o ⊙ (1 − tanh²(c_t)),          dc_{t−1}^{(t)} = dc_t ⊙ f    (the forget-gate path)
        dz_i = dc_t ⊙ g ⊙ i(1 − i),    dz_f = dc_t ⊙ c_{t−1} ⊙ f(1 − f),
        dz_g = dc_t ⊙ i ⊙ (1 − g²),    dz_o = dh_t ⊙ tanh(c_t) ⊙ o(1 − o)
        dx_t = dz w_xᵀ,    dh_{t−1} = G_{t−1} + dz w_hᵀ    (dh_T = G_T, dc_T^{(T+1)} = 0)
        dw_x = Σ_t x_tᵀ dz_t,    dw_h = Σ_t h_{t−1}ᵀ dz_t,    db = Σ_t 1ᵀ dz_t

    with ``dz = (dz_i, dz_f, dz_g, dz_o)`` in the blocks' order, and ``dh0``, ``dc0`` what
    step 1 sends back. One reverse ``lax.scan`` carries ``(dh, dc)``; the three weight sums
    run over the batch and the steps at once (seed 003's sum over paths, seed 004's ``Oᵀ G``).
    Dropping ``dc_t ⊙ f`` cuts the cell's long path through time; writing ``dz`` in another
    order than the forward's blocks pairs each gate's cotangent with another gate's weights.
    Residuals: ``x``, ``h0``, ``c0``, every ``h_t`` and ``c_t``, the gates' activations
    ``(i, f, g, o)`` (their outputs, not ``z``; four arrays), ``w_x`` and ``w_h``; ``tanh(c_t)`` is
    recomputed (Remark 8 (i): cheaper to recompute than to store).
    """
    return lstm_forward(x, h0, c0, w_x, w_h, b)[0]


def lstm_forward(x, h0, c0, w_x, w_h, b):
    _validate("lstm", x, {"h0": h0, "c0": c0}, w_x, w_h, b, 4)
    hs, cs, gates = _lstm_scan(x, h0, c0, w_x, w_h, b)  # time-major (T, N, ...), as the scan makes them
    return _time_major(hs), (x, h0, c0, hs, cs, gates, w_x, w_h)


def _activated(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The gates' activations ``(σ(z_i), σ(z_f), tanh(z_g), σ(z_o))`` of the blocks of ``z``, four
    arrays: stacked in one, every step's element-wise kernels in both scans would write and read it
    through slices, which is slower (``manualgrad bench --models lstm`` measures the rule)."""
    i, f, g, o = jnp.split(z, 4, axis=-1)
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


@jax.jit
def _lstm_scan(x, h0, c0, w_x, w_h, b):
    """``h_1 … h_T``, ``c_1 … c_T`` and every step's gate activations, time-major.

    ``x_t w_x`` is computed in the step, not for all steps before the loop (:func:`_input_part`):
    on XLA's CPU backend that ``(T, N, 4H)`` array stays alive through the whole step and the
    step's element-wise fusions read it through a fused dynamic slice; in the loop the step is
    faster and the compiled training step smaller (``manualgrad bench --models lstm``)."""

    def step(carry, x_t):
        h, c = carry
        i, f, g, o = gates = _activated(x_t @ w_x + h @ w_h + b[None, :])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, gates)

    return lax.scan(step, (h0, c0), _time_major(x))[1]


def _gate_cotangents(gates, c_prev, c, dc, g):
    """``dz = (dz_i, dz_f, dz_g, dz_o)`` and all of ``c_t``'s cotangent, from the step's saved
    gates and cell states, ``dc`` (what step ``t + 1`` sent back to ``c_t``) and ``g`` (``h_t``'s)."""
    i, f, cell, o = gates
    tanh_c = jnp.tanh(c)
    dc = dc + activations.tanh_backward(tanh_c, g * o)
    dz = [
        activations.sigmoid_backward(i, dc * cell),
        activations.sigmoid_backward(f, dc * c_prev),
        activations.tanh_backward(cell, dc * i),
        activations.sigmoid_backward(o, g * tanh_c),
    ]
    return jnp.concatenate(dz, axis=-1), dc


def lstm_backward(gates, c_prev, c, w_h, dc, g):
    """One step's backward pass ``C†`` through the recurrence: ``(dz, dh_{t−1}, dc_{t−1}) =
    (dz, dz w_hᵀ, dc_t ⊙ f)``, where ``g`` is all of ``h_t``'s cotangent and ``dc`` what step
    ``t + 1`` sent back to ``c_t``. ``dx_t = dz w_xᵀ`` waits for no other step: :func:`_lstm_vjp`
    computes it for all steps at once, from the ``dz`` of each."""
    dz, dc = _gate_cotangents(gates, c_prev, c, dc, g)
    forget = gates[1]
    return dz, linear.dense_backward(w_h, dz), dc * forget


def lstm_gradient(x, h_prev, gates, c_prev, c, dc, g):
    """The gradient pass ``C††``: ``dw_x = Σ xᵀ dz``, ``dw_h = Σ h_{t−1}ᵀ dz``, ``db = Σ 1ᵀ dz``,
    summed over every leading axis: the batch of one step, or the batch and the steps (time-major)."""
    return _weight_sums(x, h_prev, _gate_cotangents(gates, c_prev, c, dc, g)[0])


@jax.jit
def _lstm_vjp(residuals, g):
    """The reverse scan emits every step's ``dz`` (time-major ``(T, N, 4H)``); ``dx`` and the weights'
    sums over the batch and the steps are then one contraction each, outside the loop."""
    x, h0, c0, hs, cs, gates, w_x, w_h = residuals

    def step(carry, inputs):
        dh_next, dc_next = carry
        gates_t, c_prev_t, c_t, g_t = inputs
        dz, dh_prev, dc_prev = lstm_backward(gates_t, c_prev_t, c_t, w_h, dc_next, g_t + dh_next)
        return (dh_prev, dc_prev), dz

    zeros = (jnp.zeros_like(h0), jnp.zeros_like(c0))
    (dh0, dc0), dz = lax.scan(step, zeros, (gates, _previous(c0, cs), cs, _time_major(g)), reverse=True)
    x = _time_major(x)
    return (_time_major(linear.dense_backward(w_x, dz)), dh0, dc0, *_weight_sums(x, _previous(h0, hs), dz))


lstm.defvjp(lstm_forward, _lstm_vjp)

register(
    Rule(
        name="lstm",
        fn=lstm,
        reference=lstm_reference,
        sample_inputs=_recurrent_samples(4, 2),
        differentiable=(0, 1, 2, 3, 4, 5),
        seeds=_SEEDS,
        mistakes=mistakes.slipped(
            lstm_reference,
            {
                (0, 1, 2, 3, 4, 5): _slips(
                    "truncated", "forget path", "tanh' at the output of tanh(c)", "1 − c²", "ifog"
                ),
                (3, 4, 5): _slips("last step"),
            },
        ),
    )
)
