"""Bad input to the vector rules: a clear error naming the rule, the argument and the shapes or
dtypes, raised at trace time (also under jit) — never an XLA trace. (Convolution, signal and
pooling rules have theirs in their own test files.)"""

import jax
import jax.numpy as jnp
import pytest

import manualgrad as mg

f32, f64 = jnp.float32, jnp.float64

CASES = [
    (
        mg.RuleInputError,
        r"^dense: x has 5 features but w expects 4 \(x: \(32, 5\), w: \(4, 10\)\)",
        lambda: mg.dense(jnp.ones((32, 5)), jnp.ones((4, 10))),
    ),
    (
        mg.RuleInputError,
        r"^dense: w must have shape \(in, out\), got \(4,\)",
        lambda: mg.dense(jnp.ones((3, 4)), jnp.ones(4)),
    ),
    (
        mg.RuleDTypeError,
        r"^dense: x must be a floating-point array, got int32 with shape \(2, 3\)",
        lambda: mg.dense(jnp.ones((2, 3), jnp.int32), jnp.ones((3, 1))),
    ),
    (
        mg.RuleDTypeError,
        r"^dense: arguments must share one dtype, got x: float32, w: float64",
        lambda: mg.dense(jnp.ones((2, 3), f32), jnp.ones((3, 1), f64)),
    ),
    (
        mg.RuleInputError,
        r"^bias_add: b must have shape \(4,\) to match the last axis of z \(z: \(2, 4\), b: \(5,\)\)",
        lambda: mg.bias_add(jnp.ones((2, 4)), jnp.ones(5)),
    ),
    (
        mg.RuleDTypeError,
        r"^sigmoid: z must be a floating-point array, got int32",
        lambda: mg.sigmoid(jnp.arange(3, dtype=jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^leaky_relu: negative_slope must be a Python number ≥ 0 .* got -0.5",
        lambda: mg.leaky_relu(jnp.ones(3), -0.5),
    ),
    (
        mg.RuleInputError,
        r"^mse: arguments must have the same shape, got pred: \(2, 3\), target: \(2, 4\)",
        lambda: mg.mse(jnp.ones((2, 3)), jnp.ones((2, 4))),
    ),
    (
        mg.RuleInputError,
        r"^mse: the batch is empty \(pred: \(0, 3\)\)",
        lambda: mg.mse(jnp.ones((0, 3)), jnp.ones((0, 3))),
    ),
    (
        mg.RuleInputError,
        r"^softmax_cross_entropy: labels as integer class indices must have shape \(4,\) "
        r"\(logits: \(4, 3\), labels: \(4, 1\)\)",
        lambda: mg.softmax_cross_entropy(jnp.ones((4, 3)), jnp.ones((4, 1), jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^softmax_cross_entropy: labels as probability rows must have shape \(4, 3\)",
        lambda: mg.softmax_cross_entropy(jnp.ones((4, 3)), jnp.ones((4, 2))),
    ),
    (
        mg.RuleDTypeError,
        r"^l2_penalty: params\['w'\] must be a floating-point array, got int32",
        lambda: mg.l2_penalty({"w": jnp.ones(2, jnp.int32)}, 0.1),
    ),
    (
        mg.RuleInputError,
        r"^l2_penalty: lam must be a scalar, got shape \(2,\)",
        lambda: mg.l2_penalty({"w": jnp.ones(2)}, jnp.ones(2)),
    ),
]


@pytest.mark.parametrize("error, message, call", CASES, ids=[c[1][1:30] for c in CASES])
def test_clear_error(error, message, call):
    with pytest.raises(error, match=message):
        call()
    with pytest.raises(error, match=message):
        jax.jit(lambda: call())()


def test_error_types_are_the_standard_ones():
    assert issubclass(mg.RuleInputError, ValueError) and issubclass(mg.RuleDTypeError, TypeError)
