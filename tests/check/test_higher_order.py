"""What higher-order autodiff does and does not do with the hand rules (the README's claims).

A ``custom_vjp`` rule has no forward mode of its own, so ``jax.jvp``/``jax.jacfwd`` of a rule,
and calling the linear map ``jax.linearize`` returns, raise. Forward over reverse works:
``jax.hessian`` (``jacfwd`` of ``jacrev``) and ``jax.jvp`` of ``jax.grad`` run the hand
backward in the inner reverse pass and differentiate it (and the forward) in the outer pass.
Each is checked against the same derivative of the plain-``jnp`` references.

Tolerance: the Hessians agree to ~1e-15 of their largest entry in float64 (a few dozen
round-off errors in sums of order one); 1e-12 leaves room for other BLAS orderings, while a
wrong backward moves entries by order one (``test_hessian_differentiates_the_hand_backward``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import manualgrad as mg
from manualgrad import registry
from manualgrad.rules import activations

TOL = 1e-12
NO_FORWARD_MODE = "can't apply forward-mode autodiff"


def _layer(name: str, hand: bool):
    return getattr(mg, name) if hand else registry.get(name).reference


def _mlp_loss(hand: bool):
    """``mse(sigmoid(tanh(x W1 + b1) W2), y) + l2_penalty(params, 1e-2)`` as a function of the
    flat parameter vector (24 entries)."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "w1": jax.random.normal(k[0], (3, 4)),
        "b1": jax.random.normal(k[1], (4,)),
        "w2": jax.random.normal(k[2], (4, 2)),
    }
    x, y = jax.random.normal(k[3], (5, 3)), jax.random.uniform(k[4], (5, 2))
    flat, unravel = ravel_pytree(params)
    dense, bias_add, tanh, sigmoid, mse, l2 = (
        _layer(n, hand) for n in ("dense", "bias_add", "tanh", "sigmoid", "mse", "l2_penalty")
    )

    def loss(q):
        p = unravel(q)
        return mse(sigmoid(dense(tanh(bias_add(dense(x, p["w1"]), p["b1"])), p["w2"])), y) + l2(p, 1e-2)

    return loss, flat


def _cnn_loss(hand: bool):
    """``softmax_cross_entropy(flatten(max_pool2d(tanh(conv2d(x, K)), 2)) W, labels)`` plus an l2
    penalty, as a function of the flat parameter vector (42 entries)."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    params = {"k": jax.random.normal(k[0], (3, 3, 1, 2)), "w": jax.random.normal(k[1], (8, 3))}
    x, labels = jax.random.normal(k[2], (2, 4, 4, 1)), jnp.array([0, 2])
    flat, unravel = ravel_pytree(params)
    conv2d, tanh, pool, flatten, dense, xent, l2 = (
        _layer(n, hand)
        for n in ("conv2d", "tanh", "max_pool2d", "flatten", "dense", "softmax_cross_entropy", "l2_penalty")
    )

    def loss(q):
        p = unravel(q)
        return xent(dense(flatten(pool(tanh(conv2d(x, p["k"], padding="SAME")), 2)), p["w"]), labels) + l2(p, 1e-3)

    return loss, flat


def _hessian(loss, flat) -> jax.Array:
    return jax.jit(jax.hessian(loss))(flat)  # jitted: one program instead of an eager op per step, far faster


@functools.cache
def _expected(net) -> jax.Array:
    """The reference network's Hessian, by JAX alone."""
    reference, flat = net(False)
    return _hessian(reference, flat)


def _relative(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("net", [_mlp_loss, _cnn_loss])
def test_hessian_of_hand_rules_matches_the_reference(net):
    hand, flat = net(True)
    expected = _expected(net)
    assert expected.shape == (flat.size, flat.size) and np.max(np.abs(expected)) > 1e-2
    assert _relative(_hessian(hand, flat), expected) <= TOL


def test_jvp_of_grad_is_the_hessian_vector_product():
    hand, flat = _mlp_loss(True)
    v = jax.random.normal(jax.random.PRNGKey(2), flat.shape)
    _, hv = jax.jit(lambda q, t: jax.jvp(jax.grad(hand), (q,), (t,)))(flat, v)
    assert _relative(hv, _expected(_mlp_loss) @ v) <= TOL


def test_reverse_over_reverse_matches_the_reference():
    hand, flat = _mlp_loss(True)
    assert _relative(jax.jit(jax.jacrev(jax.jacrev(hand)))(flat), _expected(_mlp_loss)) <= TOL


def test_hessian_differentiates_the_hand_backward():
    """A wrong tanh backward (σ' = 1 − F instead of 1 − F²) changes the Hessian: the outer
    forward pass differentiates the hand rule, not some autodiff of tanh."""
    expected = _expected(_mlp_loss)
    activations.tanh.defvjp(activations.tanh_forward, lambda f, g: (g * (1 - f),))
    try:
        hand, flat = _mlp_loss(True)
        assert _relative(_hessian(hand, flat), expected) > 1e-2
    finally:
        activations.tanh.defvjp(activations.tanh_forward, activations._tanh_vjp)
    hand, flat = _mlp_loss(True)
    assert _relative(_hessian(hand, flat), expected) <= TOL


def test_jvp_of_a_rule_raises():
    x = jnp.linspace(-1.0, 1.0, 6)
    with pytest.raises(TypeError, match=NO_FORWARD_MODE):
        jax.jvp(mg.tanh, (x,), (jnp.ones_like(x),))


def test_jacfwd_of_a_rule_and_of_a_loss_raises():
    hand, flat = _mlp_loss(True)
    with pytest.raises(TypeError, match=NO_FORWARD_MODE):
        jax.jacfwd(mg.dense)(jnp.ones((2, 3)), jnp.ones((3, 4)))
    with pytest.raises(TypeError, match=NO_FORWARD_MODE):
        jax.jacfwd(hand)(flat)
    with pytest.raises(TypeError, match=NO_FORWARD_MODE):  # reverse over forward: the inner jacfwd
        jax.jacrev(jax.jacfwd(hand))(flat)


def test_linearize_of_a_rule_raises_when_its_linear_map_is_called():
    x = jnp.linspace(-1.0, 1.0, 6)
    out, linear = jax.linearize(mg.tanh, x)
    np.testing.assert_array_equal(out, jnp.tanh(x))
    with pytest.raises(TypeError, match=NO_FORWARD_MODE):
        linear(jnp.ones_like(x))
