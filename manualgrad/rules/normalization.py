"""Normalisation and dropout, channels last: batch, layer, group and RMS norm, inverted dropout.

The three centred norms share one map. Over a set ``A`` of ``m`` entries (a channel's entries
in the batch for batch norm, one row for layer norm, one sample's group for group norm),

    μ = mean(x),    v = mean((x − μ)²),    σ = √(v + ε),    x̂ = N(x) = (x − μ)/σ,

and ``y = γ x̂ + β`` with one ``γ`` and ``β`` per channel. Seed 002's Lemma 4 takes the
partial Fréchet derivative of each argument and its §4 the adjoint of each; ``x`` reaches
``x̂`` along three paths (directly, through ``μ`` and through ``σ``), and by seed 003's example
of a variable on two paths its derivative is the sum of the three:

    D N(x)(h) = (1/σ) (h − mean(h) − x̂ mean(x̂ ⊙ h)),

a symmetric map, so that ``dx = D N(x)*(γ ⊙ G) = (1/σ)(Ĝ − mean(Ĝ) − x̂ mean(Ĝ ⊙ x̂))`` with
``Ĝ = γ ⊙ G``. Every rule's docstring derives its own case from the definitions.

The backward rules are that closed form, not a chain of intermediate adjoints, and save
``x̂`` and ``1/σ`` rather than ``x`` (seed 002 Remark 8's point: keep what the backward needs).
The usual mistakes (``μ`` and ``σ`` taken as constants, the unbiased variance, statistics over
the wrong axes, dropout not rescaled or its mask drawn again with another key) are attached to
the rules as :class:`~manualgrad.registry.Mistake` s built from the references.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad import validation
from manualgrad.registry import VJP, Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes
from manualgrad.rules.samples import keys, normal

_SEEDS = (
    ("002", "Lemma 4 and §4: the partial Fréchet derivative of each argument, then its adjoint"),
    ("003", "a variable on several paths: the sum of the paths"),
    ("004", "∇_b = 1ᵀ G: parameters shared by the batch are summed over it"),
)


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
    """A ``(C,)`` vector shaped to broadcast along the last axis of an ``ndim``-axis array
    (explicitly: the checks run with rank promotion raising)."""
    return jnp.reshape(v, (1,) * (ndim - 1) + jnp.shape(v))


def _channel_sum(a: jax.Array) -> jax.Array:
    """``ι*``: the sum over every axis but the last, one entry per channel."""
    return jnp.sum(a, axis=_leading(a))


def _leading(x) -> tuple[int, ...]:
    return tuple(range(jnp.ndim(x) - 1))


def _last(x) -> tuple[int, ...]:
    return (jnp.ndim(x) - 1,)


def _standardize(x, axes, eps, ddof: int = 0, constant: tuple[str, ...] = ()):
    """``(x − μ)/√(v + ε)`` over ``axes``, plain ``jnp``: the references' one formula.

    ``ddof = 1`` divides the variance by ``m − 1``; ``constant`` names the statistics
    (``"μ"``, ``"σ"``) that are held constant under differentiation. Both only build the
    usual mistakes' wrong answers.
    """
    m = math.prod(jnp.shape(x)[a] for a in axes)
    mu = jnp.mean(x, axis=axes, keepdims=True)
    if "μ" in constant:
        mu = lax.stop_gradient(mu)
    var = jnp.sum((x - mu) ** 2, axis=axes, keepdims=True) / (m - ddof)
    if "σ" in constant:
        var = lax.stop_gradient(var)
    return (x - mu) / jnp.sqrt(var + eps)


def _one_program(*static: int):
    """``jax.jit`` with the ``static`` arguments (axes, ε, ...) static. Called eagerly (the
    checker's ``vjp`` check, a user's first call) a rule then compiles one program per shape
    instead of one per operation; inside an outer ``jit``, ``vmap`` or ``grad`` it is inlined."""
    return functools.partial(jax.jit, static_argnums=static)


@_one_program(1, 2)
def _statistics(x, axes, eps):
    """The forward's ``x̂`` and ``1/σ`` over ``axes`` (kept as axes of size 1), biased variance,
    in ``x``'s dtype."""
    centred = x - jnp.mean(x, axis=axes, keepdims=True)
    inv = lax.rsqrt(jnp.mean(centred * centred, axis=axes, keepdims=True) + eps)
    return centred * inv, inv


def _normalized_adjoint(dxhat, xhat, inv, axes, centred: bool = True):
    """``D N(x)*(Ĝ) = (1/σ)(Ĝ − mean Ĝ − x̂ mean(Ĝ ⊙ x̂))`` over ``axes``; without the mean
    of ``Ĝ`` for RMS norm (``centred=False``), which subtracts no mean."""
    along = dxhat - xhat * jnp.mean(dxhat * xhat, axis=axes, keepdims=True)
    if centred:
        along = along - jnp.mean(dxhat, axis=axes, keepdims=True)
    return inv * along


# --------------------------------------------------------------------------- validation


def _positive_eps(rule: str, eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise validation.RuleInputError(
            f"{rule}: eps must be a Python number > 0 (it keeps 1/√(σ² + ε) finite where the "
            f"variance is 0), got {eps!r}"
        )


def _validate_affine(rule: str, x, eps, layout: str, rank: int, **params) -> None:
    """``x`` floating with at least ``rank`` axes, every parameter of shape ``(C,)``, one dtype."""
    validation.floating(rule, "x", x)
    for name, p in params.items():
        validation.floating(rule, name, p)
    validation.min_rank(rule, "x", x, rank, layout)
    channels = jnp.shape(x)[-1:]
    for name, p in params.items():
        if jnp.shape(p) != channels:
            raise validation.RuleInputError(
                f"{rule}: {name} must have shape {channels} to match the channels (last axis) of x "
                f"(x: {jnp.shape(x)}, {name}: {jnp.shape(p)})"
            )
    validation.same_dtype(rule, x=x, **params)
    _positive_eps(rule, eps)


# --------------------------------------------------------------------------- usual mistakes


def _statistics_mistakes(
    reference: Callable[..., Any],
    count: Callable[[tuple], int],
    arguments: tuple[int, ...],
    wrong_axes: Callable[[tuple], Iterator[tuple[str, Callable[..., Any]]]],
) -> tuple[Mistake, ...]:
    """The usual mistakes of a centred norm, for each argument in ``arguments`` (0 for ``x``,
    1 for ``γ``): VJPs of the reference with ``μ`` or ``σ`` held constant, with the unbiased
    variance, or with ``wrong_axes(args)``'s other references, and (for ``x``) the unbiased
    ``m − 1`` in the variance's derivative alone. ``count(args)`` is ``m``, the entries one
    statistic is taken over.

    ``reference(*args, **kw)`` takes ``ddof`` and ``constant`` (:func:`_standardize`).
    """

    def candidates(i):
        def generate(vjp: VJP, args, g):
            m = count(args)
            pull = lambda f: vjp(lambda a: f(*mistakes.replace(args, i, a)), args[i], g)  # noqa: E731
            if i == 0:
                yield from _constant_statistics(reference, pull)
            if m > 1:
                yield (
                    "the right one for the unbiased variance (÷ (m − 1)) instead of the biased one (÷ m)",
                    pull(functools.partial(reference, ddof=1)),
                )
                if i == 0:  # the σ path's term, right − (σ held constant), scaled by m/(m − 1)
                    right, no_sigma = pull(reference), pull(functools.partial(reference, constant=("σ",)))
                    yield (
                        (
                            "the right one with ∂v/∂x = 2(x − μ)/(m − 1): the unbiased m − 1 in the variance's "
                            "derivative (the variance is biased, ÷ m)"
                        ),
                        no_sigma + m / (m - 1) * (right - no_sigma),
                    )
            for text, f in wrong_axes(args):
                yield text, pull(f)

        return Mistake(i, generate)

    return tuple(candidates(i) for i in arguments)


def _constant_statistics(reference, pull) -> Iterator[tuple[str, Any]]:
    yield (
        ("the right one with μ and σ treated as constants (dx = γ G/σ): the paths through μ and σ are missing"),
        pull(functools.partial(reference, constant=("μ", "σ"))),
    )
    yield (
        ("the right one without the term x̂ Σ(G x̂): the path through σ is missing"),
        pull(functools.partial(reference, constant=("σ",))),
    )
    yield (
        "the right one without the term Σ G: the path through μ is missing",
        pull(functools.partial(reference, constant=("μ",))),
    )


_LAYER_STATISTICS = (
    "the right one for statistics over the last axis (layer norm's) instead of every axis but the last (batch norm's)"
)
_BATCH_STATISTICS = (
    "the right one for statistics over every axis but the last (batch norm's) instead of the last axis (layer norm's)"
)


def _gamma_outside(reference: Callable[..., Any]) -> Mistake:
    """``γ ⊙ D N(x)*(G)`` instead of ``D N(x)*(γ ⊙ G)``: ``γ`` pulled out of sums along which it
    varies. ``D N(x)*(G)`` is the reference's VJP for ``x`` with ``γ = 1``."""

    def candidates(vjp: VJP, args, g):
        x, gamma = args[:2]
        unit = mistakes.replace(args, 1, jnp.ones_like(gamma))
        yield (
            (
                "the right one with γ taken out of the sums over the normalised entries: γ varies along them, "
                "so dx needs Σ(γ G), not γ Σ G"
            ),
            _per_channel(gamma, jnp.ndim(x)) * mistakes.reference_vjp(reference, unit, 0, g, vjp),
        )

    return Mistake(0, candidates)


# --------------------------------------------------------------------------- batch_norm


def batch_norm_reference(x, gamma, beta, eps=1e-5, ddof=0, constant=()):
    xhat = _standardize(x, _leading(x), eps, ddof, constant)
    return _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))


@functools.partial(devices.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Batch normalisation in training mode: ``y = γ x̂ + β``, ``x̂ = (x − μ)/σ`` per channel.

    ``x`` has shape ``(..., C)`` (``(N, C)``, NHWC, ...); ``γ`` and ``β`` shape ``(C,)``. Each
    channel is normalised with the statistics of its ``m`` entries on every axis but the last
    (the batch and, for images, H and W), with the biased variance:

        μ = (1/m) Σ_i x_i,    v = (1/m) Σ_i (x_i − μ)²,    σ = √(v + ε).

    PyTorch's ``F.batch_norm(x, None, None, γ, β, training=True, eps=ε)`` on the same numbers
    (channels first there). The statistics are taken in ``x``'s dtype. A channel needs at
    least 2 entries (PyTorch refuses 1 too); a constant channel has ``v = 0`` and comes out
    as ``β``, with ``ε`` keeping ``1/σ`` and every gradient finite.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients
    Using Fréchet Calculus", Lemma 4 and §4: the partial Fréchet derivative of each argument,
    the others held fixed, then its adjoint; seed 003: a variable on several paths; seed 004:
    the batch sums). Channels do not mix, so take one channel: ``i`` runs over its ``m``
    entries, ``⟨a, b⟩ = Σ_i a_i b_i`` and ``mean(a) = (1/m) Σ_i a_i``. By seed 002's
    Theorem 10 (with Remark 3), the cotangent of an argument ``a`` under ``G = ∂L/∂y`` is the
    adjoint of ``D_a y`` applied to ``G``: ``⟨G, D_a y(h)⟩ = ⟨D_a y*(G), h⟩`` for every ``h``.

    ``β`` and ``γ`` enter ``y`` linearly, like seed 002's bias through ``ι`` (one value copied
    to the channel's ``m`` entries): ``D_β y(h) = ι(h)`` and ``D_γ y(h) = x̂ ⊙ ι(h)``. ``x``
    enters three times — directly, through ``μ`` and through ``σ`` — and seed 003's example
    (``W`` on two paths) says its derivative is the sum over the paths. Perturb ``x`` by
    ``h``: find ``Dμ(h)``, then ``Dv(h)`` and ``Dσ(h)``, then ``D x̂(h)``, and take adjoints.

    Result:

        Dμ(h) = mean(h)
        Dv(h) = (2/m) Σ_i (x_i − μ)(h_i − mean(h)) = (2/m) Σ_i (x_i − μ) h_i    (Σ_i (x_i − μ) = 0)
        Dσ(h) = Dv(h) / (2σ) = mean(x̂ ⊙ h)
        D x̂(h) = h/σ − Dμ(h)/σ − (x − μ) Dσ(h)/σ² = (1/σ) (h − mean(h) − x̂ mean(x̂ ⊙ h))
                 direct   through μ    through σ

    and ``D_x y(h) = γ D x̂(h)``. Swapping the sums, ``⟨G, mean(h)⟩ = ⟨mean(G), h⟩`` and
    ``⟨G, x̂ mean(x̂ ⊙ h)⟩ = ⟨x̂ mean(G ⊙ x̂), h⟩``: ``D x̂`` is its own adjoint, and

        dx = (γ/σ) (G − mean(G) − x̂ mean(G ⊙ x̂)) = (γ/(m σ)) (m G − Σ G − x̂ Σ(G ⊙ x̂))
        dγ = ι*(G ⊙ x̂) = Σ G ⊙ x̂,        dβ = ι*(G) = Σ G

    with every ``Σ`` over every axis but the last (the batch, H and W: seed 004's ``1ᵀ G``,
    one ``γ`` and ``β`` shared by all of them). The two sums in ``dx`` are ``dβ`` and ``dγ``.
    ``Σ G`` is the path through ``μ`` and ``x̂ Σ(G ⊙ x̂)`` the path through ``σ``: treating
    ``μ`` and ``σ`` as constants leaves ``dx = γ G/σ``. Residuals: ``x̂``, ``1/σ`` per channel
    and ``γ`` — not ``x``.
    """
    return batch_norm_forward(x, gamma, beta, eps)[0]


def batch_norm_forward(x, gamma, beta, eps=1e-5):
    _validate_affine("batch_norm", x, eps, "(batch, ..., C)", 2, gamma=gamma, beta=beta)
    if math.prod(jnp.shape(x)[:-1]) < 2:
        raise validation.RuleInputError(
            f"batch_norm: each channel needs more than one value to normalise over, got "
            f"{math.prod(jnp.shape(x)[:-1])} (x: {jnp.shape(x)}); use layer_norm or group_norm for a single sample"
        )
    xhat, inv = _statistics(x, _leading(x), eps)
    y = _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))
    return y, (xhat, inv, gamma)


def batch_norm_backward(xhat, inv, gamma, dgamma, dbeta, g):
    """``dx = (γ/(m σ)) (m G − Σ G − x̂ Σ(G ⊙ x̂))``, its two sums being ``dβ`` and ``dγ``."""
    m = math.prod(jnp.shape(g)[:-1])
    n = jnp.ndim(g)
    return _per_channel(gamma, n) * inv / m * (m * g - _per_channel(dbeta, n) - xhat * _per_channel(dgamma, n))


def batch_norm_gradient(xhat, g):
    """``dγ = Σ G ⊙ x̂`` and ``dβ = Σ G`` over every axis but the last (also layer and group norm's)."""
    return _channel_sum(g * xhat), _channel_sum(g)


@_one_program(0)
def _batch_norm_vjp(eps, residuals, g):
    del eps
    xhat, inv, gamma = residuals
    dgamma, dbeta = batch_norm_gradient(xhat, g)
    return batch_norm_backward(xhat, inv, gamma, dgamma, dbeta, g), dgamma, dbeta


batch_norm.defvjp(batch_norm_forward, _batch_norm_vjp)


def _affine_samples(configs, key, dtype, constant=None):
    """``(x, γ, β, *rest)`` samples; ``constant(x)`` makes the constant entries of the sample
    labelled "a constant ...". ``x`` is drawn with scale 2: the gradients scale as ``1/σ``, and
    ``σ ≈ 2`` keeps their float32 round-off below the checker's absolute tolerance (ten ulps
    of 1) where the closed form cancels, even for a group of 6 entries with a small variance."""
    k = keys(key)
    out = []
    for shape, rest, label in configs:
        c = shape[-1]
        x = normal(next(k), shape, dtype, 2.0)
        if constant is not None and label.startswith("a constant"):
            x = constant(x)
        out.append(Sample((x, normal(next(k), (c,), dtype, 0.5) + 1, normal(next(k), (c,), dtype), *rest), label))
    return out


# ε = 0.1 where a variance is 0: there 1/σ = 1/√ε, the finite differences' step h sees the
# curvature h²/ε (above their 1e-6 tolerance at the default 1e-5), and float32 round-off grows
# with 1/σ. (The constant-channel test in tests/rules/test_normalization.py uses the default ε.)
_BATCH_NORM_CONFIGS = [
    ((4, 3), (1e-5,), "batch 4, no spatial axes"),
    ((1, 3, 3, 2), (1e-5,), "batch 1, NHWC"),
    ((2, 3, 2, 3), (1e-3,), "batch 2, NHWC, eps 1e-3"),
    ((2, 2, 2, 3), (0.1,), "a constant channel, eps 0.1"),
]


def _batch_norm_samples(key, dtype):
    return _affine_samples(_BATCH_NORM_CONFIGS, key, dtype, lambda x: x.at[..., 1].set(0.7))


register(
    Rule(
        name="batch_norm",
        fn=batch_norm,
        reference=batch_norm_reference,
        sample_inputs=_batch_norm_samples,
        differentiable=(0, 1, 2),
        seeds=_SEEDS,
        mistakes=_statistics_mistakes(
            batch_norm_reference,
            lambda args: math.prod(jnp.shape(args[0])[:-1]),
            (0, 1),
            lambda args: iter([(_LAYER_STATISTICS, layer_norm_reference)]),
        ),
    )
)

# --------------------------------------------------------------------------- layer_norm


def layer_norm_reference(x, gamma, beta, eps=1e-5, ddof=0, constant=()):
    xhat = _standardize(x, _last(x), eps, ddof, constant)
    return _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))


@functools.partial(devices.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Layer normalisation over the last axis: ``y = γ ⊙ x̂ + β``, ``x̂ = (x − μ)/σ`` per row.

    ``x`` has shape ``(..., C)``; ``γ`` and ``β`` shape ``(C,)``. Every row (every sample, or
    every pixel of an NHWC image) is normalised with its own statistics over its ``m = C``
    entries, biased variance, ``σ = √(v + ε)``: PyTorch's ``F.layer_norm(x, (C,), γ, β, ε)``.
    A constant row comes out as ``β``.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients
    Using Fréchet Calculus", Lemma 4 and §4: partial Fréchet derivatives, then adjoints;
    seed 003: a variable on several paths; seed 004: the batch sums). Rows do not mix, so
    take one row: ``i`` runs over its ``m = C`` entries, ``mean(a) = (1/m) Σ_i a_i``. The
    statistics are batch norm's (see ``batch_norm``), taken along the row instead of down the
    channel; ``x`` again enters directly, through ``μ`` and through ``σ``. The difference:
    ``γ`` now varies *along* the entries the statistics sum over. Take ``D_x y(h) = γ ⊙ D x̂(h)``
    and ``D_γ y``, ``D_β y`` one argument at a time, and the adjoint of each.

    Result:

    As for batch norm, ``Dμ(h) = mean(h)``, ``Dσ(h) = mean(x̂ ⊙ h)`` and

        D x̂(h) = (1/σ) (h − mean(h) − x̂ mean(x̂ ⊙ h))        (direct, through μ, through σ)

    which is its own adjoint. With ``Ĝ = γ ⊙ G``, ``⟨G, γ ⊙ D x̂(h)⟩ = ⟨Ĝ, D x̂(h)⟩``, so

        dx = (1/σ) (Ĝ − mean(Ĝ) − x̂ mean(Ĝ ⊙ x̂)) = (1/(m σ)) (m Ĝ − Σ_row Ĝ − x̂ Σ_row(Ĝ ⊙ x̂))
        dγ = Σ G ⊙ x̂,    dβ = Σ G

    where ``Σ_row`` sums along the last axis and ``dγ``, ``dβ`` sum over every other axis
    (every row shares ``γ`` and ``β``: seed 004's ``1ᵀ G``). ``γ`` stays inside the row sums:
    ``γ Σ G`` would be batch norm's form, right only where ``γ`` is constant along the sums.
    Residuals: ``x̂``, ``1/σ`` per row and ``γ``.
    """
    return layer_norm_forward(x, gamma, beta, eps)[0]


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    _validate_affine("layer_norm", x, eps, "(..., C)", 1, gamma=gamma, beta=beta)
    xhat, inv = _statistics(x, _last(x), eps)
    y = _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))
    return y, (xhat, inv, gamma)


def layer_norm_backward(xhat, inv, gamma, g):
    """``dx = (1/σ)(Ĝ − mean(Ĝ) − x̂ mean(Ĝ ⊙ x̂))`` along the last axis, ``Ĝ = γ ⊙ G``."""
    return _normalized_adjoint(_per_channel(gamma, jnp.ndim(g)) * g, xhat, inv, _last(g))


@_one_program(0)
def _layer_norm_vjp(eps, residuals, g):
    del eps
    xhat, inv, gamma = residuals
    return (layer_norm_backward(xhat, inv, gamma, g), *batch_norm_gradient(xhat, g))


layer_norm.defvjp(layer_norm_forward, _layer_norm_vjp)

_LAYER_NORM_CONFIGS = [
    ((4, 5), (1e-5,), "batch 4"),
    ((1, 3), (1e-5,), "batch 1"),
    ((2, 3, 2, 4), (1e-3,), "NHWC, per pixel, eps 1e-3"),
    ((6,), (1e-5,), "no batch axis"),
    ((2, 4), (0.1,), "a constant row, eps 0.1"),
]


def _layer_norm_samples(key, dtype):
    return _affine_samples(_LAYER_NORM_CONFIGS, key, dtype, lambda x: x.at[0].set(-0.3))


register(
    Rule(
        name="layer_norm",
        fn=layer_norm,
        reference=layer_norm_reference,
        sample_inputs=_layer_norm_samples,
        differentiable=(0, 1, 2),
        seeds=_SEEDS,
        mistakes=(
            *_statistics_mistakes(
                layer_norm_reference,
                lambda args: jnp.shape(args[0])[-1],
                (0, 1),
                lambda args: iter([(_BATCH_STATISTICS, batch_norm_reference)]),
            ),
            _gamma_outside(layer_norm_reference),
        ),
    )
)

# --------------------------------------------------------------------------- group_norm


def _grouped(x, groups):
    """``(N, *S, C)`` as ``(N, *S, G, C/G)`` and the axes of one sample's group: ``S`` and the last."""
    shape = jnp.shape(x)
    return jnp.reshape(x, (*shape[:-1], groups, shape[-1] // groups)), (*range(1, len(shape) - 1), len(shape))


def group_norm_reference(x, gamma, beta, groups, eps=1e-5, ddof=0, constant=()):
    xg, axes = _grouped(x, groups)
    xhat = jnp.reshape(_standardize(xg, axes, eps, ddof, constant), jnp.shape(x))
    return _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))


@functools.partial(devices.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, groups: int, eps: float = 1e-5) -> jax.Array:
    """Group normalisation, channels last: ``y = γ ⊙ x̂ + β`` with statistics per sample and group.

    ``x`` has shape ``(N, *spatial, C)`` (NHWC, NWC, or ``(N, C)``: any number of spatial
    axes); ``γ`` and ``β`` shape ``(C,)``. The ``C`` channels are split into ``groups``
    contiguous groups of ``C/groups``; each sample's group is normalised with the statistics
    of its ``m = (spatial size)·C/groups`` entries, biased variance, ``σ = √(v + ε)``.
    PyTorch's ``F.group_norm(x_nchw, groups, γ, β, ε)`` on the NCHW transpose. ``groups = 1``
    is layer norm over the spatial axes and channels together, ``groups = C`` instance norm.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients
    Using Fréchet Calculus", Lemma 4 and §4: partial Fréchet derivatives, then adjoints;
    seed 003: a variable on several paths; seed 004: the batch sums). Groups do not mix, so
    take one sample's group: ``i`` runs over its ``m`` entries. The statistics are
    batch norm's over that set (see ``batch_norm``), and ``x`` enters directly, through ``μ``
    and through ``σ``; as in layer norm, ``γ`` varies within the set (one value per channel,
    a group holding ``C/groups`` channels). Derive ``D_x y``, ``D_γ y``, ``D_β y`` and their
    adjoints.

    Result:

        D x̂(h) = (1/σ) (h − mean(h) − x̂ mean(x̂ ⊙ h))       (direct, through μ, through σ)

    over the group, its own adjoint; with ``Ĝ = γ ⊙ G``, summing over the group's entries,

        dx = (1/(m σ)) (m Ĝ − Σ_group Ĝ − x̂ Σ_group(Ĝ ⊙ x̂))
        dγ = Σ G ⊙ x̂,    dβ = Σ G

    with ``dγ`` and ``dβ`` summed over the batch and the spatial axes, per channel (seed 004's
    ``1ᵀ G``). Taking the statistics per channel instead of per group is instance norm, a
    different function with a different gradient. Residuals: ``x̂``, ``1/σ`` per sample and
    group, and ``γ``.
    """
    return group_norm_forward(x, gamma, beta, groups, eps)[0]


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    _validate_affine("group_norm", x, eps, "(N, *spatial, C)", 2, gamma=gamma, beta=beta)
    channels = jnp.shape(x)[-1]
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or channels % groups:
        raise validation.RuleInputError(
            f"group_norm: groups must be a positive Python int that divides the {channels} channels of x, "
            f"got {groups!r} (x: {jnp.shape(x)})"
        )
    xg, axes = _grouped(x, groups)
    xhat, inv = _statistics(xg, axes, eps)
    xhat = jnp.reshape(xhat, jnp.shape(x))
    y = _per_channel(gamma, jnp.ndim(x)) * xhat + _per_channel(beta, jnp.ndim(x))
    return y, (xhat, inv, gamma)


def group_norm_backward(xhat, inv, gamma, groups, g):
    """``dx = (1/σ)(Ĝ − mean(Ĝ) − x̂ mean(Ĝ ⊙ x̂))`` over each sample's group, ``Ĝ = γ ⊙ G``."""
    dxhat, axes = _grouped(_per_channel(gamma, jnp.ndim(g)) * g, groups)
    return jnp.reshape(_normalized_adjoint(dxhat, _grouped(xhat, groups)[0], inv, axes), jnp.shape(g))


@_one_program(0, 1)
def _group_norm_vjp(groups, eps, residuals, g):
    del eps
    xhat, inv, gamma = residuals
    return (group_norm_backward(xhat, inv, gamma, groups, g), *batch_norm_gradient(xhat, g))


group_norm.defvjp(group_norm_forward, _group_norm_vjp)

_GROUP_NORM_CONFIGS = [
    ((2, 3, 3, 4), (2, 1e-5), "NHWC, 2 groups of 2 channels"),
    ((1, 2, 2, 6), (3, 1e-5), "batch 1, 3 groups"),
    ((2, 2, 3, 3), (1, 1e-3), "a single group, eps 1e-3"),
    ((2, 3, 2, 3), (3, 1e-5), "groups = C (instance norm)"),
    ((2, 5, 4), (2, 1e-5), "one spatial axis (NWC)"),
    ((2, 2, 2, 2), (2, 0.1), "a constant channel, groups = C, eps 0.1"),
]


def _group_norm_samples(key, dtype):
    return _affine_samples(_GROUP_NORM_CONFIGS, key, dtype, lambda x: x.at[0, ..., 1].set(1.3))


def _group_size(args):
    x, groups = args[0], args[3]
    return math.prod(jnp.shape(x)[1:]) // groups


def _other_groupings(args):
    """Group norm's references with the statistics per channel and over all channels."""
    groups, channels = args[3], jnp.shape(args[0])[-1]
    if groups != channels:
        yield (
            "the right one for statistics per channel (groups = C, instance norm) instead of per group",
            lambda x, gamma, beta, groups, eps: group_norm_reference(x, gamma, beta, channels, eps),
        )
    if groups != 1:
        yield (
            f"the right one for one group of all the channels (groups = 1) instead of groups = {groups}",
            lambda x, gamma, beta, groups, eps: group_norm_reference(x, gamma, beta, 1, eps),
        )


register(
    Rule(
        name="group_norm",
        fn=group_norm,
        reference=group_norm_reference,
        sample_inputs=_group_norm_samples,
        differentiable=(0, 1, 2),
        seeds=_SEEDS,
        mistakes=(
            *_statistics_mistakes(group_norm_reference, _group_size, (0, 1), _other_groupings),
            _gamma_outside(group_norm_reference),
        ),
    )
)

# --------------------------------------------------------------------------- rms_norm


def rms_norm_reference(x, gamma, eps=1e-6, constant=()):
    ms = jnp.mean(x * x, axis=_last(x), keepdims=True)
    if "r" in constant:  # a usual mistake: r held constant
        ms = lax.stop_gradient(ms)
    return _per_channel(gamma, jnp.ndim(x)) * x / jnp.sqrt(ms + eps)


@functools.partial(devices.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, gamma: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMS normalisation over the last axis: ``y = γ ⊙ x / r``, ``r = √(mean(x²) + ε)`` per row.

    ``x`` has shape ``(..., C)``, ``γ`` shape ``(C,)``; no mean is subtracted and there is no
    ``β``. PyTorch's ``F.rms_norm(x, (C,), γ, ε)``. A zero row comes out as 0, with
    ``r = √ε`` keeping the gradient finite.

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients
    Using Fréchet Calculus", Lemma 4 and §4: partial Fréchet derivatives, then adjoints;
    seed 003: a variable on several paths; seed 004: the batch sums). Take one row, ``i``
    over its ``m = C`` entries, and ``x̂ = x / r``. ``x`` enters twice, directly and through
    ``r`` (there is no ``μ``). Perturb ``x`` by ``h``: find ``Dr(h)``, then ``D x̂(h)``, its
    adjoint, and the adjoint of ``D_γ y(h) = x̂ ⊙ h``.

    Result:

        Dr(h) = (1/(2r)) (2/m) Σ_i x_i h_i = mean(x̂ ⊙ h)
        D x̂(h) = h/r − x Dr(h)/r² = (1/r) (h − x̂ mean(x̂ ⊙ h))        (direct, through r)

    which is its own adjoint. With ``Ĝ = γ ⊙ G``:

        dx = (1/(m r)) (m Ĝ − x̂ Σ_row(Ĝ ⊙ x̂)),        dγ = Σ G ⊙ x̂

    with ``dγ`` summed over every axis but the last. Treating ``r`` as a constant leaves
    ``dx = γ G/r``. Residuals: ``x̂``, ``1/r`` per row and ``γ``.
    """
    return rms_norm_forward(x, gamma, eps)[0]


def rms_norm_forward(x, gamma, eps=1e-6):
    _validate_affine("rms_norm", x, eps, "(..., C)", 1, gamma=gamma)
    xhat, inv = _root_mean_square(x, eps)
    return _per_channel(gamma, jnp.ndim(x)) * xhat, (xhat, inv, gamma)


@_one_program(1)
def _root_mean_square(x, eps):
    """``x̂ = x / r`` and ``1/r``, ``r = √(mean(x²) + ε)`` along the last axis (kept)."""
    inv = lax.rsqrt(jnp.mean(x * x, axis=_last(x), keepdims=True) + eps)
    return x * inv, inv


def rms_norm_backward(xhat, inv, gamma, g):
    """``dx = (1/r)(Ĝ − x̂ mean(Ĝ ⊙ x̂))`` along the last axis, ``Ĝ = γ ⊙ G``."""
    return _normalized_adjoint(_per_channel(gamma, jnp.ndim(g)) * g, xhat, inv, _last(g), centred=False)


def rms_norm_gradient(xhat, g):
    """``dγ = Σ G ⊙ x̂`` over every axis but the last."""
    return _channel_sum(g * xhat)


@_one_program(0)
def _rms_norm_vjp(eps, residuals, g):
    del eps
    xhat, inv, gamma = residuals
    return rms_norm_backward(xhat, inv, gamma, g), rms_norm_gradient(xhat, g)


rms_norm.defvjp(rms_norm_forward, _rms_norm_vjp)


def _rms_norm_samples(key, dtype):
    k = keys(key)
    configs = [
        ((4, 5), 1e-6, "batch 4"),
        ((1, 3), 1e-6, "batch 1"),
        ((2, 3, 2, 4), 1e-6, "NHWC, per pixel"),
        ((2, 4), 0.1, "a zero row (r = √ε), eps 0.1"),
    ]
    out = []
    for shape, eps, label in configs:
        x = normal(next(k), shape, dtype, 2.0)
        x = x.at[0].set(0.0) if label.startswith("a zero row") else x
        out.append(Sample((x, normal(next(k), shape[-1:], dtype, 0.5) + 1, eps), label))
    return out


def _rms_constant(vjp: VJP, args, g):
    yield (
        ("the right one with r treated as a constant (dx = γ G/r): the path through r is missing"),
        vjp(lambda a: rms_norm_reference(a, *args[1:], constant=("r",)), args[0], g),
    )


register(
    Rule(
        name="rms_norm",
        fn=rms_norm,
        reference=rms_norm_reference,
        sample_inputs=_rms_norm_samples,
        differentiable=(0, 1),
        seeds=_SEEDS,
        mistakes=(Mistake(0, _rms_constant), _gamma_outside(rms_norm_reference)),
    )
)

# --------------------------------------------------------------------------- dropout


def _kept(key, rate, shape):
    """The entries dropout keeps: each with probability ``1 − rate``, drawn from ``key``. The
    uniform draws are float32 whatever ``x``'s dtype and the x64 setting, so one key gives one mask."""
    return jax.random.bernoulli(key, np.float32(1 - rate), shape)


def dropout_reference(x, key, rate):
    return jnp.where(_kept(key, rate, jnp.shape(x)), x / (1 - rate), jnp.zeros_like(x))


@functools.partial(devices.custom_vjp, nondiff_argnums=(2,))
def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """Inverted dropout: each entry kept with probability ``1 − rate`` and scaled by ``1/(1 − rate)``.

    ``y = M ⊙ x / (1 − rate)`` with the 0/1 mask ``M`` drawn from the PRNG ``key``
    (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``) as
    ``M = jax.random.bernoulli(key, np.float32(1 − rate), x.shape)``: float32 draws whatever
    ``x``'s dtype and the x64 setting, so the same key gives the same mask; the expectation of
    ``y`` is ``x``. ``rate`` is a Python number in ``[0, 1)``;
    ``rate = 0`` is the identity. Neither ``key`` nor ``rate`` is differentiated (``key``
    gets a zero ``float0`` cotangent).

    Derivation (seed 002, T. Hamm, "A Derivation of Feedforward Neural Network Gradients
    Using Fréchet Calculus", Lemma 4 and §4: the partial Fréchet derivative in ``x``, ``key``
    and ``rate`` held fixed, then its adjoint ``⟨C(h), y⟩ = ⟨h, C†(y)⟩``; seed 003: the
    Jacobian of an element-wise map is ``diag(φ')``). For a fixed mask, ``y`` is the
    element-wise map ``φ_i(x_i) = M_i x_i / (1 − rate)``, linear in ``x``.

    Result:

        D_x y(h) = diag(M / (1 − rate)) h,  a diagonal map, its own adjoint
        ⇒  dx = M ⊙ G / (1 − rate)

    The backward needs the forward's very mask ``M``: a mask drawn with another key is the
    gradient of a different function. Residual: the key alone (two 32-bit words instead of a
    mask the size of ``x``); the backward draws ``M`` from it again, which gives the same mask.
    """
    return dropout_forward(x, key, rate)[0]


def _validate_key(rule: str, key) -> None:
    """One typed key (shape ``()``) or one raw ``uint32`` key (shape ``(2,)``); else a dtype or shape error."""
    dtype = key.dtype if hasattr(key, "dtype") else np.asarray(key).dtype
    typed = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = not typed and dtype == np.uint32
    if (typed and np.shape(key) == ()) or (raw and np.shape(key) == (2,)):
        return
    error = validation.RuleInputError if typed or raw else validation.RuleDTypeError
    raise error(
        f"{rule}: key must be one PRNG key, jax.random.key(seed) or jax.random.PRNGKey(seed) "
        f"(uint32 of shape (2,)), got {dtype} with shape {np.shape(key)}"
    )


def dropout_forward(x, key, rate):
    validation.floating("dropout", "x", x)
    _validate_key("dropout", key)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise validation.RuleInputError(
            f"dropout: rate must be a Python number in [0, 1), the probability of dropping an entry, got {rate!r}"
        )
    return _masked(x, key, rate), key


@_one_program(2)
def _masked(a, key, rate):
    """``M ⊙ a / (1 − rate)``: the forward on ``x`` and, the map being diagonal, the backward on ``G``."""
    return jnp.where(_kept(key, rate, jnp.shape(a)), a / (1 - rate), jnp.zeros_like(a))


def dropout_backward(key, rate, g):
    """``dx = M ⊙ G / (1 − rate)``, with ``M`` drawn again from the forward's key."""
    return _masked(g, key, rate)


def _dropout_vjp(rate, residuals, g):
    return dropout_backward(residuals, rate, g), None


dropout.defvjp(dropout_forward, _dropout_vjp)


def _dropout_samples(key, dtype):
    k = keys(key)
    configs = [
        ((4, 5), 0.5, "rate 0.5"),
        ((1, 6), 0.8, "batch 1, rate 0.8"),
        ((2, 3, 3, 2), 0.3, "NHWC, rate 0.3, a typed key"),
        ((3, 4), 0.0, "rate 0: the identity"),
    ]
    out = []
    for shape, rate, label in configs:
        x, mask_key = normal(next(k), shape, dtype), next(k)
        if "typed" in label:
            mask_key = jax.random.wrap_key_data(mask_key)
        out.append(Sample((x, mask_key, rate), label))
    return out


def _dropout_mistakes(vjp: VJP, args, g):
    x, key, rate = args
    right = mistakes.reference_vjp(dropout_reference, args, 0, g, vjp)
    yield "the right one without the factor 1/(1 − rate): the kept entries were not rescaled", (1 - rate) * right
    yield "G / (1 − rate): the mask is missing", g / (1 - rate)
    float64_mask = jnp.where(jax.random.bernoulli(key, np.float64(1 - rate), jnp.shape(x)), g / (1 - rate), 0)
    yield (
        (
            "the right one for the mask drawn with the probability in float64 (jax.random.bernoulli(key, 1 − rate, "
            "shape) with x64 on): float64 draws give another mask; the forward draws np.float32(1 − rate)"
        ),
        float64_mask.astype(jnp.result_type(g)),
    )
    for i in (0, 1):  # jax.random.fold_in(key, 1) is jax.random.split(key)[1] for the default PRNG
        yield (
            (
                f"the right one for the mask drawn with another key (jax.random.split(key)[{i}]): the backward "
                "must use the forward's mask"
            ),
            mistakes.reference_vjp(dropout_reference, (x, jax.random.split(key)[i], rate), 0, g, vjp),
        )


register(
    Rule(
        name="dropout",
        fn=dropout,
        reference=dropout_reference,
        sample_inputs=_dropout_samples,
        differentiable=(0,),
        seeds=(
            ("002", "Lemma 4 and §4: the partial Fréchet derivative in x, then its adjoint"),
            ("003", "diag(φ') of an element-wise map"),
        ),
        linear_in=((0,),),
        mistakes=(Mistake(0, _dropout_mistakes),),
    )
)
