"""The collectives (``manualgrad/rules/collectives.py``) on a mesh of two devices: every check of the
checker (which runs them on the mesh, ``check.sharded.device_rule``), their values, the planted
mistakes found and diagnosed, ``sync_batch_norm`` against ``batch_norm`` on the whole batch, and
``BatchNorm(axis_name=...)``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import manualgrad as mg
from manualgrad import registry, validation
from manualgrad.check import checker, sharded
from manualgrad.check.tolerances import relative_error
from manualgrad.nn import layers
from mutations import collectives as planted

pytestmark = pytest.mark.skipif(jax.device_count() < sharded.DEVICES, reason="needs two devices (tests/conftest.py)")
COLLECTIVES = ["all_gather", "psum_scatter", "psum", "pvary", "sync_batch_norm"]
AXIS = sharded.AXIS
# sync_batch_norm on two devices against batch_norm on one: the same sums in another order.
TOL = 1e-12


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", COLLECTIVES)
def test_every_check_on_the_mesh(name, dtype):
    rule = registry.get(name)
    report = mg.check(name, dtype=dtype)
    assert report.passed, "\n".join(f.describe() for f in report.failures())
    assert {f.check for f in report.findings} == set(checker.CHECKS) - (set() if rule.linear_in else {"adjoint"})


def _vjp_on_mesh(name, *args, u):
    """The collective's output and hand VJP, seen from outside shard_map (its blocks stacked)."""
    rule = sharded.device_rule(registry.get(name))
    out, pull = jax.vjp(lambda *a: rule.fn(*a, AXIS), *args)
    return out, pull(u)


def test_known_values():
    # all_gather: device k holds x_k; everyone gets [x_1; x_2]; dx_k = Σ_j G^j_k.
    out, (dx,) = _vjp_on_mesh("all_gather", jnp.array([[1.0], [2.0]]), u=jnp.array([[1.0, 10.0], [100.0, 1000.0]]))
    np.testing.assert_array_equal(out, [[1, 2], [1, 2]])
    np.testing.assert_array_equal(dx, [[101], [1010]])
    # psum_scatter: device k keeps Σ_j x^j_k; dx^j = [G_1; G_2] on every device.
    out, (dx,) = _vjp_on_mesh("psum_scatter", jnp.array([[1.0, 2.0], [3.0, 4.0]]), u=jnp.array([[1.0], [10.0]]))
    np.testing.assert_array_equal(out, [[4], [6]])
    np.testing.assert_array_equal(dx, [[1, 10], [1, 10]])
    # psum: one sum everywhere; its invariant cotangent (both uses summed) copied back to each device.
    out, (dx,) = _vjp_on_mesh("psum", jnp.array([1.0, 2.0]), u=jnp.array([1.0, 10.0]))
    np.testing.assert_array_equal(out, [3, 3])
    np.testing.assert_array_equal(dx, [11, 11])
    # pvary: one value copied to both devices; the copies' cotangents summed.
    out, (dx,) = _vjp_on_mesh("pvary", jnp.array(5.0), u=jnp.array([1.0, 10.0]))
    np.testing.assert_array_equal(out, [5, 5])
    assert dx == 11


@pytest.mark.parametrize("mutation", planted.MUTATIONS, ids=lambda m: f"{m.rule}: {m.mistake}")
def test_planted_mistake_is_caught_and_diagnosed(mutation):
    rule = registry.get(mutation.rule)
    wrong = rule.with_backward(mutation.vjp, name=f"{rule.name} ({mutation.mistake})")
    report = mg.check(wrong, checks=("vjp", "finite_diff"))
    failures = report.failures()
    assert {f.check for f in failures} == set(mutation.caught_by)
    assert {f.argument for f in failures} == {mutation.argument}
    diagnoses = [f.diagnosis for f in failures if f.check == "vjp"]
    assert diagnoses and all(mutation.diagnosis in d for d in diagnoses), diagnoses


def test_outside_shard_map_a_collective_says_so():
    with pytest.raises(validation.RuleInputError, match="all_gather: no mesh axis 'devices' here"):
        mg.get("all_gather").fn(jnp.ones((2, 3)), AXIS)
    with pytest.raises(validation.RuleInputError, match="axis_name must be the name of a mesh axis"):
        mg.get("psum").fn(jnp.ones(2), 0)


def test_pvary_of_a_varying_value_is_refused():
    mesh = sharded.mesh()
    pvary = functools.partial(mg.get("pvary").fn, axis_name=AXIS)
    shard = jax.shard_map(lambda x: pvary(x), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    with pytest.raises(validation.RuleInputError, match="pvary: x must be one value along 'devices'"):
        shard(jnp.ones(4))


def _whole_and_split(fn_whole, fn_local, args, u):
    """``fn_whole`` on one device and ``fn_local`` inside shard_map (the batch split, the rest
    replicated): outputs and VJPs under ``u``."""
    one = jax.vjp(fn_whole, *args)
    whole = one[0], one[1](u)

    def local(x, *rest, u):
        out, pull = jax.vjp(fn_local, x, *rest)
        return out, pull(u)

    specs = (P(AXIS), *(P() for _ in args[1:]))
    split = jax.shard_map(
        lambda *a: local(*a[:-1], u=a[-1]),
        mesh=sharded.mesh(),
        in_specs=(*specs, P(AXIS)),
        out_specs=(P(AXIS), specs),
    )
    return whole, jax.jit(split)(*args, u)


def test_sync_batch_norm_is_batch_norm_of_the_whole_batch():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    x = 2 * jax.random.normal(k[0], (8, 2, 3), jnp.float64)
    gamma, beta = 1 + 0.5 * jax.random.normal(k[1], (3,), jnp.float64), jax.random.normal(k[2], (3,), jnp.float64)
    u = jax.random.normal(k[3], x.shape, jnp.float64)
    whole, split = _whole_and_split(
        lambda *a: mg.batch_norm(*a, 1e-5), lambda *a: mg.get("sync_batch_norm").fn(*a, 1e-5, AXIS), (x, gamma, beta), u
    )
    assert relative_error(split, whole) <= TOL


def test_batch_norm_layer_across_devices():
    """BatchNorm(axis_name=...) in training: output, running statistics and gradients of the whole batch."""
    x = 2 * jax.random.normal(jax.random.PRNGKey(2), (6, 4), jnp.float64)
    one, sync = layers.BatchNorm(dtype=jnp.float64), layers.BatchNorm(dtype=jnp.float64, axis_name=AXIS)
    params = one.init(jax.random.PRNGKey(0), x.shape)[1]
    state = one.init_state(params)

    def run(layer, params, x):
        y, new = layer.apply(params, x, state=state, train=True)
        return jnp.sum(jnp.sin(y)), new

    grad = lambda layer: jax.grad(run, argnums=(1, 2), has_aux=True)  # noqa: E731
    (dp_one, dx_one), state_one = grad(one)(one, params, x)
    split = jax.shard_map(
        lambda p, x: grad(sync)(sync, p, x),
        mesh=sharded.mesh(),
        in_specs=(P(), P(AXIS)),
        out_specs=((P(), P(AXIS)), P()),
    )
    (dp, dx), new_state = jax.jit(split)(params, x)
    assert relative_error((dp, dx, new_state), (dp_one, dx_one, state_one)) <= TOL
    assert sync.map == "sync_batch_norm" and one.map == "batch_norm"
