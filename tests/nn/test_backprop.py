"""Seed 002's Algorithms 1 and 2 (``manualgrad/nn/backprop.py``) against the custom_vjp composition and jax.grad.

float64 throughout (conftest enables x64), so agreement is asked to 1e-12 relative: the three
computations evaluate the same products in a different order, which costs a few ulps.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manualgrad import registry
from manualgrad.nn import backprop
from manualgrad.nn.layers import BatchNorm, Conv2D, Dense, Relu
from manualgrad.validation import RuleInputError

F64 = jnp.float64
MLP = [
    Dense(7, "sigmoid", F64),
    Dense(5, "tanh", F64),
    Dense(6, "relu", F64),
    Dense(4, "softplus", F64),
    Dense(3, dtype=F64),
]
CNN = [
    Conv2D(4, activation="relu", dtype=F64),
    Conv2D(5, stride=2, padding="SAME", activation="tanh", dtype=F64),
    Conv2D(3, (2, 2), dilation=2, padding=1, activation="leaky_relu", dtype=F64),
    Dense(4, dtype=F64),
]
# conv → batch norm → ReLU, then batch norm after a sigmoid on (N, C) rows: m = 3 · 7 · 7 and m = 3.
BN_CNN = [
    Conv2D(4, dtype=F64),
    BatchNorm(activation="relu", dtype=F64),
    Conv2D(5, stride=2, padding="SAME", activation="tanh", dtype=F64),
    Dense(6, "sigmoid", F64),
    BatchNorm(activation="relu", dtype=F64),
    Dense(4, dtype=F64),
]


def _relative(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in pairs)


@pytest.fixture(scope="module")
def mlp():
    key = jax.random.PRNGKey(0)
    params = backprop.init(key, MLP, (6,))
    x = jax.random.normal(jax.random.PRNGKey(1), (9, 6), jnp.float64)
    y = jax.random.normal(jax.random.PRNGKey(2), (9, 3), jnp.float64)
    return params, x, y


@pytest.fixture(scope="module")
def cnn():
    params = backprop.init(jax.random.PRNGKey(3), CNN, (9, 9, 2))
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 9, 9, 2), jnp.float64)
    labels = jnp.array([0, 3, 1])
    return params, x, labels


@pytest.mark.parametrize("store", backprop.STORES)
def test_algorithm_1_equals_custom_vjp_and_jax_grad(mlp, store):
    params, x, y = mlp
    value, grads = jax.jit(lambda p, x, y: backprop.gradients(MLP, p, x, y, "mse", store))(params, x, y)
    vjp_value, vjp_grads = jax.value_and_grad(lambda p: backprop.loss(MLP, p, x, y))(params)
    ref_value, ref_grads = jax.value_and_grad(lambda p: backprop.loss(MLP, p, x, y, reference=True))(params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
    assert _relative(grads, vjp_grads) <= 1e-12
    assert _relative(grads, ref_grads) <= 1e-12


@pytest.fixture(scope="module")
def bn_cnn(cnn):
    """The CNN fixture's input, ``BN_CNN``'s params moved off ``γ = 1``, ``β = 0`` and zero biases,
    and the gradients of the custom_vjp composition and of the references (jax.grad)."""
    leaves, tree = jax.tree_util.tree_flatten(backprop.init(jax.random.PRNGKey(3), BN_CNN, (9, 9, 2)))
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    )
    x, labels = cnn[1:]
    grad = jax.jit(
        jax.grad(
            lambda p, reference: backprop.loss(BN_CNN, p, x, labels, "softmax_cross_entropy", reference=reference)
        ),
        static_argnums=1,
    )
    return params, x, labels, (grad(params, False), grad(params, True))


@pytest.mark.parametrize("store", backprop.STORES)
def test_algorithm_2_with_batch_norm_equals_custom_vjp_and_jax_grad(bn_cnn, store):
    """Batch norm in Algorithm 2: ``C††(F, T) = Σ T ⊙ x̂`` and the closed-form ``C†``, as jax.grad finds.

    The first convolution's bias feeds a batch norm, which subtracts each channel's mean: its
    gradient is 0, and all three computations give round-off (≤ 1e-14 of the largest entry) there.
    """
    params, x, labels, others = bn_cnn
    _, grads = jax.jit(lambda p, x, y: backprop.gradients(BN_CNN, p, x, y, "softmax_cross_entropy", store))(
        params, x, labels
    )
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(others[1]))
    for g in (grads, *others):
        assert float(jnp.max(jnp.abs(g[0][1]))) <= 1e-14 * scale
    rest = [(k, i) for k in range(len(BN_CNN)) for i in (0, 1) if (k, i) != (0, 1)]
    for other in others:
        assert _relative([grads[k][i] for k, i in rest], [other[k][i] for k, i in rest]) <= 1e-12


@pytest.mark.parametrize("store", backprop.STORES)
def test_algorithm_2_cnn_equals_custom_vjp_and_jax_grad(cnn, store):
    params, x, labels = cnn
    _, grads = backprop.gradients(CNN, params, x, labels, "softmax_cross_entropy", store)
    vjp_grads = jax.grad(lambda p: backprop.loss(CNN, p, x, labels, "softmax_cross_entropy"))(params)
    ref_grads = jax.grad(lambda p: backprop.loss(CNN, p, x, labels, "softmax_cross_entropy", reference=True))(params)
    assert _relative(grads, vjp_grads) <= 1e-12
    assert _relative(grads, ref_grads) <= 1e-12


def test_batch_gradient_is_sum_of_per_sample_gradients(mlp):
    """Seed 004's row form: the batched ``Oᵀ G`` sums the one-sample (seed 002 column) gradients."""
    params, x, y = mlp
    _, batched = backprop.gradients(MLP, params, x, y, "mse")
    singles = [backprop.gradients(MLP, params, x[i : i + 1], y[i : i + 1], "mse")[1] for i in range(len(x))]
    mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *singles)  # mse averages over the batch
    assert _relative(batched, mean) <= 1e-12


def test_remark_8_storage_costs(mlp):
    params, x, _ = mlp
    both, a, f = (backprop.stored_bytes(MLP, params, x, s) for s in ("a_and_F", "a", "F"))
    per_layer = sum(9 * w.shape[1] * 8 for w, _ in params)  # one float64 (9, out) array per layer
    assert (a, f, both) == (per_layer, per_layer, 2 * per_layer)


def test_float32_agrees_with_float64(mlp):
    """In float32 the algorithm matches jax.grad of the references to float32 round-off (bound 1e-5)."""
    params, x, y = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), mlp)
    _, grads = jax.jit(lambda p, x, y: backprop.gradients(MLP, p, x, y))(params, x, y)
    ref = jax.grad(lambda p: backprop.loss(MLP, p, x, y, reference=True))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
    assert _relative(grads, ref) <= 1e-5


def test_no_autodiff_in_the_algorithm():
    source = inspect.getsource(backprop)
    algorithm = source.split("def gradients(", 1)[0]  # everything the algorithm itself runs
    for banned in ("jax.vjp(", "jax.grad(", "jax.jvp(", "jax.linearize(", "value_and_grad("):
        assert banned not in source
    # and it runs the rules' own adjoints rather than re-deriving them
    adjoints = ("dense_backward", "dense_gradient", "conv2d_backward", "conv2d_gradient", "bias_add_gradient")
    for adjoint in (*adjoints, "batch_norm_backward", "batch_norm_gradient"):
        assert adjoint in algorithm


@pytest.mark.parametrize(
    "network, params, message",
    [
        ([Dense(2, "gelu")], [(np.ones((2, 2)), np.ones(2))], "layer 1 has activation 'gelu'"),
        ([Relu], [(np.ones((2, 2)), np.ones(2))], "layer 1 has map None"),
        ([Dense(2, bias=False)], [(np.ones((2, 2)), np.ones(2))], "layer 1 has map 'dense' without a bias"),
        ([Dense(2), Dense(2)], [(np.ones((2, 2)), np.ones(2))], "2 layers, got 1 entries"),
        (
            [Dense(2)],
            [(np.ones((3, 2)), np.ones(2))],
            r"backprop layer 1 \(dense\): dense: x has 2 features but w expects 3",
        ),
    ],
)
def test_bad_network_names_the_layer(network, params, message):
    with pytest.raises(RuleInputError, match=message):
        backprop.gradients(network, params, np.ones((4, 2)), np.ones((4, 2)))


def test_bad_store_and_loss():
    params = [(np.ones((2, 2)), np.ones(2))]
    with pytest.raises(RuleInputError, match="store must be one of a_and_F, a, F, got 'z'"):
        backprop.gradients([Dense(2)], params, np.ones((4, 2)), np.ones((4, 2)), store="z")
    with pytest.raises(RuleInputError, match="loss must be one of"):
        backprop.gradients([Dense(2)], params, np.ones((4, 2)), np.ones((4, 2)), loss="hinge")
    with pytest.raises(RuleInputError, match=r"backprop loss: mse"):
        backprop.gradients([Dense(2)], params, np.ones((4, 2)), np.ones((4, 3)))


def _softsign_activation() -> registry.Rule:
    """A user's activation, ``F = z / (1 + |z|)``, whose backward needs only ``F``: ``σ' = (1 − |F|)²``."""

    def forward(z):
        f = z / (1 + jnp.abs(z))
        return f, f

    @jax.custom_vjp
    def softsign(z):
        """Softsign, from seed 002 Remark 8: σ' as a function of F.

        Result:

        ``dz = G ⊙ (1 − |F|)²``
        """
        return forward(z)[0]

    softsign.defvjp(forward, lambda f, g: (g * (1 - jnp.abs(f)) ** 2,))
    return registry.Rule(
        "softsign", softsign, lambda z: z / (1 + jnp.abs(z)), lambda key, dtype: [], (0,), (("002", "Remark 8"),)
    )


def test_activation_table_is_the_registry(mlp, monkeypatch):
    """Algorithm 1 runs any registered activation that keeps only its output, a user's included."""
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))
    registry.register(_softsign_activation())
    network = [Dense(7, "softsign", F64), Dense(3, dtype=F64)]
    params, x, y = backprop.init(jax.random.PRNGKey(5), network, (6,)), *mlp[1:]
    for store in backprop.STORES:
        _, grads = backprop.gradients(network, params, x, y, "mse", store)
        assert _relative(grads, jax.grad(lambda p: backprop.loss(network, p, x, y, reference=True))(params)) <= 1e-12
