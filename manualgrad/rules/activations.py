"""Element-wise activations ``F = σ(z)`` whose backward rules read the saved output, and gelu.

Seed 003 ("the Jacobian of an element-wise function is diag(φ'(x))") gives every backward
pass here the form ``dz = G ⊙ σ'(z)``. Seed 002's Remark 8 adds that for ReLU, sigmoid and
tanh ``σ'(z)`` is a function of ``F = σ(z)`` alone, so the forward pass can save ``F``
instead of ``z``. In a network ``F`` is also the next layer's input, which its dense rule
saves anyway, so the activation costs no extra residual at all. Gelu is not monotone, so its
``σ'`` is no function of ``F``: it saves ``z``.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import validation
from manualgrad.registry import Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes
from manualgrad.rules.samples import keys, normal


def _activation_samples(scale: float):
    """Sample inputs shared by the activations: drawn with ``scale``, in awkward shapes."""

    def samples(key, dtype):
        k = keys(key)
        return [
            Sample((normal(next(k), (4, 3), dtype, scale),), "batch 4"),
            Sample((normal(next(k), (1, 1), dtype, scale),), "batch 1, width 1"),
            Sample((normal(next(k), (2, 3, 5), dtype, scale),), "extra leading axis"),
            Sample((normal(next(k), (), dtype, scale),), "scalar"),
        ]

    return samples


# --------------------------------------------------------------------------- sigmoid


def sigmoid_reference(z: jax.Array) -> jax.Array:
    return 1 / (1 + jnp.exp(-z))


@devices.custom_vjp
def sigmoid(z: jax.Array) -> jax.Array:
    """Logistic sigmoid ``F = 1 / (1 + e^{-z})``, backward from the saved output.

    Derivation (seed 001 ① "find σ'(x) in terms of σ(x)"; seed 002 Remark 8). The forward
    saves only the output ``F``, so ``σ'`` must be written in terms of ``F``.

    Result:

        σ'(z) = e^{-z} / (1 + e^{-z})² = σ(z) · (1 − σ(z))  ⇒  dz = G ⊙ F ⊙ (1 − F)

    Only ``F`` is saved. The price, for a teacher to point out: where ``F`` is within a few
    ulps of 1 (z ≳ 17 in float64, z ≳ 8 in float32) ``1 − F`` keeps few correct digits, so
    the relative error of the backward grows there, while its absolute error stays below
    one ulp. The forward is ``lax.logistic``, which neither overflows nor warns for any z.
    """
    return sigmoid_forward(z)[0]


def sigmoid_forward(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    validation.floating("sigmoid", "z", z)
    f = jax.nn.sigmoid(z)
    return f, f


def sigmoid_backward(f: jax.Array, g: jax.Array) -> jax.Array:
    """``dz = G ⊙ F ⊙ (1 − F)``."""
    return g * f * (1 - f)


def _sigmoid_vjp(f, g):
    return (sigmoid_backward(f, g),)


sigmoid.defvjp(sigmoid_forward, _sigmoid_vjp)

register(
    Rule(
        name="sigmoid",
        fn=sigmoid,
        reference=sigmoid_reference,
        sample_inputs=_activation_samples(2.0),
        differentiable=(0,),
        seeds=(("002", "Remark 8: σ' = F(1 − F)"), ("001", "① σ'(x) = σ(x)(1 − σ(x))")),
        mistakes=mistakes.elementwise(sigmoid_reference, lambda f: jnp.log(f) - jnp.log1p(-f)),
    )
)

# --------------------------------------------------------------------------- tanh


def tanh_reference(z: jax.Array) -> jax.Array:
    return jnp.sinh(z) / jnp.cosh(z)


@devices.custom_vjp
def tanh(z: jax.Array) -> jax.Array:
    """Hyperbolic tangent ``F = tanh z``, backward from the saved output.

    Derivation (seed 002 Remark 8). The forward saves only the output ``F``.

    Result:

        tanh'(z) = 1 / cosh² z = 1 − tanh² z  ⇒  dz = G ⊙ (1 − F²)

    As for the sigmoid, ``1 − F²`` loses relative accuracy where ``|F|`` is within ulps of 1.
    """
    return tanh_forward(z)[0]


def tanh_forward(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    validation.floating("tanh", "z", z)
    f = jnp.tanh(z)
    return f, f


def tanh_backward(f: jax.Array, g: jax.Array) -> jax.Array:
    """``dz = G ⊙ (1 − F²)``."""
    return g * (1 - f * f)


def _tanh_vjp(f, g):
    return (tanh_backward(f, g),)


tanh.defvjp(tanh_forward, _tanh_vjp)

register(
    Rule(
        name="tanh",
        fn=tanh,
        reference=tanh_reference,
        sample_inputs=_activation_samples(1.5),
        differentiable=(0,),
        seeds=(("002", "Remark 8: σ' = 1 − F²"),),
        mistakes=mistakes.elementwise(tanh_reference, jnp.arctanh),
    )
)

# --------------------------------------------------------------------------- relu


def relu_reference(z: jax.Array) -> jax.Array:
    return jnp.where(z > 0, z, jnp.zeros_like(z))


@devices.custom_vjp
def relu(z: jax.Array) -> jax.Array:
    """Rectified linear unit ``F = max(z, 0)``, backward from the saved output.

    Derivation (seed 002 Remark 8). The forward saves only the output ``F``.

    Result:

        relu'(z) = 1 if z > 0, 0 if z < 0   and   z > 0 ⇔ F > 0  ⇒  dz = G ⊙ [F > 0]

    At the kink z = 0 the derivative is taken as 0, the value ``jax.nn.relu`` uses.
    """
    return relu_forward(z)[0]


def relu_forward(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    validation.floating("relu", "z", z)
    f = jnp.maximum(z, 0)
    return f, f


def relu_backward(f: jax.Array, g: jax.Array) -> jax.Array:
    """``dz = G ⊙ [F > 0]``."""
    return jnp.where(f > 0, g, jnp.zeros_like(g))


def _relu_vjp(f, g):
    return (relu_backward(f, g),)


relu.defvjp(relu_forward, _relu_vjp)


def _relu_samples(key, dtype):
    at_zero = jnp.array([[-1.0, 0.0, 2.0], [0.0, 3.0, -0.5]], dtype)
    return [*_activation_samples(1.0)(key, dtype), Sample((at_zero,), "exact zeros (kink)")]


register(
    Rule(
        name="relu",
        fn=relu,
        reference=relu_reference,
        sample_inputs=_relu_samples,
        differentiable=(0,),
        seeds=(("002", "Remark 8: σ' = [F > 0]"),),
        mistakes=mistakes.elementwise(relu_reference),
    )
)

# --------------------------------------------------------------------------- leaky_relu


def leaky_relu_reference(z: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    return jnp.where(z > 0, z, negative_slope * z)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def leaky_relu(z: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """Leaky ReLU ``F = z if z > 0 else α z``, backward from the saved output.

    Derivation (seed 002 Remark 8, extended). The forward saves only the output ``F``.

    Result:

        σ'(z) = 1 if z > 0, α if z < 0   and, for α ≥ 0,  z > 0 ⇔ F > 0
        ⇒  dz = G ⊙ (1 if F > 0 else α)

    The equivalence needs ``α ≥ 0`` (a negative slope would make F > 0 for z < 0), so a
    negative ``negative_slope`` is refused. At z = 0 the derivative is taken as α, the
    one-sided value from the left, like ReLU's 0. ``negative_slope`` is a Python number
    fixed at trace time; it gets no gradient.
    """
    return leaky_relu_forward(z, negative_slope)[0]


def leaky_relu_forward(z: jax.Array, negative_slope: float = 0.01) -> tuple[jax.Array, jax.Array]:
    validation.floating("leaky_relu", "z", z)
    if not isinstance(negative_slope, numbers.Real) or negative_slope < 0:
        raise validation.RuleInputError(
            f"leaky_relu: negative_slope must be a Python number ≥ 0 (so that the sign of the "
            f"output tells the sign of the input), got {negative_slope!r}"
        )
    f = jnp.where(z > 0, z, negative_slope * z)
    return f, f


def leaky_relu_backward(f: jax.Array, negative_slope: float, g: jax.Array) -> jax.Array:
    """``dz = G ⊙ (1 if F > 0 else α)``."""
    return jnp.where(f > 0, g, negative_slope * g)


def _leaky_relu_vjp(negative_slope, f, g):
    return (leaky_relu_backward(f, negative_slope, g),)


leaky_relu.defvjp(leaky_relu_forward, _leaky_relu_vjp)


def _leaky_relu_samples(key, dtype):
    z = _activation_samples(1.0)(key, dtype)
    return [
        *(Sample((s.args[0], 0.01), s.label) for s in z),
        Sample((z[0].args[0], 0.3), "slope 0.3"),
        Sample((jnp.array([-2.0, 0.0, 1.0], dtype), 0.2), "exact zero (kink)"),
    ]


register(
    Rule(
        name="leaky_relu",
        fn=leaky_relu,
        reference=leaky_relu_reference,
        sample_inputs=_leaky_relu_samples,
        differentiable=(0,),
        seeds=(("002", "Remark 8, with slope α for z < 0"),),
        mistakes=mistakes.elementwise(leaky_relu_reference),
    )
)

# --------------------------------------------------------------------------- softplus


def softplus_reference(z: jax.Array) -> jax.Array:
    return jnp.log1p(jnp.exp(z))


@devices.custom_vjp
def softplus(z: jax.Array) -> jax.Array:
    """Softplus ``F = log(1 + e^z)``, backward from the saved output.

    Derivation (seed 002 Remark 8, applied to softplus). The forward saves only the output ``F``.

    Result:

        softplus'(z) = e^z / (1 + e^z) = 1 − e^{−F}     since e^{−F} = 1 / (1 + e^z)
        ⇒  dz = G ⊙ (1 − e^{−F}) = −G ⊙ expm1(−F)

    ``expm1`` keeps full relative accuracy where F is tiny (z ≪ 0). The forward is
    ``logaddexp(z, 0)``, finite for every finite z.
    """
    return softplus_forward(z)[0]


def softplus_forward(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    validation.floating("softplus", "z", z)
    f = jnp.logaddexp(z, 0)
    return f, f


def softplus_backward(f: jax.Array, g: jax.Array) -> jax.Array:
    """``dz = −G ⊙ expm1(−F)``."""
    return -g * jnp.expm1(-f)


def _softplus_vjp(f, g):
    return (softplus_backward(f, g),)


softplus.defvjp(softplus_forward, _softplus_vjp)

register(
    Rule(
        name="softplus",
        fn=softplus,
        reference=softplus_reference,
        sample_inputs=_activation_samples(2.0),
        differentiable=(0,),
        seeds=(("002", "Remark 8: σ' = 1 − e^{−F}"),),
        mistakes=mistakes.elementwise(softplus_reference, lambda f: jnp.log(jnp.expm1(f))),
    )
)

# --------------------------------------------------------------------------- gelu

_GELU_CUBIC = 0.044715


def _gelu_u(z):
    """The tanh form's ``u = c (z + a z³)``, ``c = √(2/π)``."""
    return math.sqrt(2 / math.pi) * (z + _GELU_CUBIC * z**3)


def _gelu_gate(z: jax.Array, approximate: bool) -> jax.Array:
    """The gate ``s`` of ``F = z s(z)``, plain ``jnp``: ``½(1 + tanh u) = σ(2u)`` or
    ``Φ(z) = ½(1 + erf(z/√2))``. ``σ(2u)`` as ``1/(1 + e)`` for ``u ≥ 0`` and ``e/(1 + e)`` below,
    ``e = e^{−2|u|} ≤ 1``: every derivative keeps its digits on both sides, and nothing overflows —
    ``jax.grad`` of ``1/(1 + e^{−2u})`` is ``∞/∞ = NaN`` once ``e^{−2u}`` does (float32 ``z < −6.3``)."""
    if approximate:
        u = _gelu_u(z)
        e = jnp.exp(-2 * jnp.abs(u))
        return jnp.where(u >= 0, 1 / (1 + e), e / (1 + e))
    return 0.5 * (1 + jax.scipy.special.erf(z / math.sqrt(2)))


def gelu_reference(z: jax.Array, approximate: bool = True) -> jax.Array:
    return z * _gelu_gate(z, approximate)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def gelu(z: jax.Array, approximate: bool = True) -> jax.Array:
    """Gaussian error linear unit ``F = z Φ(z)``, or its tanh form: ``jax.nn.gelu``'s two formulas.

    ``Φ`` is the standard normal distribution function. ``approximate=False`` is the exact
    form ``F = ½ z erfc(−z/√2)``; ``approximate=True`` (the default, as ``jax.nn.gelu``'s) the
    tanh form ``F = ½ z (1 + tanh u)`` with ``u = c (z + a z³)``, ``c = √(2/π)``,
    ``a = 0.044715``. PyTorch's ``F.gelu(z, approximate="none" | "tanh")``. ``approximate`` is
    a Python bool fixed at trace time; it gets no gradient.

    Derivation (seed 003, the Jacobian of an element-wise map is ``diag(φ')``; seed 002 §4,
    T. Hamm's adjoint ``⟨C(h), y⟩ = ⟨h, C†(y)⟩``). Both forms are element-wise,
    ``F_i = z_i s(z_i)`` with a gate ``s`` (``Φ``, or ``½(1 + tanh u)``), so the backward is
    ``dz = G ⊙ F'(z)``, its own adjoint. Differentiate the product ``z s(z)`` for each gate.

    Result:

        exact:   F'(z) = Φ(z) + z φ(z),                  φ(z) = e^{−z²/2} / √(2π)
        tanh:    F'(z) = ½(1 + t) + ½ z (1 − t²) u',     t = tanh u,  u' = c (1 + 3a z²)

        dz = G ⊙ F'(z)

    For z ≪ 0, ``1 + t`` and ``1 − t²`` cancel to a few digits (none at all below z ≈ −7 in
    float64), so the backward writes them with the logistic σ, which keeps every digit:
    ``½(1 + t) = σ(2u)`` and ``½(1 − t²) = 2 σ(2u) σ(−2u)``, ``F'(z) = σ(2u) + 2 z u' σ(2u) σ(−2u)``.

    Seed 002's Remark 8 does not apply: gelu is not monotone (its minimum is near z = −0.75),
    so ``F'`` is no function of the output ``F``, and the residual is the input ``z``. The
    derivative of one form is not the other's: the two differ by up to 8.7e-4 (near |z| = 2),
    7000 ulps of float32.
    """
    return gelu_forward(z, approximate)[0]


def gelu_forward(z: jax.Array, approximate: bool = True) -> tuple[jax.Array, jax.Array]:
    validation.floating("gelu", "z", z)
    if not isinstance(approximate, bool):
        raise validation.RuleInputError(
            f"gelu: approximate must be a Python bool (True: the tanh form, False: z Φ(z)), got {approximate!r}"
        )
    if approximate:
        return z * (0.5 * (1 + jnp.tanh(_gelu_u(z)))), z
    return 0.5 * z * lax.erfc(-z * math.sqrt(0.5)), z


def gelu_backward(z: jax.Array, approximate: bool, g: jax.Array) -> jax.Array:
    """``dz = G ⊙ F'(z)``: ``Φ(z) + z φ(z)``, or the tanh form's ``σ(2u) + 2 z u' σ(2u) σ(−2u)``."""
    if approximate:
        u = _gelu_u(z)
        # σ(−2|u|) ≤ ½, from which σ(2u) and σ(2u)σ(−2u) keep every digit, also under jax.grad
        # (JAX differentiates σ as σ(1 − σ), which loses them where σ is near 1).
        small = jnp.where(u >= 0, jax.nn.sigmoid(-2 * u), jax.nn.sigmoid(2 * u))
        gate = jnp.where(u >= 0, 1 - small, small)
        du = math.sqrt(2 / math.pi) * (1 + 3 * _GELU_CUBIC * z * z)
        return g * (gate + 2 * z * du * small * (1 - small))
    cdf = 0.5 * lax.erfc(-z * math.sqrt(0.5))
    pdf = jnp.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return g * (cdf + z * pdf)


def _gelu_vjp(approximate, z, g):
    return (gelu_backward(z, approximate, g),)


gelu.defvjp(gelu_forward, _gelu_vjp)


# The forms of the four shared activation samples, alternating.
_GELU_FORMS = ((True, "tanh"), (False, "exact"), (True, "tanh"), (False, "exact"))


def _gelu_samples(key, dtype):
    z = _activation_samples(2.0)(key, dtype)
    # The tails, where F and F' are tiny. The tanh form is computed from 1 + tanh u, which keeps
    # no correct digit once tanh u is within an ulp of −1 (u < −18.7, z < −7.3 in float64), so
    # its tail stops at −5 (1 + tanh u ≈ 9e-8); erfc keeps the exact form accurate to −7.
    return [
        *(
            Sample((s.args[0], approximate), f"{s.label}, {form} form")
            for s, (approximate, form) in zip(z, _GELU_FORMS)
        ),
        Sample((jnp.linspace(-5.0, 5.0, 11, dtype=dtype), True), "z from −5 to 5, tanh form"),
        Sample((jnp.linspace(-7.0, 7.0, 15, dtype=dtype), False), "z from −7 to 7, exact form"),
    ]


def _gelu_mistakes(vjp, args, g):
    z, approximate = args
    form = "the tanh form's" if not approximate else "the exact form's z Φ(z)"
    yield (
        f"the right one for {form} derivative: the gelu derivative of the other form (approximate={not approximate})",
        mistakes.reference_vjp(gelu_reference, (z, not approximate), 0, g, vjp),
    )
    yield (
        "G ⊙ s(z), the gate alone (Φ(z), or ½(1 + tanh u)): the term z s'(z) of the product rule is missing",
        g * _gelu_gate(z, approximate),
    )


register(
    Rule(
        name="gelu",
        fn=gelu,
        reference=gelu_reference,
        sample_inputs=_gelu_samples,
        differentiable=(0,),
        seeds=(("003", "diag(φ') of an element-wise map"), ("002", "§4 adjoint of a linear map")),
        mistakes=(*mistakes.elementwise(gelu_reference), Mistake(0, _gelu_mistakes)),
    )
)

# --------------------------------------------------------------------------- identity


def identity_reference(z: jax.Array) -> jax.Array:
    return 1 * z


@devices.custom_vjp
def identity(z: jax.Array) -> jax.Array:
    """The identity ``F = z``: seed 002's ``σ_0 := id`` for the input layer.

    Derivation (seed 002 Algorithm 1, σ_0 = id).

    Result:

    ``σ' = 1`` so ``dz = G``; no residual.
    """
    return identity_forward(z)[0]


def identity_forward(z: jax.Array) -> tuple[jax.Array, tuple[()]]:
    validation.floating("identity", "z", z)
    return z, ()


def identity_backward(g: jax.Array) -> jax.Array:
    """``dz = G``."""
    return g


def _identity_vjp(residuals, g):
    del residuals
    return (identity_backward(g),)


identity.defvjp(identity_forward, _identity_vjp)

register(
    Rule(
        name="identity",
        fn=identity,
        reference=identity_reference,
        sample_inputs=_activation_samples(1.0),
        differentiable=(0,),
        seeds=(("002", "Algorithm 1: σ_0 := id"),),
        linear_in=((0,),),
    )
)
