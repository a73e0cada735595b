"""1-D signal rules: correlation ``y = x ⋆ w`` and convolution ``y = x ∗ w`` (seed 000 §6–7).

Seed 000 writes correlation as ``x ⊙ w``, ``y_i = Σ_j x_{i+j} w_j``, and convolution as
``x ⊗ w``, ``y_i = Σ_j x_{i−j} w_j`` (the text extraction's symbols); here they are ``⋆`` and
``∗``. Its §6.2 proves four adjoint identities for signals indexed by all of ℤ:

    1) ⟨A, B ⋆ C⟩ = ⟨C, B ⋆ A⟩          3) ⟨A, B ⋆ C⟩ = ⟨B, A ∗ C⟩
    2) ⟨A, B ∗ C⟩ = ⟨C, A ⋆ B⟩          4) ⟨A, B ∗ C⟩ = ⟨B, A ⋆ C⟩

Identity 2 is printed garbled in the seed (``⟨A, B ∗ C⟩ = ⟨A, B ∗ A⟩``, "just interchanging
correlation and convolution"); the correct statement, above, follows from 4) because
convolution commutes. ``tests/rules/test_correlation.py`` checks all four on finite, zero-extended
signals with the rules below.

Finite signals are cropped to a window of shifts by a ``mode``, exactly as
``numpy.correlate`` / ``numpy.convolve`` do; the docstring of :func:`correlate1d` shows where
the seed's infinite-signal proof breaks for them and how zero padding repairs it.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import validation
from manualgrad.registry import Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes
from manualgrad.rules.samples import keys, normal
from manualgrad.rules.windows import mode_window


def _pad(a: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """``a`` zero-padded along its last axis by ``pads = (lo, hi)`` (negative amounts crop)."""
    config = [(0, 0, 0)] * (jnp.ndim(a) - 1) + [(pads[0], pads[1], 0)]
    return lax.pad(a, jnp.zeros((), jnp.result_type(a)), config)


def _correlate_valid(a: jax.Array, w: jax.Array) -> jax.Array:
    """``valid(a ⋆ w)_i = Σ_j a_{i+j} w_j`` along the last axis of ``a`` ((M,) or (B, M))."""
    lead = jnp.shape(a)[:-1]
    out = lax.conv_general_dilated(
        jnp.reshape(a, (math.prod(lead), 1, jnp.shape(a)[-1])),
        jnp.reshape(w, (1, 1, jnp.shape(w)[-1])),
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NCH", "OIH", "NCH"),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.reshape(out, (*lead, jnp.shape(out)[-1]))


def _correlate_valid_summed(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Σ_batch valid(a ⋆ b)``: the batch axis becomes the contracted channel axis."""
    out = lax.conv_general_dilated(
        jnp.reshape(a, (1, -1, jnp.shape(a)[-1])),
        jnp.reshape(b, (1, -1, jnp.shape(b)[-1])),
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NCH", "OIH", "NCH"),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.reshape(out, (jnp.shape(out)[-1],))


def _validate(rule: str, x, w) -> None:
    validation.floating(rule, "x", x)
    validation.floating(rule, "w", w)
    if jnp.ndim(x) not in (1, 2) or jnp.shape(x)[-1] == 0:
        raise validation.RuleInputError(
            f"{rule}: x must have shape (N,) or (batch, N) with N ≥ 1, got shape {jnp.shape(x)}"
        )
    if jnp.ndim(w) != 1 or jnp.shape(w)[0] == 0:
        raise validation.RuleInputError(
            f"{rule}: w must be a non-empty 1-D filter of shape (K,), got shape {jnp.shape(w)}"
        )
    validation.same_dtype(rule, x=x, w=w)


def _check_cotangent(rule: str, g, lead: tuple[int, ...], length: int, mode: str) -> None:
    if jnp.shape(g) != (*lead, length):
        raise validation.RuleInputError(
            f"{rule}: the cotangent must have shape {(*lead, length)} for mode {mode!r}, got {jnp.shape(g)}"
        )


def _signal_forward(rule: str, x: jax.Array, w: jax.Array, mode: str, flip: bool):
    """``y = valid(x̃ ⋆ v)``, ``v = flip w`` for the convolution, ``w`` for the correlation."""
    _validate(rule, x, w)
    pad = mode_window(rule, jnp.shape(x)[-1], jnp.shape(w)[0], mode)
    return _correlate_valid(_pad(x, pad.x_pads), jnp.flip(w) if flip else w), (x, w)


def _input_pass(rule: str, v: jax.Array, n: int, mode: str, g: jax.Array) -> jax.Array:
    """``valid(ğ ⋆ v)`` for an input of length ``n``: both rules' backward pass, ``v`` the filter
    as the backward pass reads it."""
    pad = mode_window(rule, n, jnp.shape(v)[0], mode)
    _check_cotangent(rule, g, jnp.shape(g)[:-1], pad.length, mode)
    return _correlate_valid(_pad(g, pad.g_pads), v)


def _weight_pass(rule: str, x: jax.Array, k: int, mode: str, g: jax.Array) -> jax.Array:
    """``Σ_batch valid(x̃ ⋆ dy)`` for a ``k``-tap filter: both rules' gradient pass, up to a flip."""
    pad = mode_window(rule, jnp.shape(x)[-1], k, mode)
    _check_cotangent(rule, g, jnp.shape(x)[:-1], pad.length, mode)
    return _correlate_valid_summed(_pad(x, pad.x_pads), g)


def _signal_vjp(backward, gradient):
    """The VJP of a signal rule from its backward and gradient pass."""

    def vjp(mode, residuals, g):
        x, w = residuals
        return backward(w, jnp.shape(x)[-1], mode, g), gradient(x, jnp.shape(w)[0], mode, g)

    return vjp


def _window_reference(x: jax.Array, w: jax.Array, offset: int, length: int) -> jax.Array:
    """``y_i = Σ_j x_{i+offset+j} w_j`` for ``0 ≤ i < length``, ``x`` zero outside ``0 … N−1``:
    the correlation on any window of shifts (plain ``jnp``, for the diagnoses)."""
    n, k = jnp.shape(x)[-1], jnp.shape(w)[0]
    lo, hi = max(0, -offset), max(0, length + offset + k - 1 - n)
    xp = jnp.pad(x, [(0, 0)] * (jnp.ndim(x) - 1) + [(lo, hi)])
    index = jnp.arange(length)[:, None] + jnp.arange(k)[None, :] + offset + lo
    return jnp.take(xp, index, axis=-1) @ w


def _signal_mistakes(rule: str, reference, flip: bool) -> tuple[Mistake, ...]:
    """The kernel flipped the wrong way, and the mode's window of shifts off by one (the padding
    of ``x`` or of ``dy`` off by one), for ``x`` and for ``w``."""

    def window_shifted(i: int) -> Mistake:
        def candidates(vjp, args, g):
            x, w, mode = args
            pad = mode_window(rule, jnp.shape(x)[-1], jnp.shape(w)[0], mode)
            for shift in (-1, 1):

                def f(a, shift=shift):
                    xx, ww, _ = mistakes.replace(args, i, a)
                    return _window_reference(xx, jnp.flip(ww) if flip else ww, pad.offset + shift, pad.length)

                yield f"the right one with the padding off by one (window shifted by {shift})", vjp(f, args[i], g)

        return Mistake(i, candidates)

    return (*mistakes.kernel_flipped(reference, (0,)), window_shifted(0), window_shifted(1))


# --------------------------------------------------------------------------- correlate1d


def _numpy_correlate_reference(a: jax.Array, v: jax.Array, mode: str) -> jax.Array:
    """numpy's own algorithm for ``correlate(a, v)`` with ``len(a) ≥ len(v) = m``.

    numpy zero-pads the longer signal by ``(0, 0)`` ('valid'), ``(m // 2, m − 1 − m // 2)``
    ('same') or ``(m − 1, m − 1)`` ('full') and slides ``v`` over it. Either argument may
    carry a leading batch axis.
    """
    n, m = jnp.shape(a)[-1], jnp.shape(v)[-1]
    left, right = {"valid": (0, 0), "same": (m // 2, m - 1 - m // 2), "full": (m - 1, m - 1)}[mode]
    lead = jnp.shape(a)[:-1]
    a = jnp.concatenate([jnp.zeros((*lead, left), a.dtype), a, jnp.zeros((*lead, right), a.dtype)], axis=-1)
    index = jnp.arange(n + left + right - m + 1)[:, None] + jnp.arange(m)[None, :]
    windows = jnp.take(a, index, axis=-1)  # windows[..., i, j] = a_{i+j}
    return windows @ v if jnp.ndim(v) == 1 else v @ windows.T


def correlate1d_reference(x: jax.Array, w: jax.Array, mode: str = "valid") -> jax.Array:
    if jnp.shape(w)[-1] > jnp.shape(x)[-1]:  # numpy swaps the arguments and reverses the result
        return jnp.flip(_numpy_correlate_reference(w, x, mode), axis=-1)
    return _numpy_correlate_reference(x, w, mode)


@functools.partial(devices.custom_vjp, nondiff_argnums=(2,))
def correlate1d(x: jax.Array, w: jax.Array, mode: str = "valid") -> jax.Array:
    """1-D correlation ``y = x ⋆ w``, ``y_i = Σ_j x_{i+j} w_j``, windowed like ``numpy.correlate``.

    ``x`` of shape ``(N,)`` or ``(batch, N)``, ``w`` of shape ``(K,)`` (any K, also K > N),
    ``mode`` one of 'valid', 'same', 'full' (a static Python string; it gets no gradient).

    Derivation (seed 000 §6 "Convolution with infinite dimension input", §7 "Correlation1D").

    For signals indexed by all of ℤ seed 000 perturbs one argument at a time, with
    ``dy := dL/dy``, and moves the shift across the inner product (§6.2's identities).

    Result:

        backward pass   ΔL = ⟨dy, Δx ⋆ w⟩ = ⟨Δx, dy ∗ w⟩   (§6.2 identity 3)  ⇒  dx = dy ∗ w
        gradient pass   ΔL = ⟨dy, x ⋆ Δw⟩ = ⟨Δw, x ⋆ dy⟩   (§6.2 identity 1)  ⇒  dw = x ⋆ dy

    (§7.2 prints ``⟨dL/dy ⋆ w, Δx⟩`` in one line; its result ``dy ∗ w`` is the right one.)

    Where the proof breaks for finite signals — the seed's question. Identity 3 reads

        ⟨A, B ⋆ C⟩ = Σ_i Σ_j A_i B_{i+j} C_j  =(p = i + j)=  Σ_p B_p Σ_j A_{p−j} C_j = ⟨B, A ∗ C⟩.

    Switching the sums and the change of variables ``p = i + j`` assume that every index
    runs over all of ℤ, so that for each ``p`` the inner sum over ``j`` is complete. For
    ``x ∈ R^N`` and ``w ∈ R^K`` the layer is ``y = S(x ⋆ w)``: ``S`` keeps a window of the
    shifts — 'full' the ``N + K − 1`` shifts ``−(K−1) … N−1`` where some term exists, 'valid'
    the ``|N − K| + 1`` where all terms exist, 'same' ``max(N, K)`` in the middle — and ``dy``
    exists only on that window. In ``Σ_p B_p Σ_j A_{p−j} C_j`` with ``A = dy`` the index
    ``p − j`` leaves the window near the boundary (for 'valid', at the first and last
    ``K − 1`` entries of ``dx``): those terms have nothing to multiply, a convolution of
    ``dy`` cropped to the same mode drops them, and ⟨A, B ⋆ C⟩ = ⟨B, A ∗ C⟩ fails. It holds
    again once ``A`` is extended by zeros over all shifts, i.e. ``A = S* dy`` where the
    adjoint of the crop ``S`` is the zero-padding ``S*``:

        ⟨dy, S(Δx ⋆ w)⟩ = ⟨S* dy, Δx ⋆ w⟩ = ⟨Δx, (S* dy) ∗ w⟩   ⇒  dx = ((S* dy) ∗ w) on 0 … N−1,

    where ``x`` and ``w`` are read as zero outside their ranges, so every sum over ℤ is
    finite and the proof holds term by term. Identity 1 needs no repair once ``x`` is
    zero-extended the same way: ``dw = x ⋆ dy`` taken at ``j = 0 … K−1`` only. In mode
    'full' the crop keeps every shift where ``x ⋆ w`` can be non-zero, so ``S* S`` changes
    nothing and the infinite proof applies verbatim, which is the seed's remark that a
    finite ``w`` is harmless, extended to a finite ``x``.

    Padding realises these zero extensions. With the window's first shift ``o`` (output
    ``i`` is shift ``i + o``) and its length ``L``:

        forward    y  = valid(x̃ ⋆ w),          x̃ = x zero-padded by (−o, L + o + K − 1 − N)
        backward   dx = valid(ğ ⋆ flip w)      ğ = dy zero-padded by (K − 1 + o, N − L − o)
                      = (S* dy ∗ w) on 0 … N−1  — the seed's dy ∗ w
        gradient   dw = valid(x̃ ⋆ dy)         — the seed's x ⋆ dy, Σ over the batch

    Check of the backward: ``valid(ğ ⋆ flip w)_p = Σ_m ğ_{p+m} w_{K−1−m} = Σ_j dy_{p−o−j} w_j``
    (``j = K − 1 − m``), which is ``∂/∂x_p Σ_i dy_i Σ_j x_{i+o+j} w_j``. A batch shares ``w``,
    so the gradient pass sums over the batch. The residuals are the inputs ``(x, w)``.
    """
    return correlate1d_forward(x, w, mode)[0]


def correlate1d_forward(
    x: jax.Array, w: jax.Array, mode: str = "valid"
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _signal_forward("correlate1d", x, w, mode, flip=False)


def correlate1d_backward(w: jax.Array, n: int, mode: str, g: jax.Array) -> jax.Array:
    """Backward pass ``dx = dy ∗ w = valid(ğ ⋆ flip w)`` for an input of length ``n``."""
    return _input_pass("correlate1d", jnp.flip(w), n, mode, g)


def correlate1d_gradient(x: jax.Array, k: int, mode: str, g: jax.Array) -> jax.Array:
    """Gradient pass ``dw = x ⋆ dy = valid(x̃ ⋆ dy)`` for a ``k``-tap filter, summed over the batch."""
    return _weight_pass("correlate1d", x, k, mode, g)


correlate1d.defvjp(correlate1d_forward, _signal_vjp(correlate1d_backward, correlate1d_gradient))


def _signal_samples(key, dtype):
    """Shared by both rules: every mode with N > K, N < K, N == K, K == 1, odd/even K, batches."""
    k = keys(key)
    shapes = [
        ((9,), (3,), "valid", "N > K, odd K"),
        ((2, 4), (6,), "valid", "batch 2, N < K, even K"),
        ((5,), (5,), "valid", "N == K, one output"),
        ((8,), (4,), "same", "N > K, even K"),
        ((4,), (7,), "same", "N < K, even N, odd K"),
        ((1, 6), (1,), "same", "batch 1, K == 1"),
        ((3,), (6,), "full", "N < K, odd N"),
        ((3, 6), (4,), "full", "batch 3, N > K, even K"),
    ]
    return [
        Sample((normal(next(k), xs, dtype), normal(next(k), ws, dtype), mode), f"{mode}, {label}")
        for xs, ws, mode, label in shapes
    ]


register(
    Rule(
        name="correlate1d",
        fn=correlate1d,
        reference=correlate1d_reference,
        sample_inputs=_signal_samples,
        differentiable=(0, 1),
        seeds=(("000", "§6–7 correlation/convolution, Correlation1D"),),
        linear_in=((0,), (1,)),
        mistakes=_signal_mistakes("correlate1d", correlate1d_reference, flip=False),
    )
)

# --------------------------------------------------------------------------- convolve1d


def convolve1d_reference(x: jax.Array, w: jax.Array, mode: str = "valid") -> jax.Array:
    if jnp.shape(w)[-1] > jnp.shape(x)[-1]:  # convolution commutes; numpy slides the shorter one
        return _numpy_correlate_reference(w, jnp.flip(x, axis=-1), mode)
    return _numpy_correlate_reference(x, jnp.flip(w), mode)


@functools.partial(devices.custom_vjp, nondiff_argnums=(2,))
def convolve1d(x: jax.Array, w: jax.Array, mode: str = "valid") -> jax.Array:
    """1-D convolution ``y = x ∗ w``, ``y_i = Σ_j x_{i−j} w_j``, windowed like ``numpy.convolve``.

    Shapes and modes as for :func:`correlate1d`.

    Derivation (seed 000 §6.2, identities 4 and 2; the Correlation1D argument of §7 with
    ``∗`` and ``⋆`` exchanged). For signals indexed by all of ℤ, perturb one argument at a time.

    Result:

        backward pass   ΔL = ⟨dy, Δx ∗ w⟩ = ⟨Δx, dy ⋆ w⟩   (identity 4)  ⇒  dx = dy ⋆ w
        gradient pass   ΔL = ⟨dy, x ∗ Δw⟩ = ⟨Δw, dy ⋆ x⟩   (identity 2)  ⇒  dw = dy ⋆ x,
                        i.e. dw_j = Σ_i dy_i x_{i−j}

    (Identity 2 as printed in seed 000 is garbled; the form used here is
    ``⟨A, B ∗ C⟩ = ⟨C, A ⋆ B⟩``, identity 4 applied to ``B ∗ C = C ∗ B``.) For finite
    signals the proof breaks, and is repaired, exactly as for :func:`correlate1d`: the
    change of variables ``p = i − j`` needs ``dy`` on every shift, so ``dy`` is extended
    by zeros (the adjoint of the mode's crop) before it is correlated with ``w``.

    Convolution is correlation with the filter reversed: ``(x ∗ w)_f = Σ_m x_{f−(K−1)+m}
    w_{K−1−m}``, so output ``i`` is again the shift ``i + o`` of ``x ⋆ flip w``, with the
    window ``o, L`` of ``numpy.convolve`` (which differs from ``numpy.correlate``'s only for
    'same' with K > N). With the same paddings ``x̃``, ``ğ``:

        forward    y  = valid(x̃ ⋆ flip w)
        backward   dx = valid(ğ ⋆ w)              — the seed's dy ⋆ w (two flips cancel)
        gradient   dw = flip valid(x̃ ⋆ dy)       — the seed's dy ⋆ x, Σ over the batch

    The residuals are the inputs ``(x, w)``.
    """
    return convolve1d_forward(x, w, mode)[0]


def convolve1d_forward(
    x: jax.Array, w: jax.Array, mode: str = "valid"
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _signal_forward("convolve1d", x, w, mode, flip=True)


def convolve1d_backward(w: jax.Array, n: int, mode: str, g: jax.Array) -> jax.Array:
    """Backward pass ``dx = dy ⋆ w = valid(ğ ⋆ w)`` for an input of length ``n``."""
    return _input_pass("convolve1d", w, n, mode, g)


def convolve1d_gradient(x: jax.Array, k: int, mode: str, g: jax.Array) -> jax.Array:
    """Gradient pass ``dw = dy ⋆ x = flip valid(x̃ ⋆ dy)`` for a ``k``-tap filter, summed over the batch."""
    return jnp.flip(_weight_pass("convolve1d", x, k, mode, g))


convolve1d.defvjp(convolve1d_forward, _signal_vjp(convolve1d_backward, convolve1d_gradient))

register(
    Rule(
        name="convolve1d",
        fn=convolve1d,
        reference=convolve1d_reference,
        sample_inputs=_signal_samples,
        differentiable=(0, 1),
        seeds=(("000", "§6–7 correlation/convolution, Correlation1D"),),
        linear_in=((0,), (1,)),
        mistakes=_signal_mistakes("convolve1d", convolve1d_reference, flip=True),
    )
)
