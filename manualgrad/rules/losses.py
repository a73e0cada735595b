"""Losses: mean squared error, softmax cross-entropy, and the L2 penalty.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import validation
from manualgrad.registry import Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes
from manualgrad.rules.samples import keys, normal, pairs

# --------------------------------------------------------------------------- mse


def mse_reference(pred: jax.Array, target: jax.Array) -> jax.Array:
    per_sample = 0.5 * jnp.sum((pred - target) ** 2, axis=tuple(range(1, jnp.ndim(pred))))
    return jnp.mean(per_sample)


@devices.custom_vjp
def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over the batch (leading axis) of ``½‖pred_i − target_i‖²``.

    Derivation (seed 000 §3 "mse"; seed 001 loss ½(a_2 − y)²).

    Seed 000 expands one sample, ``y = ½‖x − y*‖²``, to first order in ``Δx``.

    Result:

        Δy = ½(x + Δx − y*)ᵀ(x + Δx − y*) − ½(x − y*)ᵀ(x − y*)
           = ⟨x − y*, Δx⟩ + ½‖Δx‖²                  ⇒  dx = dy · (x − y*)

    The batch loss is the mean over ``m`` samples, which divides every row by ``m``:
    ``d pred = g (pred − target) / m``. The expression is symmetric in its arguments up to
    sign, so ``d target = −g (pred − target) / m``: the target gets its true gradient, not a
    silent zero. The only residual is the difference ``r = pred − target``.
    """
    return mse_forward(pred, target)[0]


def mse_forward(pred: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
    validation.floating("mse", "pred", pred)
    validation.floating("mse", "target", target)
    validation.min_rank("mse", "pred", pred, 1, "(batch, ...)")
    validation.same_shape("mse", pred=pred, target=target)
    validation.same_dtype("mse", pred=pred, target=target)
    if jnp.shape(pred)[0] == 0:
        raise validation.RuleInputError(f"mse: the batch is empty (pred: {jnp.shape(pred)})")
    r = pred - target
    return 0.5 * jnp.sum(r * r) / jnp.shape(pred)[0], r


def mse_backward(r: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``d pred = g r / m`` and ``d target = −g r / m`` with ``r = pred − target``."""
    d_pred = g * r / jnp.shape(r)[0]
    return d_pred, -d_pred


mse.defvjp(mse_forward, mse_backward)


_mse_samples = pairs([((4, 3), "batch 4"), ((1, 2), "batch 1"), ((2, 3, 2), "extra axis"), ((5,), "scalar per sample")])


register(
    Rule(
        name="mse",
        fn=mse,
        reference=mse_reference,
        sample_inputs=_mse_samples,
        differentiable=(0, 1),
        seeds=(("000", "§3 mse"), ("001", "loss ½(a_2 − y)²")),
    )
)

# --------------------------------------------------------------------------- softmax_cross_entropy


def softmax_cross_entropy_reference(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_p = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    if jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        labels = jax.nn.one_hot(labels, jnp.shape(logits)[-1], dtype=jnp.result_type(logits))
    return -jnp.mean(jnp.sum(labels * log_p, axis=-1))


@devices.custom_vjp
def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the samples of ``−Σ_c y_c log softmax(z)_c``.

    ``logits`` has shape ``(..., classes)``; every row is a sample. ``labels`` are integer
    class indices of shape ``logits.shape[:-1]``, or rows ``y`` of the same shape as
    ``logits`` (one-hot or probabilities). An index outside ``[0, classes)`` makes that
    sample's loss NaN rather than a silent wrong number.

    Derivation (seed 003, the external gradient ``df = ⟨g, dx⟩``; seed 004 ``G`` for the
    output layer). With ``p = softmax(z)`` and ``s = Σ_c y_c``, differentiate one row's loss.

    Result:

        ℓ = −Σ_c y_c z_c + s · log Σ_c e^{z_c}
        dℓ = −⟨y, dz⟩ + s ⟨p, dz⟩                     ⇒  dz = s p − y
        dℓ/dy_c = −log p_c                            ⇒  dy = −log p

    For one-hot or probability rows ``s = 1`` and this is the familiar ``p − onehot``;
    averaging over ``m`` samples divides both by ``m``. The forward uses log-sum-exp with
    the row maximum subtracted, so no ``e^{z}`` overflows; the residual is ``log p`` alone
    (``p = e^{log p}`` in the backward). Integer labels get a ``float0`` cotangent, as JAX
    expects of integer inputs.
    """
    return softmax_cross_entropy_forward(logits, labels)[0]


def softmax_cross_entropy_forward(logits: jax.Array, labels: jax.Array):
    validation.floating("softmax_cross_entropy", "logits", logits)
    validation.min_rank("softmax_cross_entropy", "logits", logits, 1, "(..., classes)")
    validation.array("softmax_cross_entropy", "labels", labels)
    classes = jnp.shape(logits)[-1]
    integer = jnp.issubdtype(jnp.result_type(labels), jnp.integer)
    expected = jnp.shape(logits)[:-1] if integer else jnp.shape(logits)
    if jnp.shape(labels) != expected:
        kind = "integer class indices" if integer else "probability rows"
        raise validation.RuleInputError(
            f"softmax_cross_entropy: labels as {kind} must have shape {expected} "
            f"(logits: {jnp.shape(logits)}, labels: {jnp.shape(labels)})"
        )
    if not integer:
        validation.floating("softmax_cross_entropy", "labels", labels)
        validation.same_dtype("softmax_cross_entropy", logits=logits, labels=labels)
    z = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_p = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))
    if integer:
        valid = (labels >= 0) & (labels < classes)
        picked = jnp.take_along_axis(log_p, jnp.clip(labels, 0, classes - 1)[..., None], axis=-1)[..., 0]
        per_sample = jnp.where(valid, -picked, jnp.nan)
    else:
        per_sample = -jnp.sum(labels * log_p, axis=-1)
    return jnp.mean(per_sample), (log_p, labels)


def softmax_cross_entropy_backward(log_p: jax.Array, labels: jax.Array, g: jax.Array):
    """``d logits = g (s p − y) / m`` and ``d labels = −g log p / m`` (float0 for indices)."""
    m = math.prod(jnp.shape(log_p)[:-1])
    p = jnp.exp(log_p)
    if jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        onehot = jax.nn.one_hot(labels, jnp.shape(log_p)[-1], dtype=p.dtype)
        d_logits = g * (p - onehot) / m
        return d_logits, np.zeros(jnp.shape(labels), dtype=jax.dtypes.float0)
    s = jnp.sum(labels, axis=-1, keepdims=True)
    return g * (s * p - labels) / m, -g * log_p / m


def _softmax_cross_entropy_vjp(residuals, g):
    log_p, labels = residuals
    return softmax_cross_entropy_backward(log_p, labels, g)


softmax_cross_entropy.defvjp(softmax_cross_entropy_forward, _softmax_cross_entropy_vjp)


def _softmax_cross_entropy_samples(key, dtype):
    k = keys(key)

    def probabilities(shape):
        return jax.nn.softmax(normal(next(k), shape, dtype), axis=-1)

    return [
        Sample((normal(next(k), (4, 5), dtype, 2.0), jnp.array([0, 4, 2, 2])), "integer labels"),
        Sample((normal(next(k), (1, 3), dtype), jnp.array([1])), "batch 1"),
        Sample((normal(next(k), (2, 3, 4), dtype), jnp.array([[0, 1, 3], [3, 2, 0]])), "extra leading axis"),
        Sample((normal(next(k), (3, 4), dtype), probabilities((3, 4))), "probability rows"),
        Sample((normal(next(k), (2, 1), dtype), jnp.ones((2, 1), dtype)), "one class"),
    ]


register(
    Rule(
        name="softmax_cross_entropy",
        fn=softmax_cross_entropy,
        reference=softmax_cross_entropy_reference,
        sample_inputs=_softmax_cross_entropy_samples,
        differentiable=(0, 1),
        seeds=(("003", "external gradient df = ⟨g, dx⟩"), ("004", "G of the output layer")),
        linear_in=((1,),),
    )
)

# --------------------------------------------------------------------------- l2_penalty


def l2_penalty_reference(params: Any, lam: jax.Array) -> jax.Array:
    return lam / 2 * sum(jnp.sum(w**2) for w in jax.tree_util.tree_leaves(params))


@devices.custom_vjp
def l2_penalty(params: Any, lam: jax.Array) -> jax.Array:
    """The weight penalty ``λ Ω(θ)`` with ``Ω(θ) = ½ Σ_W ‖W‖²`` over every leaf of ``params``.

    Derivation (seed 004 "Adding regularization": ``∇_W J = Oᵀ G + λ ∇_W Ω(θ)``).

    Result:

        ΔΩ = Σ_W ⟨W, ΔW⟩ + O(‖ΔW‖²)   ⇒  ∇_W (λ Ω) = λ W,   ∂(λ Ω)/∂λ = Ω

    Pass only the leaves to penalise (commonly the weights and not the biases). ``lam`` is a
    scalar and gets its gradient ``Ω`` too. The residuals are ``params`` and ``λ``.
    """
    return l2_penalty_forward(params, lam)[0]


def l2_penalty_forward(params: Any, lam: jax.Array):
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        validation.floating("l2_penalty", f"params{jax.tree_util.keystr(path)}", w)
    validation.floating("l2_penalty", "lam", lam)
    if jnp.ndim(lam) != 0:
        raise validation.RuleInputError(f"l2_penalty: lam must be a scalar, got shape {jnp.shape(lam)}")
    # A Python scalar λ is weakly typed: like jnp, the result follows the weights' dtype.
    dtype = jnp.result_type(lam, *jax.tree_util.tree_leaves(params))
    omega = sum((0.5 * jnp.vdot(w, w) for w in jax.tree_util.tree_leaves(params)), jnp.zeros((), dtype))
    return lam * omega, (params, lam, omega)


def l2_penalty_backward(params: Any, lam: jax.Array, omega: jax.Array, g: jax.Array):
    """``d W = g λ W`` for every leaf, ``d λ = g Ω``."""
    d_params = jax.tree_util.tree_map(lambda w: (g * lam * w).astype(w.dtype), params)
    return d_params, (g * omega).astype(jnp.result_type(lam))


def _l2_penalty_vjp(residuals, g):
    return l2_penalty_backward(*residuals, g)


l2_penalty.defvjp(l2_penalty_forward, _l2_penalty_vjp)


def _l2_penalty_samples(key, dtype):
    k = keys(key)
    layers = [
        {"w": normal(next(k), (3, 4), dtype), "b": normal(next(k), (4,), dtype)},
        {"w": normal(next(k), (4, 1), dtype)},
    ]
    return [
        Sample((layers, jnp.asarray(0.1, dtype)), "list of layers"),
        Sample(({"w": normal(next(k), (1, 1), dtype)}, jnp.asarray(2.0, dtype)), "one weight"),
    ]


def _lambda_left_out(vjp, args, g):
    right = mistakes.reference_vjp(l2_penalty_reference, args, 0, g, vjp)
    yield "the right one without the factor λ", jax.tree_util.tree_map(lambda e: e / args[1], right)


register(
    Rule(
        name="l2_penalty",
        fn=l2_penalty,
        reference=l2_penalty_reference,
        sample_inputs=_l2_penalty_samples,
        differentiable=(0, 1),
        seeds=(("004", "Adding regularization: λ ∇_W Ω(θ)"),),
        linear_in=((1,),),
        mistakes=(Mistake(0, _lambda_left_out),),
    )
)
