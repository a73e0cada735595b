"""Diagnoses: a planted mistake of each kind is named; a random error is not explained.

The planted mutations of ``mutations.py`` carry the phrase their diagnosis must contain
(checked in ``test_checker.py``); here are the kinds no mutation there produces (``σ'``
written for the output but fed the input, a broadcast axis not summed) and random errors.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad import activations, diagnose, linear
from manualgrad.registry import Sample


def _planted(name, fwd, bwd, samples=None):
    rule = manualgrad.get(name)
    @functools.wraps(rule.fn.fun)  # keeps the argument names
    def fn(*args):
        return rule.fn(*args)

    wrong = jax.custom_vjp(fn, nondiff_argnums=rule.fn.nondiff_argnums)
    wrong.defvjp(fwd, bwd)
    changes = {"fn": wrong, "name": f"{name} (planted)"}
    if samples is not None:
        changes["sample_inputs"] = lambda key, dtype: samples
    return dataclasses.replace(rule, **changes)


def test_sigma_prime_written_for_the_output_but_taken_at_the_input():
    # The student saved z and applied Remark 8's F(1 − F) to it: g z (1 − z).
    z = jnp.linspace(-0.4, 1.3, 12).reshape(3, 4) + 0.01
    planted = _planted("sigmoid", lambda z: (activations.sigmoid(z), z), lambda z, g: (g * z * (1 - z),),
                       [Sample((z,), "z in (0, 1) and beyond")])
    [failure] = manualgrad.check(planted, checks=("vjp",)).failures()
    assert "σ' written in terms of the output F but taken at the input z" in failure.diagnosis


def test_broadcast_axis_not_summed_is_found_in_the_raw_backward():
    planted = _planted("bias_add", linear.bias_add_forward, lambda res, g: (g, g))  # db = G: the batch left in
    report = manualgrad.check(planted, checks=("vjp",))
    failures = report.failures()
    assert failures and {f.argument for f in failures} == {"b"}
    by_sample = {f.sample: f.diagnosis for f in failures}
    assert "axis 0 not summed: a broadcast axis left in (shape (4, 3), expected (3,))" in by_sample["batch 4"]
    assert "axis (0, 1, 2) not summed" in by_sample["NHWC, per channel"]
    assert "raised" in failures[0].describe() and "not summed" in failures[0].describe()


def _noise(c):
    """A deterministic perturbation with no structure: no transpose, factor or shift of anything."""
    flat = jnp.sin(7.3 * jnp.arange(np.size(c)) + 0.4).reshape(jnp.shape(c))
    return c + 1e-3 * (1 + jnp.abs(c)) * flat.astype(c.dtype)


@pytest.mark.parametrize("name", ["dense", "sigmoid", "mse", "correlate1d", "conv2d", "avg_pool2d", "batch_norm", "group_norm"])
def test_no_diagnosis_is_invented_for_a_random_error(name):
    rule = manualgrad.get(name)

    def bwd(*args):
        return tuple(_noise(c) for c in rule.fn.bwd(*args))

    report = manualgrad.check(_planted(name, rule.fn.fwd, bwd), checks=("vjp",))
    failures = report.failures()
    assert failures and all(f.diagnosis == diagnose.NO_EXPLANATION for f in failures), \
        [f.diagnosis for f in failures if f.diagnosis != diagnose.NO_EXPLANATION]


def test_a_fitted_constant_is_named_and_a_right_answer_is_not_diagnosed():
    rule = manualgrad.get("dense")
    x, w = jnp.ones((4, 3)), jnp.arange(15.0).reshape(3, 5)
    g = jnp.cos(jnp.arange(20.0)).reshape(4, 5)
    right = g @ w.T
    assert diagnose.diagnose(rule, (x, w), 0, 1.7 * right, g, "float64") == \
        "your gradient equals 1.7 × the right one: off by a constant factor"
    assert diagnose.diagnose(rule, (x, w), 0, right + 1e-3, g, "float64") == diagnose.NO_EXPLANATION
