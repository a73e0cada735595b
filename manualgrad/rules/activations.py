"""Element-wise activations ``F = σ(z)`` whose backward rules read the saved output.

Seed 003 ("the Jacobian of an element-wise function is diag(φ'(x))") gives every backward
pass here the form ``dz = G ⊙ σ'(z)``. Seed 002's Remark 8 adds that for ReLU, sigmoid and
tanh ``σ'(z)`` is a function of ``F = σ(z)`` alone, so the forward pass can save ``F``
instead of ``z``. In a network ``F`` is also the next layer's input, which its dense rule
saves anyway, so the activation costs no extra residual at all.

Each rule below follows the protocol in :mod:`manualgrad.rules`: ``NAME_reference`` → ``@jax.custom_vjp NAME``
→ ``NAME_forward`` (output, residuals) → ``NAME_backward``/``NAME_gradient`` (cotangent ``g`` last)
→ ``register(Rule(...))``; read it there before adding a rule.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from manualgrad.registry import Rule, Sample, register
from manualgrad.rules import mistakes, validation
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


@jax.custom_vjp
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


@jax.custom_vjp
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


@jax.custom_vjp
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
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


@jax.custom_vjp
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

# --------------------------------------------------------------------------- identity


def identity_reference(z: jax.Array) -> jax.Array:
    return 1 * z


@jax.custom_vjp
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
