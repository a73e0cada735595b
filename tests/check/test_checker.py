"""The checker is itself tested: every planted mistake must be reported, with its rule and argument."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad.check import adjoint, checker, tolerances
from manualgrad.check.report import NOT_RUN
from mutations import MUTATIONS, mutant


def test_every_rule_has_a_mutation():
    assert {r.name for r in manualgrad.rules()} <= {m.rule for m in MUTATIONS}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: f"{m.rule}: {m.mistake}")
def test_checker_catches_mutation(mutation):
    wrong = mutant(mutation)
    report = manualgrad.check(wrong, checks=("vjp", "finite_diff", "adjoint"))
    failures = report.failures()
    assert failures, f"{mutation} went unnoticed"
    # Named with the rule and the right argument, by the reference and by finite differences,
    # and, for an argument the rule is linear in, by the dot-product test (no autodiff at all).
    assert all(f.rule == wrong.name for f in failures)
    linear = {wrong.argnames[i] for group in wrong.linear_in for i in group}
    assert {f.argument.split("[")[0] for f in failures if f.check != "adjoint"} == {mutation.argument}
    assert all(mutation.argument in f.argument.split(", ") for f in failures if f.check == "adjoint")
    assert {f.check for f in failures} == set(mutation.caught_by) | (
        {"adjoint"} if mutation.argument in linear else set()
    )
    assert "differ beyond" in failures[0].describe()
    # Diagnosed: every failing sample's comparison with the reference names the mistake.
    if mutation.diagnosis:
        diagnoses = [f.diagnosis for f in failures if f.check == "vjp"]
        assert diagnoses and all(mutation.diagnosis in d for d in diagnoses), diagnoses
        assert mutation.diagnosis in report.diagnoses()[0] and report.diagnoses()[0].startswith(
            f"{wrong.name}, argument "
        )


def test_failure_is_localised():
    wrong = mutant(next(m for m in MUTATIONS if m.mistake == "dx scaled by 2"))
    report = manualgrad.check(wrong, checks=("vjp",))
    f = report.failures()[0]
    assert f.argument == "x" and f.where.startswith("x[")
    assert np.isclose(f.received, 2 * f.expected)
    assert f.mismatches == f.size


def test_broken_rule_is_a_finding_not_a_crash():
    wrong = mutant(
        next(m for m in MUTATIONS if m.rule == "dense")._replace(vjp=lambda res, g: (g, g))
    )  # wrong shapes: JAX refuses them
    report = manualgrad.check(wrong, checks=("vjp",))
    assert not report.passed
    assert "not run: backward returned a cotangent of shape" in report.failures()[0].describe()


def test_every_check_counts_every_sample():
    # dw transposed: custom_vjp refuses it wherever w is not square ('width 1', 1 × 1, passes).
    def transposed(res, g):
        x, w = res
        lead = tuple(range(x.ndim - 1))
        return g @ w.T, jnp.tensordot(g, x, axes=(lead, lead))

    wrong = mutant(next(m for m in MUTATIONS if m.rule == "dense")._replace(vjp=transposed))
    report = manualgrad.check(wrong)
    samples = {f.sample for f in report.findings}
    assert len(samples) == 5
    for check in tolerances.CHECKS:
        mine = [f for f in report.findings if f.check == check]
        assert {f.sample for f in mine} == samples, check  # no sample dropped
        failed = {f.sample for f in mine if not f.passed}
        assert failed == (set() if check == "forward" else samples - {"width 1"}), check
        assert all(f.where == NOT_RUN for f in mine if not f.passed)


def test_user_function_built_from_rules():
    def layer(x, w, b):
        return manualgrad.sigmoid(manualgrad.bias_add(manualgrad.dense(x, w), b))

    def reference(x, w, b):
        return 1 / (1 + jnp.exp(-(x @ w + b[None, :])))

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    args = (jax.random.normal(k[0], (4, 3)), jax.random.normal(k[1], (3, 2)), jax.random.normal(k[2], (2,)))
    report = manualgrad.check(layer, reference=reference, args=args)
    assert report.passed, report.table()
    assert {f.argument for f in report.findings} >= {"x", "w", "b"}


def test_random_direction_mode_for_large_arguments():
    args = (jax.random.normal(jax.random.PRNGKey(1), (16, 40)), jax.random.normal(jax.random.PRNGKey(2), (40, 8)))
    report = manualgrad.check(manualgrad.dense, reference=lambda x, w: x @ w, args=args, checks=("finite_diff",))
    assert report.passed
    notes = {f.argument: f.note for f in report.findings}
    assert "random directions" in notes["x"] and "random directions" in notes["w"]

    wrong = mutant(next(m for m in MUTATIONS if m.mistake == "dx scaled by 2"))
    report = manualgrad.check(wrong.fn, reference=lambda x, w: x @ w, args=args, checks=("finite_diff",))
    assert [f.argument for f in report.failures()] == ["x"]


def test_kink_is_not_a_false_alarm():
    z = jnp.array([[-1.0, 0.0, 0.5], [0.0, 2.0, -3.0]])
    report = manualgrad.check(manualgrad.relu, reference=lambda z: jnp.where(z > 0, z, 0.0), args=(z,))
    assert report.passed
    fd = next(f for f in report.findings if f.check == "finite_diff")
    assert fd.note == "2 input entries at a kink left out"


def test_wrong_reference_fails_forward():
    report = manualgrad.check(manualgrad.tanh, reference=lambda z: z, args=(jnp.ones(3),), checks=("forward",))
    assert [f.check for f in report.failures()] == ["forward"]


def test_threads_and_fast_compile_change_no_verdict(monkeypatch):
    """Worker threads report exactly what the calling thread does; XLA's default build
    (instead of :data:`tolerances.FAST_COMPILE`) differs by round-off only."""
    if jax.default_backend() == "cpu":
        assert tolerances.fast_compile_options() == tolerances.FAST_COMPILE
    threaded = manualgrad.check("softmax_cross_entropy")
    monkeypatch.setattr(checker, "WORKERS", 1)
    assert manualgrad.check("softmax_cross_entropy").findings == threaded.findings
    monkeypatch.setattr(checker, "fast_compile_options", lambda: None)
    default_build = manualgrad.check("softmax_cross_entropy")
    assert default_build.passed and threaded.passed
    for fast, default in zip(threaded.findings, default_build.findings, strict=True):
        assert (fast.check, fast.sample, fast.argument) == (default.check, default.sample, default.argument)
        round_off = tolerances.FD_ATOL if fast.check == "finite_diff" else tolerances.ATOL["float64"]
        assert abs(fast.max_abs_error - default.max_abs_error) <= round_off


def test_each_sample_traces_the_hand_backward_once():
    """Building programs is the checker's cost, and every trace of the backward is built. Per
    sample of dense (two arguments, each a linear group), one trace of the VJP under
    ``jax.jit``, which ``vjp``, ``jit``, ``grad_of_grad`` and ``vmap``, the finite differences of
    both arguments and the adjoint test of each group call or transform. (Each check tracing
    its own: 8; with the eager ``vjp`` and each use in the program tracing the Python: 6.)"""
    rule = manualgrad.get("dense")
    calls = []

    def counted(residuals, g):
        calls.append(g.shape)
        return rule.fn.bwd(residuals, g)

    report = manualgrad.check(rule.with_backward(counted))
    assert report.passed
    assert len(calls) == len({f.sample for f in report.findings}) == 5


def test_report_splits_its_time_into_compile_and_run():
    report = manualgrad.check("identity", checks=("forward", "jit"))
    assert 0 < report.compile_seconds < report.seconds  # cold programs: compiling, then running them
    assert np.isclose(report.compile_seconds + report.run_seconds, report.seconds)
    assert report.timing() == (
        f"{report.seconds:.1f} s (compile {report.compile_seconds:.1f} s, run {report.run_seconds:.1f} s)"
    )


def test_bad_arguments_to_check():
    with pytest.raises(ValueError, match="dtype must be one of"):
        manualgrad.check("dense", dtype="float16")
    with pytest.raises(ValueError, match="unknown checks"):
        manualgrad.check("dense", checks=("jvp",))
    with pytest.raises(KeyError, match="no rule named 'densse'"):
        manualgrad.check("densse")
    with pytest.raises(TypeError, match="reference= and args="):
        manualgrad.check(lambda x: x)


def test_adjoint_mismatch_is_normalised_by_the_cauchy_schwarz_bound():
    u, y = [np.array([1.0, 2.0])], np.array([3.0, -1.0])
    out, back = np.array([1.0, 1.0]), [np.array([2.0, 0.5])]  # ⟨out, y⟩ = 2, ⟨u, back⟩ = 3
    lhs, rhs, mismatch = adjoint.adjoint_mismatch(u, y, out, back)
    assert (lhs, rhs) == (2.0, 3.0)
    assert np.isclose(mismatch, 1 / (np.sqrt(2) * np.sqrt(10) + np.sqrt(5) * np.sqrt(4.25)))


def test_adjoint_check_fails_a_wrong_transpose_and_names_the_group():
    wrong = mutant(next(m for m in MUTATIONS if m.mistake == "dz sign flipped"))  # bias_add, jointly linear in (z, b)
    report = manualgrad.check(wrong, checks=("adjoint",))
    failures = report.failures()
    assert failures and {f.argument for f in failures} == {"z, b"}
    assert "⟨C(u), y⟩ = " in failures[0].describe() and "Σ ⟨u, C†(y)⟩" in failures[0].describe()


def test_register_validates_linear_groups_and_the_result_marker():
    rule = manualgrad.get("dense")
    for groups in [((0,), (0, 1)), ((),), ((2,),)]:
        with pytest.raises(ValueError, match="linear_in"):
            manualgrad.register(dataclasses.replace(rule, name="dense2", linear_in=groups))
    undocumented = jax.custom_vjp(lambda x, w: x @ w)
    undocumented.__doc__ = "seed 004, seed 000, seed 001: a derivation without a marker"
    undocumented.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))
    with pytest.raises(ValueError, match="Result:"):
        manualgrad.register(dataclasses.replace(rule, name="dense3", fn=undocumented))
    assert "dense2" not in {r.name for r in manualgrad.rules()}


def test_registered_rules_keep_their_float64_checks_by_default():
    report = manualgrad.check("relu", checks=("vjp", "adjoint"))
    assert report.dtype == "float64" and report.notes == []
    assert all(f.dtype == "float64" and not f.golden and f.tolerance == 1e-12 for f in report.findings)
    assert not report.not_applicable()  # relu declares no linear argument: no adjoint finding, as before
