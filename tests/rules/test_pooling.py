"""The pooling rules (``manualgrad/rules/pooling.py``): completeness, the forward
against ``lax.reduce_window``, max pooling's ties exactly as JAX's own gradient breaks them,
exact zeros where no window reaches, known values and bad input. Every check of the
cross-checker runs on these rules in ``tests/rules/test_rules.py``, and their planted mistakes
(``tests/mutations/pooling.py``) in ``tests/check/test_checker.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import manualgrad
from manualgrad.rules import pooling

NAMES = ("avg_pool2d", "max_pool2d", "flatten")


@pytest.fixture(scope="module")
def pool():
    return pooling


def normal(seed, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def lax_pool(x, op, window, stride=None, padding="VALID"):
    """The pools written directly with ``lax.reduce_window`` (what flax.linen's pools do)."""
    window = (window,) * 2 if isinstance(window, int) else tuple(window)
    stride = window if stride is None else (stride,) * 2 if isinstance(stride, int) else tuple(stride)
    pads = padding if isinstance(padding, str) else ((padding, padding),) * 2 if isinstance(padding, int) else padding
    pads = pads if isinstance(pads, str) else ((0, 0), *pads, (0, 0))
    if op == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1), pads)
    return lax.reduce_window(x, 0.0, lax.add, (1, *window, 1), (1, *stride, 1), pads) / np.prod(window)


CONFIGS = [  # x shape, window, stride, padding
    ((2, 7, 7, 3), 2, 2, "VALID"),
    ((1, 6, 9, 2), (2, 3), (1, 2), "VALID"),
    ((2, 5, 7, 2), 3, 2, "SAME"),
    ((2, 6, 6, 1), (3, 3), 1, "SAME"),
    ((1, 5, 4, 2), (3, 2), (2, 1), ((2, 0), (1, 1))),
    ((2, 8, 6, 1), 2, 3, 1),
    ((1, 4, 4, 1), 4, None, "VALID"),
]

# --------------------------------------------------------------------------- the rules


def test_samples_cover_the_awkward_cases(pool):
    for name in ("avg_pool2d", "max_pool2d"):
        samples = manualgrad.get(name).sample_inputs(jax.random.PRNGKey(0), jnp.float64)
        shapes = [s.args[0].shape for s in samples]
        assert any(n == 1 for n, *_ in shapes) and any(c > 1 for *_, c in shapes)
        assert any(h != w for _, h, w, _ in shapes)
        paddings = [s.args[3] for s in samples]
        assert "SAME" in paddings and any(not isinstance(p, str) for p in paddings)
        geos = [pool._geometry(name, s.args[0].shape, *s.args[1:]) for s in samples]
        assert any(any(r > 0 for r in g.leftover) for g in geos)
        assert any(any(s < k for s, k in zip(g.strides, g.window)) for g in geos)
        assert any(g.window[0] != g.window[1] for g in geos)
    labels = [s.label for s in manualgrad.get("max_pool2d").sample_inputs(jax.random.PRNGKey(0), jnp.float64)]
    assert sum("ties" in label for label in labels) >= 2


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_equals_lax_reduce_window(pool, config):
    xs, window, stride, padding = config
    x = normal(0, xs)

    @jax.jit
    def outputs(x):
        return {
            op: (
                lax_pool(x, op, window, stride, padding),
                fn(x, window, stride, padding),
                ref(x, window, stride, padding),
            )
            for op, fn, ref in (
                ("avg", pool.avg_pool2d, pool.avg_pool2d_reference),
                ("max", pool.max_pool2d, pool.max_pool2d_reference),
            )
        }

    for expected, rule, reference in outputs(x).values():
        np.testing.assert_allclose(rule, expected, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(reference, expected, rtol=1e-14, atol=1e-15)
    # and eagerly, once
    np.testing.assert_array_equal(
        pool.max_pool2d(x, window, stride, padding), lax_pool(x, "max", window, stride, padding)
    )


def test_avg_pool_counts_the_padding(pool):
    """count_include_pad: a corner window of "SAME" padding is still divided by the full window."""
    y = pool.avg_pool2d(jnp.ones((1, 3, 3, 1)), 3, 1, "SAME")[0, :, :, 0]
    np.testing.assert_allclose(y, [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9], [4 / 9, 6 / 9, 4 / 9]], rtol=1e-15)


def test_flatten_forward(pool):
    x = normal(0, (2, 3, 4, 5))
    np.testing.assert_array_equal(pool.flatten(x), np.asarray(x).reshape(2, 60))
    np.testing.assert_array_equal(pool.flatten_reference(x), np.asarray(x).reshape(2, 60))
    assert pool.flatten(jnp.ones((4,))).shape == (4, 1)
    assert pool.flatten(jnp.ones((1, 7))).shape == (1, 7)


# --------------------------------------------------------------------------- ties


def tie_inputs(dtype):
    zeros_and_ones = jnp.floor(2 * jax.random.uniform(jax.random.PRNGKey(7), (2, 6, 5, 1), dtype))
    return [
        (jnp.ones((1, 4, 4, 1), dtype), 2, None, "VALID"),  # all equal, disjoint windows
        (jnp.ones((2, 5, 6, 2), dtype), 3, 1, "VALID"),  # all equal, overlapping windows
        (zeros_and_ones, 3, 2, "SAME"),  # windows of zeros beside padding: -inf never wins
        (jnp.round(normal(1, (2, 7, 7, 3), dtype)), 3, 1, "VALID"),  # integer values, stride 1
        (jnp.round(normal(2, (2, 7, 8, 2), dtype)), (2, 3), (2, 1), ((1, 1), (2, 0))),
        (jnp.array([[0.0, -0.0], [-0.0, 0.0]], dtype)[None, :, :, None], 2, None, "VALID"),  # signed zeros
    ]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_max_pool_ties_broken_exactly_as_jax_autodiff(pool, dtype):
    """The hand rule's gradient equals JAX's own gradient of ``lax.reduce_window`` max bit for
    bit, under jit and eagerly: the first tied entry in row-major window order wins. So does
    the gradient of the rule's reference (a chain of ``where(best >= entry, best, entry)``)."""
    for n, (x, window, stride, padding) in enumerate(tie_inputs(dtype)):
        out_shape = lax_pool(x, "max", window, stride, padding).shape
        g = jnp.asarray(np.random.default_rng(n).integers(1, 9, out_shape), dtype)  # exact sums

        def loss(pool_fn, g=g, window=window, stride=stride, padding=padding):
            return lambda v: jnp.sum(g * pool_fn(v, window, stride, padding))

        plain = loss(lambda x, *a: lax_pool(x, "max", *a))
        fns = (plain, loss(pool.max_pool2d), loss(pool.max_pool2d_reference))
        expected, *received = jax.jit(lambda x, fns=fns: [jax.grad(f)(x) for f in fns])(x)
        assert np.any(np.asarray(expected) != 0)
        for r in received:
            np.testing.assert_array_equal(r, expected, err_msg=f"tie input {n}")
        if n < 2:  # eagerly too
            np.testing.assert_array_equal(jax.grad(fns[1])(x), jax.grad(plain)(x), err_msg=f"tie input {n}")


def test_first_tie_in_row_major_order_wins(pool):
    """Written out: in a 2×2 window of equal values the top-left entry gets the whole cotangent,
    and with stride 1 an entry tied in several windows wins each window where it comes first."""
    dx = jax.grad(lambda x: jnp.sum(pool.max_pool2d(x, 2)))(jnp.ones((1, 4, 4, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    x = jnp.array([[1.0, 3, 3, 2], [3, 0, 1, 3], [2, 3, 3, 1], [0, 1, 3, 3]])[None, :, :, None]
    dx = jax.grad(lambda x: jnp.sum(pool.max_pool2d(x, 2, 1)))(x)[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0, 2, 1, 0], [1, 0, 0, 1], [0, 3, 1, 0], [0, 0, 0, 0]])


# --------------------------------------------------------------------------- exact zeros, known values


def test_rows_no_window_reaches_get_exactly_zero(pool):
    """Input 7, window 2, stride 2: windows cover rows 0..5, so row 6 and column 6 get nothing."""
    x, g = normal(0, (2, 7, 7, 3)), normal(1, (2, 3, 3, 3))
    pullbacks = jax.jit(
        lambda x, g: [jax.vjp(lambda x, fn=fn: fn(x, 2, 2), x)[1](g)[0] for fn in (pool.avg_pool2d, pool.max_pool2d)]
    )
    avg_dx, max_dx = (np.asarray(dx) for dx in pullbacks(x, g))
    for dx in (avg_dx, max_dx):
        assert np.all(dx[:, 6, :, :] == 0) and np.all(dx[:, :, 6, :] == 0)
    assert np.all(avg_dx[:, :6, :6, :] != 0)
    # stride 3 > window 2 with padding 1: rows/columns 1 and 4 are skipped, row 7 is left over
    x, g = normal(2, (1, 8, 6, 1)), normal(3, (1, 3, 3, 1))
    dx = np.asarray(jax.vjp(lambda x: pool.avg_pool2d(x, 2, 3, 1), x)[1](g)[0])[0, :, :, 0]
    assert np.all(dx[[1, 4, 7], :] == 0) and np.all(dx[:, [1, 4]] == 0)
    assert np.all(np.delete(np.delete(dx, [1, 4, 7], axis=0), [1, 4], axis=1) != 0)


def test_known_values_4x4_window_2(pool):
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    g = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    y, pull = jax.vjp(lambda x: pool.avg_pool2d(x, 2), x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(
        pull(g)[0][0, :, :, 0],
        [[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 1.0, 1.0], [0.75, 0.75, 1.0, 1.0]],
    )
    y, pull = jax.vjp(lambda x: pool.max_pool2d(x, 2), x)
    np.testing.assert_array_equal(y[0, :, :, 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(pull(g)[0][0, :, :, 0], [[0, 0, 0, 0], [0, 1, 0, 2], [0, 0, 0, 0], [0, 3, 0, 4]])
    # overlapping: window 2, stride 1, the 3×3 output's cotangent all ones
    dx = jax.grad(lambda x: jnp.sum(pool.avg_pool2d(x, 2, 1)))(x)[0, :, :, 0]
    np.testing.assert_array_equal(4 * dx, [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]])
    dx = jax.grad(lambda x: jnp.sum(pool.max_pool2d(x, 2, 1)))(x)[0, :, :, 0]
    np.testing.assert_array_equal(dx, [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]])
    # flatten: the backward pass is the inverse reshape
    gf = jnp.arange(16.0).reshape(1, 16)
    np.testing.assert_array_equal(jax.vjp(pool.flatten, x)[1](gf)[0], x)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda p: p.avg_pool2d(jnp.ones((4, 4, 3)), 2),
            r"avg_pool2d: x must have shape \(N, H, W, C\), got \(4, 4, 3\)",
        ),
        (
            lambda p: p.max_pool2d(jnp.ones((1, 4, 4, 1), jnp.int32), 2),
            r"max_pool2d: x must be a floating-point array, got int32 with shape \(1, 4, 4, 1\)",
        ),
        (
            lambda p: p.max_pool2d(jnp.ones((1, 4, 3, 1)), (2, 4)),
            r"max_pool2d: the window \(2, 4\) is larger than the padded input \(4, 3\) \(x: \(1, 4, 3, 1\)\)",
        ),
        (
            lambda p: p.avg_pool2d(jnp.ones((1, 4, 4, 1)), 2, 0),
            r"avg_pool2d: stride must be an int or 2 ints, each at least 1, got 0",
        ),
        (
            lambda p: p.max_pool2d(jnp.ones((1, 4, 4, 1)), 2, (1, 0)),
            r"max_pool2d: stride must be an int or 2 ints, each at least 1, got \(1, 0\)",
        ),
        (
            lambda p: p.avg_pool2d(jnp.ones((1, 4, 4, 1)), 0),
            r"avg_pool2d: window must be an int or 2 ints, each at least 1, got 0",
        ),
        (lambda p: p.max_pool2d(jnp.ones((1, 4, 4, 1)), 2, 1, -1), r"max_pool2d: padding must not be negative, got -1"),
        (
            lambda p: p.avg_pool2d(jnp.ones((1, 4, 4, 1)), 2, 1, ((0, 0), (-1, 1))),
            r"avg_pool2d: padding must not be negative",
        ),
        (
            lambda p: p.avg_pool2d(jnp.ones((1, 4, 4, 1)), 2, 1, "FULL"),
            r"avg_pool2d: padding must be 'VALID', 'SAME', an int or 2 \(lo, hi\) pairs, got 'FULL'",
        ),
        (
            lambda p: jax.jit(p.avg_pool2d, static_argnums=(1,))(jnp.ones((1, 4, 4, 1), jnp.int32), 2),
            r"avg_pool2d: x must be a floating-point array, got int32",
        ),
        (
            lambda p: jax.eval_shape(lambda x: p.max_pool2d(x, 3), jnp.ones((2, 2, 5, 1))),
            r"max_pool2d: the window \(3, 3\) is larger than the padded input \(2, 5\)",
        ),
        (lambda p: p.flatten(jnp.ones(())), r"flatten: x must have at least 1 axes \(N, \.\.\.\), got shape \(\)"),
        (lambda p: p.flatten(jnp.ones((2, 3), jnp.int32)), r"flatten: x must be a floating-point array, got int32"),
    ],
)
def test_bad_input(pool, call, message):
    with pytest.raises((manualgrad.RuleInputError, manualgrad.RuleDTypeError), match=message):
        call(pool)
