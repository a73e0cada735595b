"""The golden criterion's arithmetic: errors against the golden, the allowance, the upcast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manualgrad.check import golden
from manualgrad.check.errors import CheckError


def test_every_dtype_has_flash_attentions_factor_and_a_floor_of_two_ulps():
    assert set(golden.CRITERIA) == {"float64", "float32", "bfloat16", "float16"}
    for name, criterion in golden.CRITERIA.items():
        assert criterion.k == 2.0
        ulps = criterion.floor / float(np.finfo(jnp.dtype(name)).eps)
        # float64's golden is the reference itself: its floor is the checker's float64 tolerance.
        assert ulps == 2 or (name == "float64" and criterion.floor == 1e-12), (name, ulps)


def test_max_error_is_the_worst_entry_of_the_floating_leaves():
    received = {"a": np.array([1.0, 2.0]), "b": np.array([3.0], np.float32), "i": np.array([7])}
    expected = {"a": np.array([1.0, 2.5]), "b": np.array([2.0]), "i": np.array([0])}
    assert golden.max_error(received, expected) == 1.0  # b's 1.0, not the integer leaf's 7
    assert golden.max_error(np.array([np.nan]), np.array([0.0])) == np.inf
    assert golden.scale_of(expected) == 2.5


def test_judge_allows_k_times_the_references_error_plus_the_floor():
    eps = float(np.finfo(np.float32).eps)
    passed, allowed = golden.judge(2.9e-6, 1e-6, "float32", 10.0)
    assert allowed == pytest.approx(2e-6 + 2 * eps * 10.0) and passed  # 2e-6 + 2.4e-6
    assert not golden.judge(4.5e-6, 1e-6, jnp.float32, 10.0)[0]
    # A golden with an error e of its own widens the allowance by (k + 1) e.
    assert golden.judge(0.0, 1e-6, "float32", 10.0, golden_error=1e-7)[1] == pytest.approx(allowed + 3e-7)
    assert not golden.judge(np.inf, 1.0, "bfloat16", 1.0)[0]
    assert not golden.judge(np.nan, 1.0, "bfloat16", 1.0)[0]
    with pytest.raises(CheckError, match="no golden criterion for dtype int32"):
        golden.judge(0.0, 0.0, "int32", 1.0)


def test_upcast_needs_64_bit_mode_and_leaves_integers_alone():
    tree = (jnp.ones(2, jnp.bfloat16), jnp.arange(3))
    with jax.enable_x64(True):
        up = golden.upcast(tree)
    assert up[0].dtype == jnp.float64 and up[1].dtype == tree[1].dtype
    with jax.enable_x64(False), pytest.raises(CheckError, match="64-bit mode"):
        golden.upcast(tree)
