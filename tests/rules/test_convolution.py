"""conv1d and conv2d: forward equal to lax, exact zeros for unused rows, the NHWC bias, bad configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import manualgrad as mg

CONFIGS = [  # x shape, w shape, stride, padding, dilation
    ((2, 8, 8, 3), (3, 3, 3, 4), 2, "SAME", 1),
    ((1, 7, 5, 2), (2, 4, 2, 3), (1, 2), ((2, 0), (1, 3)), (2, 1)),
    ((3, 6, 6, 1), (6, 6, 1, 2), 1, "VALID", 1),
    ((2, 9, 9, 2), (4, 4, 2, 2), 3, 2, 1),
]


def normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("config", CONFIGS)
def test_conv2d_forward_equals_lax(config):
    xs, ws, stride, padding, dilation = config
    x, w = normal(0, xs), normal(1, ws)
    strides = (stride,) * 2 if isinstance(stride, int) else stride
    dilations = (dilation,) * 2 if isinstance(dilation, int) else dilation
    pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    expected = lax.conv_general_dilated(
        x, w, strides, pads, rhs_dilation=dilations, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(mg.conv2d(x, w, stride, padding, dilation), expected, rtol=1e-12, atol=1e-12)


def test_conv1d_forward_equals_lax():
    x, w = normal(0, (2, 11, 3)), normal(1, (3, 3, 4))
    expected = lax.conv_general_dilated(x, w, (2,), "SAME", rhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC"))
    np.testing.assert_allclose(mg.conv1d(x, w, 2, "SAME", 2), expected, rtol=1e-12, atol=1e-12)


def test_conv1d_is_seed_000_correlation_for_one_channel():
    x, w = normal(0, (9,)), normal(1, (4,))
    y = mg.conv1d(x[None, :, None], w[:, None, None])[0, :, 0]
    np.testing.assert_allclose(y, np.correlate(np.asarray(x), np.asarray(w), "valid"), rtol=1e-12)


def test_rows_no_window_reaches_get_exactly_zero():
    """Input 8, kernel 3, stride 2: windows cover rows 0..6, so row 7 (and column 7) get no gradient."""
    x, w = normal(0, (2, 8, 8, 1)), normal(1, (3, 3, 1, 2))
    dx = jax.grad(lambda x: jnp.sum(mg.conv2d(x, w, 2) ** 2))(x)
    assert np.all(np.asarray(dx[:, 7, :, :]) == 0) and np.all(np.asarray(dx[:, :, 7, :]) == 0)
    assert np.all(np.asarray(dx[:, :7, :7, :]) != 0)


def test_per_channel_bias_is_iota_on_nhwc():
    """Seed 002's ι: one bias per channel; ι*(G) sums G over N, H and W."""
    x, w, b = normal(0, (2, 5, 6, 3)), normal(1, (3, 3, 3, 4)), normal(2, (4,))
    g = normal(3, (2, 3, 4, 4))
    _, pull = jax.vjp(lambda b: mg.bias_add(mg.conv2d(x, w), b), b)
    np.testing.assert_allclose(pull(g)[0], np.asarray(g).sum(axis=(0, 1, 2)), rtol=1e-12)


def test_hand_gradient_equals_jax_grad_of_lax_network():
    x, w1, w2 = normal(0, (2, 9, 9, 2)), normal(1, (3, 3, 2, 4)), normal(2, (2, 2, 4, 3))

    def manual(x, w1, w2):
        return jnp.sum(mg.tanh(mg.conv2d(mg.relu(mg.conv2d(x, w1, 2, "SAME")), w2, 1, 1, 2)) ** 2)

    def plain(x, w1, w2):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.nn.relu(lax.conv_general_dilated(x, w1, (2, 2), "SAME", dimension_numbers=dn))
        return jnp.sum(
            jnp.tanh(
                lax.conv_general_dilated(h, w2, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2), dimension_numbers=dn)
            )
            ** 2
        )

    for a, b in zip(jax.grad(manual, (0, 1, 2))(x, w1, w2), jax.grad(plain, (0, 1, 2))(x, w1, w2)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((5, 5, 1, 1))),
            r"conv2d: the window \(5, 5\) is larger than the padded input \(4, 4\) "
            r"\(x: \(1, 4, 4, 1\), w: \(5, 5, 1, 1\)\)",
        ),
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), dilation=2),
            r"conv2d: the window \(3, 3\) \(dilated to \(5, 5\)\) is larger than the padded input",
        ),
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), stride=0),
            r"conv2d: stride must be an int or 2 ints, each at least 1, got 0",
        ),
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), padding=-1),
            r"conv2d: padding must not be negative, got -1",
        ),
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), padding="CIRCULAR"),
            r"conv2d: padding must be 'VALID', 'SAME', an int or 2 \(lo, hi\) pairs, got 'CIRCULAR'",
        ),
        (
            lambda: mg.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 1))),
            r"conv2d: x has 3 channels but w expects 2 \(x: \(1, 4, 4, 3\), w: \(3, 3, 2, 1\)\)",
        ),
        (
            lambda: mg.conv2d(jnp.ones((4, 4, 3)), jnp.ones((3, 3, 3, 1))),
            r"conv2d: x must have shape \(N, H, W, C_in\), got \(4, 4, 3\)",
        ),
        (
            lambda: mg.conv1d(jnp.ones((1, 4, 3)), jnp.ones((3, 3))),
            r"conv1d: w must have shape \(K, C_in, C_out\) with no empty axis, got \(3, 3\)",
        ),
        (
            lambda: jax.jit(mg.conv1d)(jnp.ones((1, 4, 2), jnp.int32), jnp.ones((3, 2, 1))),
            r"conv1d: x must be a floating-point array, got int32",
        ),
    ],
)
def test_bad_configurations(call, message):
    with pytest.raises((mg.RuleInputError, mg.RuleDTypeError), match=message):
        call()
