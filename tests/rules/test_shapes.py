"""Generated shapes (hypothesis): the hand VJP matches the reference's for shapes nobody picked.

Every example recompiles, so the examples are few, drawn from small sizes, and derandomised
so CI runs the same ones every time.
"""

import jax
import jax.numpy as jnp
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad

CHEAP = ("forward", "vjp")
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
sizes = st.integers(1, 5)
leading = st.lists(sizes, min_size=0, max_size=2).map(tuple)


def normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def assert_passes(name, args):
    rule = manualgrad.get(name)
    report = manualgrad.check(rule.fn, reference=rule.reference, args=args, argnums=rule.differentiable, checks=CHEAP)
    assert report.passed, "\n".join(f.describe() for f in report.failures())


@SETTINGS
@given(lead=leading, n_in=sizes, n_out=sizes)
def test_dense(lead, n_in, n_out):
    assert_passes("dense", (normal(0, (*lead, n_in)), normal(1, (n_in, n_out))))


@SETTINGS
@given(lead=leading, features=sizes)
def test_bias_add(lead, features):
    assert_passes("bias_add", (normal(0, (*lead, features)), normal(1, (features,))))


@SETTINGS
@given(
    shape=st.lists(sizes, min_size=0, max_size=3).map(tuple),
    name=st.sampled_from(["sigmoid", "tanh", "softplus", "relu"]),
)
def test_activations(shape, name):
    assert_passes(name, (normal(0, shape),))


@SETTINGS
@given(batch=sizes, rest=leading)
def test_mse(batch, rest):
    assert_passes("mse", (normal(0, (batch, *rest)), normal(1, (batch, *rest))))


@SETTINGS
@given(lead=leading, classes=sizes, integer=st.booleans())
def test_softmax_cross_entropy(lead, classes, integer):
    logits = normal(0, (*lead, classes))
    if integer:
        labels = jax.random.randint(jax.random.PRNGKey(1), lead, 0, classes)
    else:
        labels = jax.nn.softmax(normal(1, (*lead, classes)), axis=-1)
    assert_passes("softmax_cross_entropy", (logits, labels))
    assert jnp.isfinite(manualgrad.softmax_cross_entropy(logits, labels))
