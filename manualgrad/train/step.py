"""One training step as one jitted program, and what is computed beside it.

:func:`make_step` compiles the model's forward pass through the registered rules, the
hand-written backward rules (``jax.grad`` of a custom_vjp composition runs exactly those) and the
optax update (:func:`optimizer`) into one program; :func:`loss_fn` with ``grad="autodiff"``
differentiates the same model built from the rules' plain-``jnp`` references instead.
:func:`evaluate` and :func:`cross_check` run the same loss outside training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from manualgrad.check.tolerances import relative_error
from manualgrad.nn import gpt, layers
from manualgrad.text import either
from manualgrad.train import data
from manualgrad.train.errors import ConfigError

_DROPOUT_STREAM = 1  # fold_in(PRNGKey(seed), 1): the dropout keys' root, apart from the initialisation's key
OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "adam": optax.adam,
    "adamw": optax.adamw,
}
SCHEDULED = ("adamw",)  # the learning rate warms up linearly, then decays as a cosine over the run
WARMUP = 0.05  # the fraction of the run's steps spent warming up
GRADS = ("manual", "autodiff")  # the hand rules, or jax.grad of the same model built from the references


def optimizer(name: str, lr: float, steps: int = 1, clip: float | None = None) -> optax.GradientTransformation:
    """``sgd``, ``momentum`` (0.9), ``adam`` or ``adamw`` (weight decay 10⁻⁴), from optax (:data:`OPTIMIZERS`),
    after ``optax.clip_by_global_norm(clip)`` if ``clip`` is given.

    ``adamw`` (:data:`SCHEDULED`) runs ``steps`` steps: its rate rises linearly from 0 to ``lr`` over the first
    :data:`WARMUP` of them, then falls as a cosine to ``lr/10`` (``optax.warmup_cosine_decay_schedule``).
    """
    if name not in OPTIMIZERS:
        raise ConfigError("{optimizer} must be " + either(tuple(OPTIMIZERS)) + ", got {got!r}", got=name)
    if name in SCHEDULED:
        warmup = max(1, round(WARMUP * steps))
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 10)
    tx = OPTIMIZERS[name](lr)
    return tx if clip is None else optax.chain(optax.clip_by_global_norm(clip), tx)


def step_keys(seed: int, steps: Sequence[int]) -> np.ndarray:
    """The PRNG keys (raw ``uint32[2]`` rows) of the training steps ``steps``, dropout's masks: step ``s``'s is
    ``fold_in(fold_in(PRNGKey(seed), 1), s)``, a function of ``(seed, s)`` only. Drawn for many
    steps in one program and handed over as numpy rows, so that a step costs no extra dispatch."""
    root = jax.random.fold_in(jax.random.PRNGKey(seed), _DROPOUT_STREAM)
    return np.asarray(jax.vmap(lambda step: jax.random.fold_in(root, step))(jnp.asarray(steps, jnp.uint32)))


def _sequence_loss(net, params, tokens, mask, *, state=None, train=False, key=None, reference=False):
    """:func:`~manualgrad.nn.gpt.sequence_loss` in :func:`~manualgrad.nn.layers.classifier_loss`'s protocol."""
    value, correct = gpt.sequence_loss(net, params, tokens, mask, train=train, key=key, reference=reference)
    return (value, correct) if state is None else (value, correct, state)


def loss_fn(net: layers.Layer, grad: str, sequences: bool = False) -> Callable:
    """``(params, state, x, y, *, train=False, key=None) -> (loss, correct, new_state)`` through the
    hand rules (``manual``) or the references (``autodiff``); ``state`` is the model's. ``(x, y)``
    are images or features and labels (:func:`~manualgrad.nn.layers.classifier_loss`) or, for a
    sequence model, token rows and their target mask (:func:`~manualgrad.nn.gpt.sequence_loss`)."""
    if grad not in GRADS:
        raise ConfigError("{grad} must be " + either(GRADS) + ", got {got!r}", got=grad)
    reference = grad == "autodiff"
    objective = _sequence_loss if sequences else layers.classifier_loss

    def loss(params, state, x, y, *, train=False, key=None):
        return objective(net, params, x, y, state=state, train=train, key=key, reference=reference)

    return loss


def _all_finite(tree: Any) -> jax.Array:
    """True when every entry of every leaf is finite: ``max |leaf|`` is finite exactly then (a NaN
    propagates through ``max``, an infinity is the maximum). One max-reduction per leaf runs in
    XLA:CPU's reduction kernels, where ``isfinite(leaf).all()`` runs in its slower loop emitter and
    ``Σ leaf · 0`` writes a broadcast zero array first; ``manualgrad bench`` measures the step with it."""
    return jnp.all(
        jnp.stack([jnp.isfinite(jnp.max(jnp.abs(leaf), initial=0)) for leaf in jax.tree_util.tree_leaves(tree)])
    )


# XLA:CPU hands dots, convolutions and reductions to YNNPACK by default. XLA's own convolution
# emitter runs the strided convolutions of the ready-made CNNs faster, while YNNPACK's reductions
# and dots stay faster than XLA's: so the convolutions go back to XLA and the rest stays with
# YNNPACK (``manualgrad bench`` measures the step with and without, and prints which applied).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


@functools.cache
def compiler_options(backend: str) -> dict[str, str]:
    """The XLA options :func:`make_step` compiles with on ``backend``: :data:`CPU_COMPILER_OPTIONS`
    on ``"cpu"`` where this jaxlib knows them (a jaxlib without the option compiles with none, and
    ``manualgrad bench`` prints which), none elsewhere."""
    if backend != "cpu":
        return {}
    try:
        jax.jit(lambda v: v + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def make_step(loss: Callable, tx: optax.GradientTransformation) -> Callable:
    """One jitted training step of :func:`loss_fn`'s ``loss``:
    ``(params, opt_state, state, x, labels, key) -> (params, opt_state, state, loss, correct, finite)``.

    The model runs in training mode with dropout's masks drawn from ``key``; the gradient is taken
    in ``params`` alone, and the model's new ``state`` (running statistics) comes out beside it,
    untouched by the optimizer. ``finite`` is true when the loss and every leaf of the new
    parameters, optimizer state and model state are finite.
    """

    def step(params, opt_state, state, x, labels, key):
        def objective(p):
            value, correct, new_state = loss(p, state, x, labels, train=True, key=key)
            return value, (correct, new_state)

        (value, (correct, state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(value) & _all_finite((params, opt_state, state))
        return params, opt_state, state, value, correct, finite

    return jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=compiler_options(jax.default_backend()))


def cross_check(
    net: layers.Layer,
    params: Any,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    key: jax.Array,
    sequences: bool = False,
) -> float:
    """Max relative difference (:func:`~manualgrad.check.tolerances.relative_error`) of the hand-rule gradient from
    ``jax.grad`` of the references over ``batches`` (≥ 1), in training mode (batch statistics,
    dropout's masks from ``key``, the same on both sides); ``sequences`` as for :func:`loss_fn`."""
    objective = _sequence_loss if sequences else layers.classifier_loss

    def gradient(reference):
        return jax.jit(jax.grad(lambda p, x, y: objective(net, p, x, y, train=True, key=key, reference=reference)[0]))

    manual, auto = gradient(False), gradient(True)
    return max(relative_error(manual(params, x, y), auto(params, x, y)) for x, y in batches)


CROP = 8  # a sequence batch is cut to a multiple of this many positions: a few shapes, a few compilations


def cropped(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch of token rows and target masks cut after its last counted target, rounded up to a
    multiple of :data:`CROP` positions: what is cut is padding after every counted target, which a
    causal model's counted predictions do not depend on (:class:`~manualgrad.train.data.Sequences`),
    so the loss is the same, for less work on short words."""
    counted = np.flatnonzero(mask.any(axis=0))
    length = min(mask.shape[1], -(-(int(counted[-1]) + 1 if counted.size else 1) // CROP) * CROP)
    return tokens[:, : length + 1], mask[:, :length]


def targets(y: np.ndarray, sequences: bool) -> int:
    """How many predictions the loss of a batch with labels (or target mask) ``y`` averages over."""
    return int(np.sum(y)) if sequences else len(y)


def evaluate(
    loss: Callable, params: Any, state: Any, x: np.ndarray, y: np.ndarray, batch_size: int, sequences: bool = False
) -> tuple[float, float]:
    """Mean loss and accuracy over every prediction of ``(x, y)`` (every sample, or every counted target
    of a sequence model), in evaluation mode (running statistics from the model's ``state``, no dropout)."""
    fn = jax.jit(lambda p, s, x, y: loss(p, s, x, y)[:2])
    total, correct = 0.0, 0
    for xb, yb in data.evaluation_batches(x, y, batch_size):
        value, right = fn(params, state, *(cropped(xb, yb) if sequences else (xb, yb)))
        total += float(value) * targets(yb, sequences)
        correct += int(right)
    return total / targets(y, sequences), correct / targets(y, sequences)
