"""The checker on a user's own network: no false alarm at kinks, the user's settings for the user's code."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import manualgrad as mg
from manualgrad.check import finite_differences as fd
from manualgrad.check.tolerances import TOLERANCES
from mutations import MUTATIONS, mutant


def _net(tanh=mg.tanh, sigmoid=mg.sigmoid):
    """conv2d → relu → max_pool2d → flatten → dense → tanh → dense → sigmoid → mse + l2_penalty."""

    def net(p, x, t):
        h = mg.relu(mg.bias_add(mg.conv2d(x, p["cw"]), p["cb"]))
        h = mg.flatten(mg.max_pool2d(h, 2))
        h = tanh(mg.bias_add(mg.dense(h, p["w1"]), p["b1"]))
        y = sigmoid(mg.bias_add(mg.dense(h, p["w2"]), p["b2"]))
        return mg.mse(y, t) + mg.l2_penalty(p, 1e-3)

    return net


def _reference(p, x, t):
    """The same network in plain jnp, with NumPy's broadcasting (``h + p["cb"]`` promotes ranks)."""
    h = lax.conv_general_dilated(x, p["cw"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.maximum(h + p["cb"], 0)
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jnp.tanh(h.reshape(h.shape[0], -1) @ p["w1"] + p["b1"])
    y = jax.nn.sigmoid(h @ p["w2"] + p["b2"])
    return jnp.mean(jnp.sum((y - t) ** 2, axis=1)) / 2 + 1e-3 / 2 * sum(
        jnp.sum(w**2) for w in jax.tree_util.tree_leaves(p)
    )


def _args(seed, batch=16, side=14, channels=8):
    """18432 ReLUs and 4608 pooling windows: before the Richardson kink test, 5 of seeds 0–9
    failed ``finite_diff`` on this network (relative error up to 2e-2)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 7)
    features = ((side - 2) // 2) ** 2 * channels
    p = {
        "cw": 0.5 * jax.random.normal(k[0], (3, 3, 1, channels)),
        "cb": 0.1 * jax.random.normal(k[1], (channels,)),
        "w1": jax.random.normal(k[2], (features, 16)) / features**0.5,
        "b1": 0.1 * jax.random.normal(k[3], (16,)),
        "w2": 0.3 * jax.random.normal(k[4], (16, 3)),
        "b2": 0.1 * jax.random.normal(k[5], (3,)),
    }
    return p, jax.random.normal(k[6], (batch, side, side, 1)), jax.random.uniform(k[6], (batch, 3))


def _check_net(net, seed, **kwargs):
    with jax.numpy_rank_promotion("allow"):  # the user's setting, not the test suite's
        return mg.check(net, reference=_reference, args=_args(seed), argnums=(0, 1), seed=seed, **kwargs)


def test_correct_network_passes_finite_differences_for_every_seed():
    for seed in range(10):
        report = _check_net(_net(), seed, checks=("finite_diff",))
        assert report.passed, (seed, [f.describe() for f in report.failures()])
        assert {f.argument for f in report.findings} == {"p", "x"}
        assert all(f.size + _left_out(f) == fd.FAST_DIRECTIONS for f in report.findings)
        # Round-off only (about ε·|loss|/h = 2e-12): no truncation error, no kink.
        assert max(f.max_abs_error for f in report.findings) < 1e-10


def _left_out(finding) -> int:
    return int(finding.note.split(", ")[1].split()[0]) if "crossing a kink" in finding.note else 0


def _near_kink(random_directions: bool):
    """ReLU inputs with one entry just short of the kink: 0.9999 h from it (exact Jacobian), or
    1e-6 from it among 100 entries, where (seed 0) one random direction crosses the kink near
    its edge, which the earlier filter missed (relative error 8e-3), and one squarely."""
    if random_directions:
        x = np.linspace(-1, 1, 100) + 0.005
        x[0] = 1e-6
        return jnp.asarray(x)
    return jnp.array([[-1.0, 0.5, -(1 - 1e-4) * fd.FD_STEP], [2.0, -0.3, 0.7]])


@pytest.mark.parametrize("random_directions", [False, True], ids=["exact Jacobian", "random directions"])
def test_differences_straddling_a_kink_are_left_out_and_counted(random_directions):
    z = _near_kink(random_directions)
    report = mg.check(mg.relu, reference=jax.nn.relu, args=(z,), checks=("finite_diff",))
    assert report.passed, report.failures()[0].describe()
    finding = report.findings[0]
    if random_directions:
        assert finding.note.endswith("1 crossing a kink left out") and finding.size == 2
    else:
        assert finding.note == "1 input entries at a kink left out" and finding.size == 6 * 5
    wrong = mutant(next(m for m in MUTATIONS if m.mistake == "mask taken from the cotangent"))
    assert not mg.check(wrong.fn, reference=jax.nn.relu, args=(z,), checks=("finite_diff",)).passed


@pytest.mark.parametrize("slope_jump", [1.0, -0.5, 1e-3])
def test_richardson_flags_every_kink_that_would_matter(slope_jump):
    """g(t) = sin(t) + Δ·max(t − a, 0) sampled as the checker does, for kinks a from −2.5h to
    2.5h: each kink within 2h is flagged or moves the estimate by less than the allowance."""
    h, tol = fd.FD_STEP, TOLERANCES["float64"]["finite_diff"]
    a = np.linspace(-2.5 * h, 2.5 * h, 2001)[:, None]

    def g(t):
        return np.sin(t + 0.3) + slope_jump * np.maximum(t - a, 0.0)

    steps = np.stack([g(s * h)[:, 0] for s in fd.FD_STEPS])
    estimate, kinks, atol = fd.richardson(steps, g(0.0)[:, 0], np.ones(len(a)), tol)
    right = np.cos(0.3) + slope_jump * (a[:, 0] < 0)
    error = np.abs(estimate - right)
    assert np.all(error[~kinks] <= np.maximum(tol * np.abs(right[~kinks]), atol[~kinks]))
    assert kinks[np.abs(a[:, 0]) <= h].all()  # every kink within one step is seen
    assert not kinks[np.abs(a[:, 0]) > 2 * h].any()  # beyond two steps g is smooth: nothing is left out
    smooth = [np.exp(s * h) for s in fd.FD_STEPS]
    assert not fd.richardson(np.array(smooth), 1.0, 3.0, tol)[1]


@pytest.mark.parametrize("mistake", ["tanh: σ' = 1 − F instead of 1 − F²", "sigmoid: σ' scaled by 1 + 1e-4"])
def test_wrong_rule_in_the_network_is_still_caught(mistake):
    if mistake.startswith("tanh"):
        tanh = mutant(next(m for m in MUTATIONS if m.rule == "tanh")).fn
        net = _net(tanh=tanh)
    else:
        sigmoid = jax.custom_vjp(lambda z: mg.sigmoid(z))
        sigmoid.defvjp(lambda z: (mg.sigmoid(z), mg.sigmoid(z)), lambda f, g: (g * f * (1 - f) * (1 + 1e-4),))
        net = _net(sigmoid=sigmoid)
    report = _check_net(net, 0, checks=("finite_diff",))
    # Both p (every layer below the wrong one) and x are differentiated through it.
    assert {f.argument for f in report.failures()} == {"p", "x"}
    assert all(f.max_rel_error > 1e-5 for f in report.failures())


def test_reference_runs_under_the_users_rank_promotion():
    report = _check_net(_net(), 0, checks=("forward", "vjp"))
    assert report.passed, [f.describe() for f in report.failures()]
    # The hand rules stay guarded: a rule that broadcasts silently still fails.
    broadcasting = jax.custom_vjp(lambda z, b: mg.bias_add(z, b))
    broadcasting.defvjp(lambda z, b: (mg.bias_add(z, b), b), lambda b, g: (g + b, jnp.sum(g, axis=0)))
    with jax.numpy_rank_promotion("allow"):
        report = mg.check(
            broadcasting, reference=lambda z, b: z + b, args=(jnp.ones((3, 2)), jnp.ones(2)), checks=("vjp",)
        )
    assert not report.passed and "jax_numpy_rank_promotion='raise'" in report.failures()[0].describe()


def test_a_failing_reference_is_named_as_the_reference():
    with jax.numpy_rank_promotion("raise"):
        report = mg.check(_net(), reference=_reference, args=_args(0), argnums=(0,), checks=("forward", "vjp"))
    assert [f.check for f in report.failures()] == ["forward", "vjp"]
    text = report.failures()[0].describe()
    assert "the reference _reference raised ValueError: Operands could not be broadcast" in text, text


def test_float32_check_of_a_network_with_python_scalars():
    report = _check_net(_net(), 0, dtype="float32", checks=("forward", "vjp", "jit"))
    assert report.passed, [f.describe() for f in report.failures()]
    # Really run in float32: its round-off (about 1e-8 here), far above float64's.
    assert max(f.max_abs_error for f in report.findings if f.check == "vjp") > 1e-10
    p = _args(0)[0]
    p32 = jax.tree_util.tree_map(lambda w: w.astype(jnp.float32), p)
    assert mg.l2_penalty(p32, 1e-3).dtype == jnp.float32  # a weak Python scalar follows the arrays
    assert mg.l2_penalty(p32, jnp.float64(1e-3)).dtype == jnp.float64  # a float64 array promotes, as in jnp
    np.testing.assert_allclose(mg.l2_penalty(p, 1e-3), 1e-3 / 2 * sum(np.sum(np.square(w)) for w in p.values()))


def test_check_json_into_a_closed_pipe_exits_without_a_traceback():
    """`manualgrad check --json | head -1`: the reader is gone before the first line is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "manualgrad", "check", "identity", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 141, stderr
    assert stderr == ""


_KERNEL_FILE = """
import jax
import jax.numpy as jnp


@jax.custom_vjp
def softplus(z):
    return jnp.logaddexp(z, 0.0)


softplus.defvjp(lambda z: (softplus(z), z), lambda z, g: (g * jax.nn.sigmoid(z) * FACTOR,))
FACTOR = 1.0


def reference(z):
    return jnp.log1p(jnp.exp(z))


def arguments():
    return (jnp.linspace(-3, 3, 24, dtype=jnp.float32).reshape(4, 6),)


def not_a_tuple():
    return 3
"""


def _kernel_file(tmp_path, factor=1.0):
    path = tmp_path / "kernel.py"
    path.write_text(_KERNEL_FILE.replace("FACTOR = 1.0", f"FACTOR = {factor}"))
    return str(path)


def _run_check(capsys, *argv):
    from manualgrad import cli

    code = cli.main(["check", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_command_judges_a_function_in_its_own_dtype_against_the_golden(tmp_path, capsys):
    path = _kernel_file(tmp_path)
    given = [f"{path}:softplus", "--reference", f"{path}:reference", "--args", f"{path}:arguments"]
    code, out, _ = _run_check(capsys, *given)
    assert code == 0, out
    lines = out.splitlines()
    assert "dtype float32" in lines[0]
    assert lines[1].split() == ["check", "argument", "dtype", "err_fn", "err_ref", "ratio", "allowed"]
    # forward, vjp, jit, vmap, grad_of_grad (the hand backward is jnp: JAX differentiates it) and
    # finite_diff (coarse, in float32) pass; adjoint (nothing declared linear) cannot apply.
    assert lines[-1].startswith("6 passed, 0 failed, 1 not applicable in ")
    assert [line.split(",")[0] for line in lines if line.startswith("N/A ")] == ["N/A softplus"]

    code, out, _ = _run_check(capsys, *given, "--json")
    records = {r["check"]: r for r in map(json.loads, out.splitlines())}
    assert code == 0 and records["adjoint"]["status"] == "not applicable"
    (z,) = records["vjp"]["arguments"]
    assert z["argument"] == "z" and z["status"] == "passed"
    assert 0 < z["err_fn"] < 1e-6 and z["err_ref"] > 0 and z["ratio"] == pytest.approx(z["err_fn"] / z["err_ref"])


def test_check_command_fails_a_wrong_function_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    path = _kernel_file(tmp_path, factor=1.01)
    target = [f"{path}:softplus", "--reference", f"{path}:reference"]
    code, out, _ = _run_check(capsys, *target, "--args", f"{path}:arguments")
    assert code == 1 and "FAIL softplus, argument z, sample 'given', vjp (float32)" in out, out
    assert "DIAGNOSIS softplus, argument z: your gradient equals 1.01 × the right one" in out
    for argv, message in [
        (target, "needs --reference FILE.py:REFERENCE and --args FILE.py:ARGUMENTS"),
        ([*target, "--args", f"{path}:nope"], "defines no function nope returning the arguments of"),
        ([*target, "--args", f"{path}:not_a_tuple"], "not_a_tuple(): TypeError: it returned int, not a tuple"),
        ([f"{tmp_path}/missing.py:f", "--reference", "r.py:r", "--args", "a.py:a"], "no file"),
        (["relu", "--reference", f"{path}:reference"], "--reference and --args go with a FILE.py:FUNCTION"),
    ]:
        code, out, err = _run_check(capsys, *argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err


def _sine(backward_on_host: bool):
    """sin with a hand backward that JAX cannot differentiate (it computes cos(x) · g on the host,
    through a callback) or that raises."""

    @jax.custom_vjp
    def sine(x):
        return jnp.sin(x)

    def bwd(x, g):
        if not backward_on_host:
            raise ZeroDivisionError("a broken backward")
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return (jax.pure_callback(lambda x, g: np.cos(x) * g, shape, x, g, vmap_method="sequential"),)

    sine.defvjp(lambda x: (jnp.sin(x), x), bwd)
    return sine


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_second_order_jax_cannot_take_is_not_applicable_and_a_raising_backward_fails(dtype):
    x = jnp.linspace(-1.0, 1.0, 5)
    report = mg.check(_sine(True), reference=jnp.sin, args=(x,), dtype=dtype)
    assert report.passed, report.table()
    na = {f.check: f.note for f in report.not_applicable()}
    assert set(na) == {"grad_of_grad", "adjoint"}
    assert na["grad_of_grad"].startswith("JAX cannot differentiate sine's backward (")
    counts = report.counts()
    assert counts["failed"] == 0 and counts["not applicable"] == 2 and counts["passed"] == 5
    assert report.summary().startswith("5 passed, 0 failed, 2 not applicable in ")
    record = next(r for r in report.records() if r["check"] == "grad_of_grad")
    assert record["status"] == "not applicable" and not record["passed"] and record["max_rel_error"] is None

    broken = mg.check(_sine(False), reference=jnp.sin, args=(x,), dtype=dtype)
    assert {f.check for f in broken.failures()} == {"vjp", "jit", "vmap", "grad_of_grad", "finite_diff"}
    assert "a broken backward" in broken.failures()[0].describe()
    assert not broken.passed and [f.check for f in broken.not_applicable()] == ["adjoint"]
