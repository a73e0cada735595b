"""Every rule inside ``jax.shard_map``: the checker's ``shard_map`` check on every registered rule, and
whole networks' gradients across two devices against one.

The suite runs with two CPU devices (``tests/conftest.py``); with fewer (one accelerator) the tests
that need two skip, and the check says it is not applicable.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from manualgrad import registry, validation
from manualgrad.check import checker, sharded
from manualgrad.check.tolerances import relative_error
from manualgrad.nn import gpt, layers, recurrent
from manualgrad.rules import devices

RULES = [rule.name for rule in registry.rules() if not sharded.on_mesh(rule)]
COLLECTIVES = [rule.name for rule in registry.rules() if sharded.on_mesh(rule)]
needs_two = pytest.mark.skipif(jax.device_count() < sharded.DEVICES, reason="needs two devices (tests/conftest.py)")
# Each rule's first sample and its last (the awkward cases come last: attention's tiles, the
# recurrences' long sequences): the suite's time allows two programs per rule.
# Two devices against one: the same hand rules on the same values, the sum over the devices in
# another order (one all-reduce against autodiff's accumulation): float64 round-off.
TOL = 1e-12


def test_every_rule_meets_on_the_devices():
    """No rule can leave out the sum over the devices: every one is a devices.custom_vjp."""
    assert [r.name for r in registry.rules() if not isinstance(r.fn, devices.custom_vjp)] == []


def test_one_device_is_not_applicable(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: jax.local_devices()[:1])
    rule = registry.get("dense")
    (job, *_) = checker.jobs([rule], "float64", 0)
    (finding,) = sharded.findings(*job, "float64")
    assert finding.status == "not applicable"
    assert "needs 2 devices and this process has 1" in finding.note


def test_outside_shard_map_nothing_changes():
    """Outside shard_map a rule's program is the one of its bare custom_vjp: not one added operation."""
    rule = registry.get("dense")
    bare = jax.custom_vjp(rule.fn.fun)
    bare.defvjp(rule.fn.fwd, rule.fn.bwd)
    x, w = jnp.ones((3, 2)), jnp.ones((2, 4))
    grad = lambda f: jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1)))(x, w)  # noqa: E731
    assert str(grad(rule.fn)) == str(grad(bare))


@needs_two
@pytest.mark.parametrize("name", RULES)
def test_shard_map_check(name):
    rule = registry.get(name)
    jobs = checker.jobs([rule], "float64", 0)
    found = [f for job in (jobs[0], jobs[-1]) for f in sharded.findings(*job, "float64")]
    assert found and all(f.passed for f in found), [f.describe() for f in found if not f.passed]
    assert max(f.max_rel_error for f in found) <= TOL


@pytest.mark.parametrize("name", COLLECTIVES)
def test_a_collective_is_checked_on_the_mesh_by_every_check(name):
    rule = registry.get(name)
    found = [f for job in checker.jobs([rule], "float64", 0)[:1] for f in sharded.findings(*job, "float64")]
    assert [(f.status, f.note) for f in found] == [("not applicable", sharded.ON_MESH)]


def _plain(rule: registry.Rule, bwd) -> registry.Rule:
    """``rule`` as a bare ``jax.custom_vjp`` with the backward ``bwd``: no sum over the devices."""
    fn = jax.custom_vjp(rule.fn.fun, nondiff_argnums=rule.fn.nondiff_argnums)
    fn.defvjp(rule.fn.fwd, bwd)
    return registry.Rule(**{**rule.__dict__, "fn": fn})


@needs_two
def test_a_missing_sum_fails():
    """The bug the devices module fixes: a replicated weight's cotangent not summed is refused by JAX,
    and the check says so (not run: a failure)."""
    rule = registry.get("dense")
    (job, *_) = checker.jobs([rule], "float64", 0)
    found = sharded.findings(_plain(rule, rule.fn.bwd), *job[1:], "float64")
    assert all(f.failed for f in found)
    assert "manual axis types do not match" in found[0].note


@needs_two
def test_a_mean_instead_of_the_sum_fails():
    """A backward that reduces the weight's cotangent over the devices by their mean: the right type,
    half the value; the check finds it on w and passes x."""
    rule = registry.get("dense")

    def bwd(residuals, g):
        dx, dw = rule.fn.bwd(residuals, g)
        return dx, jax.lax.pmean(dw, sharded.AXIS) if validation.varying(dw) else dw  # one device: no mean

    (job, *_) = checker.jobs([rule], "float64", 0)
    found = {f.argument: f for f in sharded.findings(_plain(rule, bwd), *job[1:], "float64")}
    assert found["x"].passed and found["w"].failed
    assert found["w"].received == pytest.approx(found["w"].expected / 2)


# --------------------------------------------------------------------------- networks


def _models():
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    images = jax.random.normal(k[0], (4, 6, 6, 2), jnp.float64)
    labels = jax.random.randint(k[1], (4,), 0, 3)
    tokens = jax.random.randint(k[2], (4, 6), 0, 7)
    mask = jnp.ones((4, 5), bool)
    mlp = layers.mlp(3, (5,), jnp.float64)
    cnn = layers.cnn(3, (2, 3), 4, jnp.float64, norm=layers.GroupNorm(1, dtype=jnp.float64))
    block = gpt.gpt(7, 5, width=8, depth=1, heads=2, dtype=jnp.float64)
    lstm = recurrent.char_model("lstm", 7, width=3, embed=4, dtype=jnp.float64)
    rnn = recurrent.char_model("rnn", 7, width=3, embed=4, dtype=jnp.float64)
    classify = lambda model: functools.partial(layers.classifier_loss, model)  # noqa: E731
    sequence = lambda model: functools.partial(gpt.sequence_loss, model)  # noqa: E731
    return {
        "mlp": (mlp.init(k[3], images.shape)[1], classify(mlp), (images, labels)),
        "cnn": (cnn.init(k[4], images.shape)[1], classify(cnn), (images, labels)),
        "transformer block": (block.init(k[5], (4, 5))[1], sequence(block), (tokens, mask)),
        "lstm, h0 = 0": (lstm.init(k[6], (4, 5))[1], sequence(lstm), (tokens, mask)),
        "rnn, h0 = 0": (rnn.init(k[7], (4, 5))[1], sequence(rnn), (tokens, mask)),
    }


@needs_two
@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer block", "lstm, h0 = 0", "rnn, h0 = 0"])
@pytest.mark.parametrize("reference", [False, True], ids=["rules", "plain jnp"])
def test_network_gradients_across_devices(model, reference):
    """``jax.grad`` of the mean loss inside shard_map (the batch split, the parameters replicated)
    equals it on one device: each device's mean over its half, over two (equal halves), summed over
    the devices by the rules' copies' adjoint."""
    params, loss, data = _models()[model]
    value = lambda p, *d: loss(p, *d, reference=reference)[0]  # noqa: E731
    local = jax.grad(lambda p, *d: value(p, *d) / sharded.DEVICES)
    split = jax.shard_map(local, mesh=sharded.mesh(), in_specs=(P(), P(sharded.AXIS), P(sharded.AXIS)), out_specs=P())
    across, one = jax.jit(split)(params, *data), jax.jit(jax.grad(value))(params, *data)
    assert relative_error(across, one) <= TOL
    assert jax.tree_util.tree_structure(across) == jax.tree_util.tree_structure(one)
