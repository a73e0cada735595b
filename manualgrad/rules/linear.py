"""Linear rules: the dense layer ``x W``, the bias add ``z + ι(b)`` and the residual add ``x + y``.

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
from manualgrad.rules import devices
from manualgrad.rules.samples import keys, normal, pairs

# --------------------------------------------------------------------------- dense


def dense_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w)


@devices.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """Dense layer ``y = x W``: ``x`` of shape ``(..., in)``, ``W`` of shape ``(in, out)``.

    Derivation (seed 000 §4 "Linear"; seed 004 "Backprop"; seed 001 matrix form).

    Seed 000 writes one sample as a column, ``y = w x`` with ``w ∈ R^{m×n}``, and perturbs
    one argument at a time, with ``dy := dL/dy``, and reads the adjoint off ``ΔL = ⟨dy, Δy⟩``.

    Result:

        backward pass   ΔL = ⟨dy, w Δx⟩ = dyᵀ w Δx = ⟨wᵀ dy, Δx⟩        ⇒  dx = wᵀ dy
        gradient pass   ΔL = ⟨dy, Δw x⟩ = tr(dyᵀ Δw x) = tr(x dyᵀ Δw)
                           = ⟨dy xᵀ, Δw⟩                                ⇒  dw = dy xᵀ

    Seed 004 stacks the m samples as rows, ``Z = O W`` with ``W = wᵀ`` of shape
    ``(in, out)``. Transposing the column formulas row by row gives the same rule in the
    row form that manualgrad uses:

        ∇_O L = G Wᵀ                   (row i is (wᵀ dy_i)ᵀ)
        ∇_W L = Oᵀ G = Σ_i o_i dy_iᵀ   (seed 000's dy xᵀ, transposed and summed over samples,
                                        because every sample shares W)

    Seed 001 proves it once more with ``vec(W x) = (xᵀ ⊗ I) vec W``. Extra leading axes
    (``(batch, time, in)``) are more samples: the gradient pass sums over all of them.
    Neither pass needs the output, so the residuals are the inputs ``(x, W)``.
    """
    return dense_forward(x, w)[0]


def dense_forward(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    validation.floating("dense", "x", x)
    validation.floating("dense", "w", w)
    validation.min_rank("dense", "x", x, 1, "(..., in)")
    if jnp.ndim(w) != 2:
        raise validation.RuleInputError(f"dense: w must have shape (in, out), got {jnp.shape(w)}")
    if jnp.shape(x)[-1] != jnp.shape(w)[0]:
        raise validation.RuleInputError(
            f"dense: x has {jnp.shape(x)[-1]} features but w expects {jnp.shape(w)[0]} "
            f"(x: {jnp.shape(x)}, w: {jnp.shape(w)})"
        )
    validation.same_dtype("dense", x=x, w=w)
    return x @ w, (x, w)


def dense_backward(w: jax.Array, g: jax.Array) -> jax.Array:
    """Backward pass ``C†(G, W) = G Wᵀ``: the cotangent of the input."""
    return g @ w.T


def dense_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """Gradient pass ``C††(O, G) = Oᵀ G``, summed over every leading axis."""
    leading = tuple(range(jnp.ndim(x) - 1))
    return jnp.tensordot(x, g, axes=(leading, leading))


def _dense_vjp(residuals, g):
    x, w = residuals
    return dense_backward(w, g), dense_gradient(x, g)


dense.defvjp(dense_forward, _dense_vjp)


def _dense_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (4, 3), dtype), normal(next(k), (3, 5), dtype)), "batch 4"),
        Sample((normal(next(k), (1, 3), dtype), normal(next(k), (3, 2), dtype)), "batch 1"),
        Sample((normal(next(k), (2, 3, 4), dtype), normal(next(k), (4, 3), dtype)), "extra leading axis"),
        Sample((normal(next(k), (5, 1), dtype), normal(next(k), (1, 1), dtype)), "width 1"),
        Sample((normal(next(k), (3,), dtype), normal(next(k), (3, 4), dtype)), "no batch axis"),
    ]


register(
    Rule(
        name="dense",
        fn=dense,
        reference=dense_reference,
        sample_inputs=_dense_samples,
        differentiable=(0, 1),
        seeds=(("004", "Backprop: ∇_W = Oᵀ G, ∇_O = G Wᵀ"), ("000", "§4 Linear"), ("001", "matrix form")),
        linear_in=((0,), (1,)),
    )
)

# --------------------------------------------------------------------------- bias_add


def bias_add_reference(z: jax.Array, b: jax.Array) -> jax.Array:
    return z + jnp.broadcast_to(b, jnp.shape(z))


@devices.custom_vjp
def bias_add(z: jax.Array, b: jax.Array) -> jax.Array:
    """Bias add ``y = z + ι(b)``: ``b`` of shape ``(features,)`` added along the last axis.

    Derivation (seed 000 §5 "Add"; seed 004 "For bias"; seed 002 §4, the map ``ι``).
    A batch shares one bias: the same ``b`` is added to every row (and, for NHWC images, to
    every pixel).

    Result:

    Seed 000 adds two vectors of one size, ``y = x + w``; both partial derivatives are the
    identity, so ``dx = dy`` and ``dw = dy``. A batch shares one bias, which seed 004 writes
    without broadcasting as ``Z = O W + 1 b`` with ``1 ∈ R^{m×1}``; seed 002 §4 calls the map
    that copies ``b`` to every position ``ι``. Its adjoint sums the copies back:

        ΔL = ⟨G, ι(Δb)⟩ = Σ_{i,k} G_{ik} Δb_k = ⟨1ᵀ G, Δb⟩    ⇒  db = ι*(G) = 1ᵀ G

    so the gradient pass sums ``G`` over every broadcast axis (the batch, and for NHWC
    images the height and width too, seed 002's one bias per channel), and the backward
    pass is ``dz = G``. Neither needs a residual.
    """
    return bias_add_forward(z, b)[0]


def bias_add_forward(z: jax.Array, b: jax.Array) -> tuple[jax.Array, tuple[()]]:
    validation.floating("bias_add", "z", z)
    validation.floating("bias_add", "b", b)
    validation.min_rank("bias_add", "z", z, 1, "(..., features)")
    if jnp.shape(b) != jnp.shape(z)[-1:]:
        raise validation.RuleInputError(
            f"bias_add: b must have shape ({jnp.shape(z)[-1]},) to match the last axis of z "
            f"(z: {jnp.shape(z)}, b: {jnp.shape(b)})"
        )
    validation.same_dtype("bias_add", z=z, b=b)
    return z + lax.broadcast_in_dim(b, jnp.shape(z), (jnp.ndim(z) - 1,)), ()


def bias_add_backward(g: jax.Array) -> jax.Array:
    """Backward pass: ``dz = G``."""
    return g


def bias_add_gradient(g: jax.Array) -> jax.Array:
    """Gradient pass ``ι*(G) = 1ᵀ G``: ``G`` summed over every axis but the last."""
    return jnp.sum(g, axis=tuple(range(jnp.ndim(g) - 1)))


def _bias_add_vjp(residuals, g):
    del residuals
    return bias_add_backward(g), bias_add_gradient(g)


bias_add.defvjp(bias_add_forward, _bias_add_vjp)


def _bias_add_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (4, 3), dtype), normal(next(k), (3,), dtype)), "batch 4"),
        Sample((normal(next(k), (1, 2), dtype), normal(next(k), (2,), dtype)), "batch 1"),
        Sample((normal(next(k), (2, 3, 3, 4), dtype), normal(next(k), (4,), dtype)), "NHWC, per channel"),
        Sample((normal(next(k), (3, 1), dtype), normal(next(k), (1,), dtype)), "width 1"),
        Sample((normal(next(k), (5,), dtype), normal(next(k), (5,), dtype)), "no batch axis"),
    ]


register(
    Rule(
        name="bias_add",
        fn=bias_add,
        reference=bias_add_reference,
        sample_inputs=_bias_add_samples,
        differentiable=(0, 1),
        seeds=(("000", "§5 Add"), ("004", "For bias: ∇_b = 1ᵀ G"), ("002", "§4 ι and ι*")),
        linear_in=((0, 1),),
    )
)

# --------------------------------------------------------------------------- add


def add_reference(x: jax.Array, y: jax.Array) -> jax.Array:
    return x + y


@devices.custom_vjp
def add(x: jax.Array, y: jax.Array) -> jax.Array:
    """The residual connection ``out = x + y``: two arrays of one shape and dtype, added entry by entry.

    Derivation (seed 000 §5 "Add"; seed 002 §4, T. Hamm's adjoint ``⟨C(h), y⟩ = ⟨h, C†(y)⟩``).
    In a transformer block ``x`` is the residual stream and ``y`` the branch (attention or the
    MLP) computed from it: ``x`` reaches the loss on two paths, and seed 003 sums them, which
    is why the stream's cotangent is this rule's ``dx`` plus the branch's own backward.
    Perturb one argument at a time and read the adjoint off ``ΔL = ⟨G, Δout⟩``.

    Result:

        ΔL = ⟨G, Δx⟩ + ⟨G, Δy⟩      ⇒  dx = G,   dy = G

    Both partial derivatives are the identity, its own adjoint: the cotangent passes
    unchanged to both summands (seed 000's ``dx = dy``, ``dw = dy``). Unlike ``bias_add``
    nothing is broadcast, so nothing is summed; no residual is saved.
    """
    return add_forward(x, y)[0]


def add_forward(x: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple[()]]:
    validation.floating("add", "x", x)
    validation.floating("add", "y", y)
    validation.same_shape("add", x=x, y=y)
    validation.same_dtype("add", x=x, y=y)
    return x + y, ()


def add_backward(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Backward pass: ``dx = G`` and ``dy = G``."""
    return g, g


def _add_vjp(residuals, g):
    del residuals
    return add_backward(g)


add.defvjp(add_forward, _add_vjp)


_add_samples = pairs(
    [((4, 3), "batch 4"), ((1, 1), "batch 1, width 1"), ((2, 5, 3), "a sequence (B, T, C)"), ((), "scalars")]
)


register(
    Rule(
        name="add",
        fn=add,
        reference=add_reference,
        sample_inputs=_add_samples,
        differentiable=(0, 1),
        seeds=(("000", "§5 Add"), ("002", "§4 adjoint of a linear map"), ("003", "a variable on several paths")),
        linear_in=((0, 1),),
    )
)
