"""The layer protocol's state, train/evaluation modes and keys: BatchNorm, LayerNorm, GroupNorm, RMSNorm, Dropout.

float64 (conftest enables x64) unless a test says otherwise; one small NHWC batch throughout.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manualgrad.nn import layers
from manualgrad.validation import RuleInputError

F64 = jnp.float64
X = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2), F64) * 2 + 1  # m = 36 entries per channel
LABELS = jnp.array([0, 1, 2, 1])


def _bn_params(c=2):
    return {"gamma": jnp.linspace(0.5, 1.5, c, dtype=F64), "beta": jnp.linspace(-0.2, 0.3, c, dtype=F64)}


def _pytorch_running(x, steps, momentum=0.9):
    """PyTorch's running statistics after ``steps`` training steps on ``x``, written out in numpy:
    ``mean ← (1 − 0.1) mean + 0.1 μ_B``, ``var ← (1 − 0.1) var + 0.1 v_B m/(m − 1)`` (``momentum=0.1``)."""
    flat = np.asarray(x).reshape(-1, x.shape[-1])
    mean, var = np.zeros(flat.shape[1]), np.ones(flat.shape[1])
    for _ in range(steps):
        mean = momentum * mean + (1 - momentum) * flat.mean(0)
        var = momentum * var + (1 - momentum) * flat.var(0, ddof=1)
    return mean, var


def test_batch_norm_running_statistics_are_pytorchs_and_evaluation_uses_them():
    bn = layers.BatchNorm(dtype=F64)
    params = _bn_params()
    state = bn.init_state(params)
    assert jax.tree_util.tree_map(np.asarray, state) == {"mean": pytest.approx([0, 0]), "var": pytest.approx([1, 1])}
    for _ in range(3):
        y, state = bn.apply(params, X, state=state, train=True)
    mean, var = _pytorch_running(X, 3)
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-14)
    np.testing.assert_allclose(state["var"], var, rtol=1e-14)
    # training normalises with the batch's statistics, whatever the running ones are
    np.testing.assert_array_equal(y, layers.BatchNorm(dtype=F64).apply(params, X, train=True))
    # evaluation: γ (x − mean)/√(var + ε) + β with the running statistics, and the state unchanged
    y_eval, same = bn.apply(params, X, state=state)
    expected = np.asarray(params["gamma"]) * (np.asarray(X) - mean) / np.sqrt(var + 1e-5) + np.asarray(params["beta"])
    np.testing.assert_allclose(y_eval, expected, rtol=1e-13, atol=1e-14)
    assert same is state


def test_batch_norm_across_devices_runs_inside_shard_map_only():
    """BatchNorm(axis_name=...) is rule sync_batch_norm (tests/rules/test_collectives.py runs it on two
    devices); outside shard_map its axis names nothing, and it says so in the rule's words."""
    sync = layers.BatchNorm(dtype=F64, axis_name="data")
    assert sync.map == "sync_batch_norm"
    with pytest.raises(RuleInputError, match="sync_batch_norm: no mesh axis 'data' here"):
        sync.apply(_bn_params(), X, train=True)
    # evaluation uses the running statistics alone: no device is asked for anything
    np.testing.assert_array_equal(
        sync.apply(_bn_params(), X, state=sync.init_state(_bn_params()))[0],
        layers.BatchNorm(dtype=F64).apply(_bn_params(), X, state=sync.init_state(_bn_params()))[0],
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
def test_batch_norm_layer_equals_torch_batchnorm2d():
    """Three training steps and one evaluation of ``torch.nn.BatchNorm2d(momentum=0.1)`` on the NCHW transpose."""
    import torch

    torch_bn = torch.nn.BatchNorm2d(2, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        torch_bn.weight.copy_(torch.tensor(np.asarray(_bn_params()["gamma"])))
        torch_bn.bias.copy_(torch.tensor(np.asarray(_bn_params()["beta"])))
    nchw = torch.tensor(np.asarray(X)).permute(0, 3, 1, 2)
    bn, params = layers.BatchNorm(dtype=F64), _bn_params()
    state = bn.init_state(params)
    for _ in range(3):
        theirs = torch_bn.train()(nchw).permute(0, 2, 3, 1).detach().numpy()
        ours, state = bn.apply(params, X, state=state, train=True)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state["mean"], torch_bn.running_mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(state["var"], torch_bn.running_var.numpy(), rtol=1e-13)
    theirs = torch_bn.eval()(nchw).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(bn.apply(params, X, state=state)[0], theirs, rtol=1e-12, atol=1e-12)


def _net(norm, dropout=0.0):
    return layers.cnn(3, (4, 4), 6, F64, norm=norm, dropout=dropout)


def test_state_is_apart_from_params_gradient_and_optimizer():
    net = _net(layers.BatchNorm(dtype=F64), 0.5)
    _, params = net.init(jax.random.PRNGKey(1), (-1, 3, 3, 2))
    state = net.init_state(params)
    # the layer before a batch norm has no bias (β is it); the state holds the running statistics only
    assert set(params[0]) == {"w"} and set(params[1]) == {"gamma", "beta"}
    assert [i for i, s in enumerate(state) if s != ()] == [1, 4, 8]  # conv, conv, dense: each one's BatchNorm
    assert set(state[1]) == {"mean", "var"}
    key = jax.random.PRNGKey(2)

    def loss(p):
        value, _, new_state = layers.classifier_loss(net, p, X, LABELS, state=state, train=True, key=key)
        return value, new_state

    grads, new_state = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert not np.allclose(new_state[1]["mean"], state[1]["mean"])
    tx = optax.adam(1e-3)
    updates, _ = tx.update(grads, tx.init(params), params)  # optax takes the params as they are
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize(
    "norm",
    [
        layers.BatchNorm(dtype=F64),
        layers.LayerNorm(dtype=F64),
        layers.GroupNorm(2, dtype=F64),
        layers.RMSNorm(dtype=F64),
    ],
    ids=["batch", "layer", "group", "rms"],
)
def test_every_norm_with_dropout_is_the_hand_rules_and_matches_jax_grad(norm):
    """Training mode, the same key on both sides: the hand rules' gradient is autodiff's of the references."""
    net = _net(norm, 0.3)
    _, params = net.init(jax.random.PRNGKey(1), (-1, 3, 3, 2))
    key = jax.random.PRNGKey(3)

    def grad(reference):
        return jax.jit(
            jax.grad(lambda p: layers.classifier_loss(net, p, X, LABELS, train=True, key=key, reference=reference)[0])
        )(params)

    manual, auto = grad(False), grad(True)
    for a, b in zip(jax.tree_util.tree_leaves(manual), jax.tree_util.tree_leaves(auto)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)  # float64, other summation orders


def test_dropout_masks_come_from_the_key_and_evaluation_has_none():
    net = layers.serial(layers.Dropout(0.5), layers.Dropout(0.5))
    key = jax.random.PRNGKey(4)
    once = net.apply([(), ()], X, train=True, key=key)
    np.testing.assert_array_equal(once, net.apply([(), ()], X, train=True, key=key))  # same key, same masks
    assert not np.array_equal(once, net.apply([(), ()], X, train=True, key=jax.random.PRNGKey(5)))
    kept = np.asarray(once) != 0
    # serial gives each layer fold_in(key, i): two masks, so about 1/4 of the entries are kept, times 4
    assert 0.1 < kept.mean() < 0.45
    np.testing.assert_allclose(np.asarray(once)[kept], 4 * np.asarray(X)[kept], rtol=1e-15)
    assert net.apply([(), ()], X) is X  # evaluation: the identity
    assert layers.Dropout(0.0).apply((), X, train=True) is X  # rate 0 needs no key


def test_stateless_layers_pass_the_state_through():
    net = _net(layers.LayerNorm(dtype=F64))
    _, params = net.init(jax.random.PRNGKey(1), (-1, 3, 3, 2))
    state = net.init_state(params)
    assert jax.tree_util.tree_leaves(state) == []
    y, same = net.apply(params, X, state=state, train=True)
    np.testing.assert_array_equal(y, net.apply(params, X))  # no running statistics: both modes agree
    assert same == state


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: layers.Dropout(1.0), r"Dropout: rate must be a number in \[0, 1\).*got 1.0"),
        (lambda: layers.Dropout(-0.1), r"Dropout: rate must be a number in \[0, 1\)"),
        (lambda: layers.BatchNorm(momentum=1.5), r"BatchNorm: momentum must be a number in \[0, 1\]"),
        (lambda: layers.BatchNorm(eps=-1.0), r"BatchNorm: eps must be a number > 0 .*got -1.0"),  # eval: 1/√(var − 1)
        (lambda: layers.GroupNorm(0), "GroupNorm: groups must be a positive int, got 0"),
        (
            lambda: layers.GroupNorm(3).init(None, (-1, 4, 4, 4)),
            r"GroupNorm: groups 3 must divide the 4 channels of its input \(shape \(-1, 4, 4, 4\)\)",
        ),
        (
            lambda: layers.BatchNorm().apply(_bn_params(), X),
            r"BatchNorm: evaluation \(train=False\) normalises with the running statistics: pass state=",
        ),
        (
            lambda: layers.BatchNorm().apply(_bn_params(3), X, state=layers.BatchNorm().init_state(_bn_params(3))),
            r"BatchNorm: x must have 3 channels \(its last axis\).*got shape \(4, 3, 3, 2\)",
        ),
        (lambda: layers.Dropout(0.5).apply((), X, train=True), "Dropout: training .* pass key="),
        (lambda: layers.serial(layers.Relu).apply([()], X, state=[(), ()]), "one entry per layer: 1 layers, got 2"),
    ],
)
def test_bad_layer_arguments_say_which(make, message):
    with pytest.raises(layers.LayerError, match=message):
        make()
