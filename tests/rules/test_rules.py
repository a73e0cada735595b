"""Every registered rule through every check of the cross-checker, in float32 and float64.

The checks (forward and VJP against the reference, finite differences, jit, vmap,
grad-of-grad) and their tolerances are defined in ``manualgrad/check/checker.py``.
"""

import inspect

import jax
import pytest

import manualgrad
from manualgrad.check import checker

RULES = [rule.name for rule in manualgrad.rules()]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", RULES)
def test_rule_passes_every_check(name, dtype):
    report = manualgrad.check(name, dtype=dtype)
    assert report.passed, "\n".join(f.describe() for f in report.failures())
    ran = {f.check for f in report.findings}
    rule = manualgrad.get(name)
    assert ran == set(checker.CHECKS) - (set() if rule.linear_in else {"adjoint"})
    if rule.linear_in:  # one dot-product test per sample and linear group (softmax's integer labels have none)
        adjoint = [f for f in report.findings if f.check == "adjoint"]
        assert len(adjoint) >= 2 and all(f.max_rel_error <= checker.TOLERANCES[dtype]["adjoint"] for f in adjoint)
    # Passing means: no entry off by more than the dtype's relative tolerance (1e-12 in float64,
    # 1e-5 in float32) *and* by more than ten ulps of 1 in absolute terms. Entries that are
    # tiny sums of cancelling O(1) terms (a 1.9e-8 second derivative of softmax_cross_entropy,
    # say) carry relative round-off above 1e-12 while their absolute error is 1e-20.


@pytest.mark.parametrize("name", RULES)
def test_rule_is_complete(name):
    rule = manualgrad.get(name)
    assert isinstance(rule.fn, jax.custom_vjp)
    assert getattr(manualgrad, name) is rule.fn
    assert len(rule.sample_inputs(jax.random.PRNGKey(0), "float32")) >= 2
    for seed_id, _ in rule.seeds:
        assert f"seed {seed_id}" in rule.derivation


@pytest.mark.parametrize("name", RULES)
def test_rule_module_order(name):
    """Reference, custom_vjp function, forward, backward (and gradient) pass, registration — in that order."""
    rule = manualgrad.get(name)
    source = inspect.getsource(inspect.getmodule(rule.reference))
    parts = [f"def {name}_reference(", f"def {name}(", f"def {name}_forward(", f"def {name}_backward("]
    if f"def {name}_gradient(" in source:
        parts.append(f"def {name}_gradient(")
    positions = [source.index(part) for part in [*parts, f'name="{name}"']]
    assert positions == sorted(positions)


@pytest.mark.parametrize("name", RULES)
def test_rule_passes_take_the_cotangent_last(name):
    """``NAME_backward`` (the input's cotangent, C†) and ``NAME_gradient`` (the weights', C††): ``g`` last."""
    module = inspect.getmodule(manualgrad.get(name).reference)
    passes = [
        getattr(module, f"{name}_{kind}") for kind in ("backward", "gradient") if hasattr(module, f"{name}_{kind}")
    ]
    assert passes, f"{module.__name__} has no {name}_backward"
    for fn in passes:
        assert list(inspect.signature(fn).parameters)[-1] == "g", f"{fn.__name__}{inspect.signature(fn)}"


def test_no_rule_uses_autodiff_inside():
    for module in {inspect.getmodule(rule.reference) for rule in manualgrad.rules()}:
        source = inspect.getsource(module)
        for banned in ("jax.vjp(", "jax.grad(", "jax.jvp(", "jax.linearize("):
            assert banned not in source, f"{module.__name__} calls {banned}"
