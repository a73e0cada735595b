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
    (
        mg.RuleInputError,
        r"^add: arguments must have the same shape, got x: \(2, 3\), y: \(3,\)",
        lambda: mg.add(jnp.ones((2, 3)), jnp.ones(3)),
    ),
    (
        mg.RuleDTypeError,
        r"^add: arguments must share one dtype, got x: float32, y: float64",
        lambda: mg.add(jnp.ones(2, f32), jnp.ones(2, f64)),
    ),
    (
        mg.RuleDTypeError,
        r"^gelu: z must be a floating-point array, got int32 with shape \(3,\)",
        lambda: mg.gelu(jnp.arange(3, dtype=jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^gelu: approximate must be a Python bool \(True: the tanh form, False: z Φ\(z\)\), got 'tanh'",
        lambda: mg.gelu(jnp.ones(3), "tanh"),
    ),
    (
        mg.RuleDTypeError,
        r"^softmax: z must be a floating-point array, got int32 with shape \(2, 3\)",
        lambda: mg.softmax(jnp.ones((2, 3), jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^softmax: axis must be a Python int in \[-2, 2\) for z of shape \(2, 3\), got 2",
        lambda: mg.softmax(jnp.ones((2, 3)), 2),
    ),
    (
        mg.RuleDTypeError,
        r"^log_softmax: z must be a floating-point array, got int32",
        lambda: mg.log_softmax(jnp.ones(4, jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^log_softmax: z must have at least 1 axes \(\.\.\., n\) with the n logits along axis, got shape \(\)",
        lambda: mg.log_softmax(jnp.ones(())),
    ),
    (
        mg.RuleDTypeError,
        r"^embedding: ids must be an integer array of row indices, got float32 with shape \(3,\); cast it first",
        lambda: mg.embedding(jnp.ones(3, f32), jnp.ones((4, 2))),
    ),
    (
        mg.RuleInputError,
        r"^embedding: table must have shape \(vocab, dim\) with vocab ≥ 1, got \(4, 2, 2\)",
        lambda: mg.embedding(jnp.arange(3), jnp.ones((4, 2, 2))),
    ),
    (
        mg.RuleInputError,
        r"^embedding: table must have shape \(vocab, dim\) with vocab ≥ 1, got \(0, 2\)",
        lambda: mg.embedding(jnp.arange(3), jnp.ones((0, 2))),
    ),
    (
        mg.RuleDTypeError,
        r"^embedding: table must be a floating-point array, got int32",
        lambda: mg.embedding(jnp.arange(3), jnp.ones((4, 2), jnp.int32)),
    ),
    (
        mg.RuleInputError,
        r"^attention: q, k and v must agree in batch B \(axis 0\): q has 2, k has 3, v has 3 "
        r"\(q: \(2, 4, 2, 8\), k: \(3, 5, 2, 8\), v: \(3, 5, 2, 8\)\)",
        lambda: mg.attention(jnp.ones((2, 4, 2, 8)), jnp.ones((3, 5, 2, 8)), jnp.ones((3, 5, 2, 8))),
    ),
    (
        mg.RuleInputError,
        r"^attention: q, k and v must agree in heads N \(axis 2\): q has 2, k has 2, v has 1",
        lambda: mg.attention(jnp.ones((2, 4, 2, 8)), jnp.ones((2, 5, 2, 8)), jnp.ones((2, 5, 1, 8))),
    ),
    (
        mg.RuleInputError,
        r"^attention: q, k and v must agree in head size H \(axis 3\): q has 8, k has 4, v has 8",
        lambda: mg.attention(jnp.ones((2, 4, 2, 8)), jnp.ones((2, 5, 2, 4)), jnp.ones((2, 5, 2, 8))),
    ),
    (
        mg.RuleInputError,
        r"^attention: k and v must have the same key positions S \(axis 1\) \(q: \(1, 4, 2, 8\), k: \(1, 5, 2, 8\), "
        r"v: \(1, 6, 2, 8\)\)",
        lambda: mg.attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 5, 2, 8)), jnp.ones((1, 6, 2, 8))),
    ),
    (
        mg.RuleInputError,
        r"^attention: expected q \(B, T, N, H\) and k, v \(B, S, N, H\): batch, positions, heads, head size, "
        r"got \(q: \(4, 16\), k: \(4, 16\), v: \(4, 16\)\)",
        lambda: mg.attention(jnp.ones((4, 16)), jnp.ones((4, 16)), jnp.ones((4, 16))),
    ),
    (
        mg.RuleInputError,
        r"^attention: every query needs at least one key \(S ≥ 1\) and a head size H ≥ 1",
        lambda: mg.attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 0, 2, 8)), jnp.ones((1, 0, 2, 8))),
    ),
    (
        mg.RuleInputError,
        r"^attention: causal must be a Python bool \(True: query t sees the keys s ≤ t\), got 1",
        lambda: mg.attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), causal=1),
    ),
    (
        mg.RuleDTypeError,
        r"^attention: k must be a floating-point array, got int32",
        lambda: mg.attention(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8), jnp.int32), jnp.ones((1, 4, 2, 8))),
    ),
    (
        mg.RuleDTypeError,
        r"^attention: arguments must share one dtype, got q: float32, k: float32, v: float64",
        lambda: mg.attention(jnp.ones((1, 4, 2, 8), f32), jnp.ones((1, 4, 2, 8), f32), jnp.ones((1, 4, 2, 8), f64)),
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


# l2_penalty's params are any pytree: a list there is a list of parameters.
@pytest.mark.parametrize("name", [rule.name for rule in mg.registry.rules() if rule.name != "l2_penalty"])
def test_a_python_list_for_an_array_is_refused_by_name(name):
    """A list where an array goes (``gamma=[1., 1., 1.]``, ``labels=[0, 4, 2]``) is refused with the
    rule's and the argument's names, as ``jax.numpy`` refuses it; ``jax.custom_vjp`` would otherwise
    take it apart as a pytree of scalars and fail inside ``jnp.result_type``."""
    rule = mg.registry.get(name)
    args = rule.sample_inputs(jax.random.PRNGKey(0), jnp.dtype(f32))[0].args
    arrays = [i for i, a in enumerate(args) if isinstance(a, jax.Array) and a.ndim > 0]
    assert arrays, f"{name}'s first sample has no array argument"
    for i in arrays:
        given = list(args)
        given[i] = args[i].tolist()
        expected = "one PRNG key" if rule.argnames[i] == "key" else "an array, got a Python list"
        with pytest.raises(mg.RuleDTypeError, match=rf"^{name}: {rule.argnames[i]} must be {expected}"):
            rule.fn(*given)
