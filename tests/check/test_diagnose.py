"""Diagnoses: a planted mistake of each kind is named; a random error is not explained.

The planted mutations of ``tests/mutations/`` carry the phrase their diagnosis must contain
(checked in ``test_checker.py``); here are the kinds no mutation there produces (``σ'``
written for the output but fed the input, a broadcast axis not summed) and random errors.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad.check import diagnose
from manualgrad.registry import Sample
from manualgrad.rules import activations, linear


def _planted(name, fwd, bwd, samples=None):
    planted = manualgrad.get(name).with_backward(bwd, fwd, name=f"{name} (planted)")
    return planted if samples is None else dataclasses.replace(planted, sample_inputs=lambda key, dtype: samples)


def test_sigma_prime_written_for_the_output_but_taken_at_the_input():
    # The student saved z and applied Remark 8's F(1 − F) to it: g z (1 − z).
    z = jnp.linspace(-0.4, 1.3, 12).reshape(3, 4) + 0.01
    planted = _planted(
        "sigmoid",
        lambda z: (activations.sigmoid(z), z),
        lambda z, g: (g * z * (1 - z),),
        [Sample((z,), "z in (0, 1) and beyond")],
    )
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
    assert "not run: backward returned a cotangent of shape (4, 3) for b, of shape (3,)" in failures[0].describe()
    assert "not summed" in failures[0].describe()


def _conv2d_dw_channels_first(*args):
    dx, dw = manualgrad.get("conv2d").fn.bwd(*args)
    return dx, jnp.moveaxis(dw, -1, 0)


@pytest.mark.parametrize(
    "name, bwd, sample, diagnosis",
    [
        # dw as (out, in), the right one transposed.
        ("dense", lambda res, g: (g @ res[1].T, g.T @ res[0]), "batch 4", "the right one transposed"),
        # dx of flatten reshaped to (N, C, H, W): the axes of the reshape in the wrong order.
        (
            "flatten",
            lambda empty, g: (jnp.reshape(g, (g.shape[0], empty.shape[3], *empty.shape[1:3])),),
            "NHWC",
            "the right one reshaped to (2, 2, 3, 4) instead of (2, 3, 4, 2): "
            "a reshape with its axes in the wrong order",
        ),
        # dW of conv2d as (C_out, KH, KW, C_in): its axes permuted.
        (
            "conv2d",
            _conv2d_dw_channels_first,
            "non-square image and kernel, C_in ≠ C_out",
            "the right one with its axes in the wrong order: transpose it by (1, 2, 3, 0)",
        ),
    ],
)
def test_a_wrong_shape_cotangent_is_diagnosed_from_the_raw_backward(name, bwd, sample, diagnosis):
    rule = manualgrad.get(name)
    samples = [s for s in rule.sample_inputs(jax.random.PRNGKey(0), jnp.float64) if s.label == sample]
    report = manualgrad.check(_planted(name, rule.fn.fwd, bwd, samples or None), checks=("vjp",))
    failures = report.failures()
    assert failures and all(diagnosis in f.diagnosis for f in failures), [f.diagnosis for f in failures]


def _noise(c):
    """A deterministic perturbation with no structure: no transpose, factor or shift of anything."""
    flat = jnp.sin(7.3 * jnp.arange(np.size(c)) + 0.4).reshape(jnp.shape(c))
    return c + 1e-3 * (1 + jnp.abs(c)) * flat.astype(c.dtype)


@pytest.mark.parametrize(
    "name", ["dense", "sigmoid", "mse", "correlate1d", "conv2d", "avg_pool2d", "batch_norm", "group_norm"]
)
def test_no_diagnosis_is_invented_for_a_random_error(name):
    rule = manualgrad.get(name)

    def bwd(*args):
        return tuple(_noise(c) for c in rule.fn.bwd(*args))

    report = manualgrad.check(_planted(name, rule.fn.fwd, bwd), checks=("vjp",))
    failures = report.failures()
    assert failures and all(f.diagnosis == diagnose.NO_EXPLANATION for f in failures), [
        f.diagnosis for f in failures if f.diagnosis != diagnose.NO_EXPLANATION
    ]


def test_a_fitted_constant_is_named_and_a_right_answer_is_not_diagnosed():
    rule = manualgrad.get("dense")
    x, w = jnp.ones((4, 3)), jnp.arange(15.0).reshape(3, 5)
    g = jnp.cos(jnp.arange(20.0)).reshape(4, 5)
    right = g @ w.T
    assert (
        diagnose.diagnose(rule, (x, w), 0, 1.7 * right, g, "float64")
        == "your gradient equals 1.7 × the right one: off by a constant factor"
    )
    assert diagnose.diagnose(rule, (x, w), 0, right + 1e-3, g, "float64") == diagnose.NO_EXPLANATION


def test_with_backward_replaces_the_backward_only():
    """``Rule.with_backward``: same output, signature and registry entry; the new VJP."""
    rule = manualgrad.get("dense")
    doubled = rule.with_backward(lambda res, g: tuple(2 * c for c in rule.fn.bwd(res, g)), name="dense (doubled)")
    x, w = jnp.arange(6.0).reshape(2, 3), jnp.arange(12.0).reshape(3, 4) / 7
    assert (doubled.name, doubled.argnames, doubled.seeds) == ("dense (doubled)", rule.argnames, rule.seeds)
    np.testing.assert_array_equal(doubled.fn(x, w), rule.fn(x, w))
    right = jax.grad(lambda x, w: jnp.sum(rule.fn(x, w) ** 2), argnums=(0, 1))(x, w)
    wrong = jax.grad(lambda x, w: jnp.sum(doubled.fn(x, w) ** 2), argnums=(0, 1))(x, w)
    for r, d in zip(right, wrong, strict=True):
        np.testing.assert_allclose(d, 2 * r, rtol=1e-6)
