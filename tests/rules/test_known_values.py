"""One hand-computed value per rule of the vector, convolution and recurrence families: forward and gradients.

Every expected number below is worked out in the comment beside it; nothing is computed by
the code under test or by another library. (The signal and pooling rules have theirs in
``test_signal.py`` and ``test_pooling.py``.)
"""

import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg


def assert_equal(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, dtype=np.float64), rtol=1e-12, atol=1e-15)


def test_dense():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    w = jnp.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    g = jnp.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    y, pull = jax.vjp(mg.dense, x, w)
    assert_equal(y, [[5, 2, -1], [11, 4, -3]])  # row i: x_i W
    dx, dw = pull(g)
    assert_equal(dx, [[0, 2], [0, 2]])  # G Wᵀ: [1·1 + 1·(−1), 1·2 + 1·0], [2·0, 2·1]
    assert_equal(dw, [[1, 6, 1], [2, 8, 2]])  # Xᵀ G: [1·1+3·0, 1·0+3·2, 1·1+3·0], [2·1+4·0, 2·0+4·2, 2·1]


def test_bias_add_sums_every_broadcast_axis():
    z, b = jnp.zeros((2, 2, 3)), jnp.array([1.0, 2.0, 3.0])
    g = jnp.arange(12.0).reshape(2, 2, 3)
    y, pull = jax.vjp(mg.bias_add, z, b)
    assert_equal(y[1, 0], [1, 2, 3])
    dz, db = pull(g)
    assert_equal(dz, g)
    assert_equal(db, [18, 22, 26])  # column sums of 0..11 in rows of 3: 0+3+6+9, 1+4+7+10, 2+5+8+11


def test_sigmoid_at_zero_and_ln3():
    z = jnp.array([0.0, np.log(3.0)])
    y, pull = jax.vjp(mg.sigmoid, z)
    assert_equal(y, [0.5, 0.75])  # 1/(1+1), 1/(1+1/3)
    assert_equal(pull(jnp.ones(2))[0], [0.25, 0.1875])  # F(1−F): 0.5·0.5, 0.75·0.25


def test_tanh_at_ln2():
    z = jnp.array([np.log(2.0)])
    y, pull = jax.vjp(mg.tanh, z)
    assert_equal(y, [0.6])  # (2 − 1/2) / (2 + 1/2)
    assert_equal(pull(jnp.ones(1))[0], [0.64])  # 1 − 0.36


def test_relu_derivative_at_zero_is_zero():
    z = jnp.array([-2.0, 0.0, 3.0])
    y, pull = jax.vjp(mg.relu, z)
    assert_equal(y, [0, 0, 3])
    assert_equal(pull(jnp.ones(3))[0], [0, 0, 1])
    assert_equal(jax.grad(lambda z: jax.nn.relu(z).sum())(z), [0, 0, 1])  # the same convention


def test_leaky_relu():
    z = jnp.array([-2.0, 0.0, 3.0])
    y, pull = jax.vjp(lambda z: mg.leaky_relu(z, 0.1), z)
    assert_equal(y, [-0.2, 0, 3])
    assert_equal(pull(jnp.ones(3))[0], [0.1, 0.1, 1])  # α left of the kink and at it


def test_softplus_at_ln3():
    z = jnp.array([np.log(3.0)])
    y, pull = jax.vjp(mg.softplus, z)
    assert_equal(y, [np.log(4.0)])  # log(1 + 3)
    assert_equal(pull(jnp.ones(1))[0], [0.75])  # 1 − e^{−F} = 1 − 1/4


def test_identity():
    y, pull = jax.vjp(mg.identity, jnp.array([1.5, -2.0]))
    assert_equal(y, [1.5, -2])
    assert_equal(pull(jnp.array([3.0, 4.0]))[0], [3, 4])


def test_mse():
    pred, target = jnp.array([[1.0, 2.0], [3.0, 5.0]]), jnp.array([[0.0, 2.0], [1.0, 1.0]])
    y, pull = jax.vjp(mg.mse, pred, target)
    assert_equal(y, 5.25)  # (½(1 + 0) + ½(4 + 16)) / 2
    d_pred, d_target = pull(jnp.array(1.0))
    assert_equal(d_pred, [[0.5, 0], [1, 2]])  # (pred − target) / 2
    assert_equal(d_target, [[-0.5, 0], [-1, -2]])


def test_softmax_cross_entropy_indices_and_one_hot_agree():
    logits = jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]])  # softmax rows: [1/4, 3/4], [1/2, 1/2]
    labels = jnp.array([1, 0])
    loss, pull = jax.vjp(mg.softmax_cross_entropy, logits, labels)
    assert_equal(loss, (np.log(4 / 3) + np.log(2.0)) / 2)
    d_logits, d_labels = pull(jnp.array(1.0))
    assert_equal(d_logits, [[0.125, -0.125], [-0.25, 0.25]])  # (p − onehot) / 2
    assert d_labels.dtype == jax.dtypes.float0
    one_hot = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    loss2, pull2 = jax.vjp(mg.softmax_cross_entropy, logits, one_hot)
    assert_equal(loss2, loss)
    assert_equal(pull2(jnp.array(1.0))[0], d_logits)
    assert_equal(pull2(jnp.array(1.0))[1], [[np.log(4) / 2, np.log(4 / 3) / 2], [np.log(2) / 2] * 2])  # −log p / 2


def test_softmax_cross_entropy_out_of_range_label_is_nan():
    loss = mg.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 3]))
    assert np.isnan(loss)


def test_l2_penalty():
    params = {"a": jnp.array([1.0, 2.0]), "b": [jnp.array([[3.0]])]}
    y, pull = jax.vjp(mg.l2_penalty, params, jnp.array(0.5))
    assert_equal(y, 3.5)  # 0.5/2 · (1 + 4 + 9)
    d_params, d_lam = pull(jnp.array(1.0))
    assert_equal(d_params["a"], [0.5, 1])  # λ W
    assert_equal(d_params["b"][0], [[1.5]])
    assert_equal(d_lam, 7)  # ½ Σ‖W‖²


def test_conv2d_single_channel():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)  # [[0,1,2],[3,4,5],[6,7,8]]
    w = jnp.array([[1.0, 0.0], [0.0, -1.0]]).reshape(2, 2, 1, 1)
    y, pull = jax.vjp(mg.conv2d, x, w)
    assert_equal(y[0, :, :, 0], [[-4, -4], [-4, -4]])  # x[i,j] − x[i+1,j+1]
    dx, dw = pull(jnp.ones((1, 2, 2, 1)))
    assert_equal(dx[0, :, :, 0], [[1, 1, 0], [1, 0, -1], [0, -1, -1]])  # W spread over each window
    assert_equal(dw[:, :, 0, 0], [[8, 12], [20, 24]])  # window sums: 0+1+3+4, 1+2+4+5, 3+4+6+7, 4+5+7+8


def test_conv1d_stride_two():
    x = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 5, 1)
    w = jnp.array([1.0, 1.0]).reshape(2, 1, 1)
    y, pull = jax.vjp(lambda x, w: mg.conv1d(x, w, 2), x, w)
    assert_equal(y.ravel(), [3, 7])  # 1+2, 3+4; 5 is reached by no window
    dx, dw = pull(jnp.array([1.0, 10.0]).reshape(1, 2, 1))
    assert_equal(dx.ravel(), [1, 1, 10, 10, 0])
    assert_equal(dw.ravel(), [31, 42])  # 1·1 + 3·10, 2·1 + 4·10


def test_rnn_two_steps_carries_dh_back():
    # N = D = H = 1, w_x = w_h = 1, b = 0, h0 = 0: a_1 = x_1 = ln 2, a_2 = x_2 + h_1 = ln 3.
    x = jnp.array([np.log(2.0), np.log(3.0) - 0.6]).reshape(1, 2, 1)
    one, zero = jnp.ones((1, 1)), jnp.zeros((1, 1))
    y, pull = jax.vjp(mg.rnn, x, zero, one, one, jnp.zeros(1))
    assert_equal(y.ravel(), [0.6, 0.8])  # tanh ln 2 = 3/5, tanh ln 3 = 4/5
    dx, dh0, dw_x, dw_h, db = pull(jnp.ones((1, 2, 1)))
    # da_2 = 1 · (1 − 0.8²) = 0.36; dh_1 = G_1 + da_2 w_h = 1.36; da_1 = 1.36 · (1 − 0.6²) = 0.8704
    assert_equal(dx.ravel(), [0.8704, 0.36])  # da_t w_x
    assert_equal(dh0, [[0.8704]])  # da_1 w_h
    assert_equal(dw_x, [[np.log(2.0) * 0.8704 + (np.log(3.0) - 0.6) * 0.36]])  # Σ x_t da_t
    assert_equal(dw_h, [[0.216]])  # h_0 da_1 + h_1 da_2 = 0 + 0.6 · 0.36
    assert_equal(db, [1.2304])  # 0.8704 + 0.36


def test_lstm_one_step_in_pytorchs_gate_order():
    # N = D = H = 1, x = h0 = 0: z = b = (z_i, z_f, z_g, z_o) = (0, 0, ln 3, 0), so i = f = o = ½ and
    # g = tanh ln 3 = 0.8; c0 = 2 ln 2 − 0.8 makes c_1 = ½ c0 + ½ · 0.8 = ln 2, tanh c_1 = 0.6.
    c0 = jnp.array([[2 * np.log(2.0) - 0.8]])
    w_x, w_h = jnp.array([[1.0, -1.0, 0.5, 2.0]]), jnp.array([[1.0, 2.0, 3.0, 4.0]])
    b = jnp.array([0.0, 0.0, np.log(3.0), 0.0])
    y, pull = jax.vjp(mg.lstm, jnp.zeros((1, 1, 1)), jnp.zeros((1, 1)), c0, w_x, w_h, b)
    assert_equal(y, [[[0.3]]])  # o tanh c_1 = ½ · 0.6
    dx, dh0, dc0, dw_x, dw_h, db = pull(jnp.ones((1, 1, 1)))
    # dc = o (1 − tanh² c_1) = ½ · 0.64 = 0.32; σ' = ¼ at 0, tanh' = 1 − 0.64 = 0.36 at z_g;
    # dz = (dc g σ'(z_i), dc c0 σ'(z_f), dc i tanh'(z_g), tanh c_1 σ'(z_o))
    dz_f = 0.32 * float(c0[0, 0]) * 0.25
    dz = [0.32 * 0.8 * 0.25, dz_f, 0.32 * 0.5 * 0.36, 0.6 * 0.25]
    assert_equal(db, dz)  # [0.064, dz_f, 0.0576, 0.15]
    assert_equal(dc0, [[0.16]])  # dc f: the forget-gate path
    assert_equal(dh0, [[0.064 + 2 * dz_f + 3 * 0.0576 + 4 * 0.15]])  # dz w_hᵀ, w_h's blocks in the order i, f, g, o
    assert_equal(dx, [[[0.064 - dz_f + 0.5 * 0.0576 + 2 * 0.15]]])  # dz w_xᵀ
    assert_equal(dw_x, [[0.0, 0.0, 0.0, 0.0]])  # x = 0
    assert_equal(dw_h, [[0.0, 0.0, 0.0, 0.0]])  # h0 = 0
