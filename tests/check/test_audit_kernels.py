"""The audit on real kernels: JAX's Pallas GPU ``layer_norm`` in interpret mode (on the CPU), given its
own ``layer_norm_reference`` or not, copies of it whose backward carries one planted mistake, and
``jax.experimental.ode.odeint``'s adjoint.

``python tests/check/test_audit_kernels.py`` prints, per kernel and way of judging it, the verdict,
the errors, their ratio (or the coarse differences' step and allowance) and the seconds.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad.check import audit_calls, coarse
from manualgrad.check.errors import CheckError

SHAPE = (2, 4, 8)  # (batch, rows, features): the kernel normalises the last axis, one program per row


def _pallas_layer_norm():
    """The module, or a skip where Pallas' interpret mode cannot run here."""
    module = pytest.importorskip("jax.experimental.pallas.ops.gpu.layer_norm", reason="no Pallas in this jax")
    try:
        module.layer_norm(jnp.ones((1, 1, 8), jnp.float32), jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32),
                          None, 3, 1e-5, "triton", True)  # fmt: skip
    except Exception as error:  # an interpreter this jax cannot run: nothing to audit
        pytest.skip(f"Pallas' interpret mode cannot run here: {type(error).__name__}: {error}")
    return module


def _inputs(dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE)
    w, b = 1 + 0.1 * rng.standard_normal(SHAPE[-1]), 0.1 * rng.standard_normal(SHAPE[-1])
    return tuple(jnp.asarray(a, dtype) for a in (x, w, b))


def _loss(kernel):
    """A float loss around the kernel (interpret mode: ``layer_norm``'s static arguments 3 to 7)."""

    def loss(x, w, b):
        return jnp.sum(jnp.tanh(kernel(x, w, b, None, 3, 1e-5, "triton", True)))

    return loss


def _dropped(res, do, dx, dw, db):
    """dx without its ``x̂ · mean(x̂ ⊙ w ⊙ dy)`` term (the centring of the normalised input's part)."""
    x, w, _, mean, rstd = res
    x_hat = (x - mean[..., None]) * rstd[..., None]
    mean1 = jnp.mean(x_hat * w[None, None] * do, axis=-1, keepdims=True)
    return dx + x_hat * mean1 * rstd[..., None], dw, db


# One planted mistake each, and the argument whose cotangent it spoils.
MISTAKES = {
    "dx scaled by 1.01": (lambda res, do, dx, dw, db: (dx * 1.01, dw, db), "x"),
    "dw scaled by 1.01": (lambda res, do, dx, dw, db: (dx, dw * 1.01, db), "weight"),
    "db scaled by 1.01": (lambda res, do, dx, dw, db: (dx, dw, db * 1.01), "bias"),
    "dx's first row zeroed": (lambda res, do, dx, dw, db: (dx.at[0, 0].set(0), dw, db), "x"),
    "dx's centring term dropped": (_dropped, "x"),
}


def _planted(module, mistake: str):
    """A copy of Pallas' ``layer_norm`` (its kernels, forward and all) whose backward carries ``mistake``."""
    return _copy(module.layer_norm, MISTAKES[mistake][0])


def _copy(kernel, change):
    """A copy of the custom_vjp ``kernel`` whose backward's cotangents are ``change(res, g, *cotangents)``."""
    copy = jax.custom_vjp(kernel.fun, nondiff_argnums=kernel.nondiff_argnums)

    def backward(*static_res_g):
        *_, res, g = static_res_g
        return change(res, g, *kernel.bwd(*static_res_g))

    copy.defvjp(kernel.fwd, backward)
    return copy


def test_float32_layer_norm_given_its_reference_passes_by_the_golden_criterion():
    m = _pallas_layer_norm()
    report = mg.audit(_loss(m.layer_norm), *_inputs(jnp.float32), references={m.layer_norm: m.layer_norm_reference})
    assert report.passed, report.text()
    (site,) = report.sites
    assert site.judged == "reference (golden)" and site.name == "layer_norm"
    assert [(f.check, f.argument, f.dtype) for f in report.findings] == [
        ("forward", "(output)", "float32"),
        *(("vjp", name, "float32") for name in ("x", "weight", "bias")),
    ]
    # The kernel and the reference both round in float32: their errors against the float64 golden are
    # a few ulps of values of order one, and the kernel's within FlashAttention's factor 2 of the reference's.
    for f in report.findings:
        assert 0 < f.max_abs_error < 1e-5 and 0 < f.err_ref < 1e-5 and f.max_abs_error <= 2 * f.err_ref + f.allowed
    assert "judged against" in report.text() and "err_ref" in report.text()


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_planted_mistake_fails_by_the_golden_criterion_naming_its_argument(mistake):
    m = _pallas_layer_norm()
    planted = _planted(m, mistake)
    report = mg.audit(_loss(planted), *_inputs(jnp.float32), references={planted: m.layer_norm_reference})
    assert [(f.check, f.argument) for f in report.failures()] == [("vjp", MISTAKES[mistake][1])], report.text()
    (failure,) = report.failures()
    # A mistake of 1 % of values of order one is thousands of float32 ulps: far beyond twice the reference's error.
    assert failure.ratio > 100 and report.first_failure().name == "layer_norm"
    assert "the gradient first goes wrong at layer_norm" in report.text()
    if "1.01" in mistake:
        assert "1.01 × the right one" in failure.diagnosis


def test_without_a_reference_float32_is_judged_by_coarse_finite_differences():
    m = _pallas_layer_norm()
    args = _inputs(jnp.float32)
    right = mg.audit(_loss(m.layer_norm), *args)
    assert right.passed, right.text()
    assert right.sites[0].judged == "coarse finite differences" and "coarse finite differences" in right.text()
    assert {f.check for f in right.findings} == {"finite_diff"}
    for f in right.findings:
        assert f.note.startswith("coarse finite differences in float32") and f.size == coarse.DIRECTIONS
        # The differences resolve a small share of each derivative: a 1 % mistake is far outside.
        assert f.tolerance < 1e-2 and f.error_over_allowed < 1
    wrong = mg.audit(_loss(_planted(m, "dw scaled by 1.01")), *args)
    assert [f.argument for f in wrong.failures()] == ["weight"], wrong.text()


def test_float64_arguments_of_a_kernel_computing_in_float32_are_judged_by_float32s_criterion():
    m = _pallas_layer_norm()
    args = _inputs(jnp.float64)
    report = mg.audit(_loss(m.layer_norm), *args, references={"layer_norm": m.layer_norm_reference})
    assert report.passed, report.text()
    assert all(f.note.startswith(audit_calls.FLOAT32_INSIDE) and f.dtype == "float32" for f in report.findings)
    assert "computes in float32 inside" in report.text()
    planted = _planted(m, "db scaled by 1.01")
    wrong = mg.audit(_loss(planted), *args, references={planted: m.layer_norm_reference})
    assert [f.argument for f in wrong.failures()] == ["bias"], wrong.text()


def test_the_call_runs_in_the_callers_64_bit_setting_and_only_the_golden_in_64_bit_mode():
    """A kernel traced under 64-bit mode would see int64 index arithmetic (Pallas' ``mha`` breaks):
    the audit of float32 arguments leaves the caller's setting around it."""
    seen = {"kernel": set(), "reference": set()}

    @jax.custom_vjp
    def kernel(x):
        seen["kernel"].add(jax.config.jax_enable_x64)
        return jnp.sin(x)

    def backward(x, g):
        seen["kernel"].add(jax.config.jax_enable_x64)
        return (g * jnp.cos(x),)

    kernel.defvjp(lambda x: (kernel(x), x), backward)

    def reference(x):
        seen["reference"].add(jax.config.jax_enable_x64)
        return jnp.sin(x)

    with jax.enable_x64(False):
        report = mg.audit(lambda x: jnp.sum(kernel(x)), jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32),
                          references={kernel: reference})  # fmt: skip
    assert report.passed, report.text()
    assert seen == {"kernel": {False}, "reference": {False, True}}


def _mha():
    """Pallas' causal ``mha`` (T = 32: two blocks of 16, the causal mask crossing their boundary):
    the loss around a kernel of its signature, its reference, and ``(q, k, v)`` in float32."""
    attention = pytest.importorskip("jax.experimental.pallas.ops.gpu.attention", reason="no Pallas in this jax")
    _pallas_layer_norm()
    blocks = attention.BlockSizes(**dict.fromkeys(attention.BlockSizes.__dataclass_fields__, 16))
    reference = functools.partial(attention.mha_reference, segment_ids=None, sm_scale=0.25, causal=True)

    def loss_of(kernel):
        def loss(q, k, v):
            return jnp.sum(jnp.tanh(kernel(q, k, v, None, 0.25, True, blocks, interpret=True)))

        return loss

    keys = jax.random.split(jax.random.key(0), 3)
    return attention, loss_of, reference, [jax.random.normal(key, (1, 32, 2, 16), jnp.float32) for key in keys]


def test_pallas_mha_audited_in_the_callers_32_bit_mode_against_its_float32_pinned_reference():
    """Pallas' causal ``mha`` breaks in 64-bit mode (its index arithmetic is int32) and its
    ``mha_reference`` pins its einsums to float32: the audit runs the kernel as the caller does,
    finds the reference's rounding and allows for it; ``dk`` off by 1 % still fails, named."""
    attention, loss_of, reference, args = _mha()
    with jax.enable_x64(False):
        right = mg.audit(loss_of(attention.mha), *args, references={attention.mha: reference})
        planted = _copy(attention.mha, lambda res, g, dq, dk, dv, *rest: (dq, dk * 1.01, dv, *rest))
        wrong = mg.audit(loss_of(planted), *args, references={planted: reference})
    assert right.passed, right.text()
    assert all("the reference does not resolve float64" in f.note for f in right.findings)
    # The findings: the output, then q, k and v (by position where the source's names cannot be matched).
    assert [f.argument for f in wrong.failures()] == [right.findings[2].argument], wrong.text()


def test_a_reference_computing_in_float32_inside_is_said_and_its_rounding_allowed():
    """Pallas' ``mha_reference`` pins float32 inside: its float64 "golden" is float32's. The audit
    measures that rounding, says so, and widens each allowance by it; a 1 % mistake still fails."""

    def pinned(x):  # a result rounded to float32 inside (preferred_element_type=jnp.float32) beside float64 arithmetic
        return jnp.sin(x).astype(jnp.float32).astype(x.dtype) + x / 2

    def kernel_of(factor):
        @jax.custom_vjp
        def kernel(x):
            return jnp.sin(x) + x / 2

        kernel.defvjp(lambda x: (kernel(x), x), lambda x, g: (factor * g * (jnp.cos(x) + 0.5),))
        return kernel

    x = jnp.linspace(-2.0, 2.0, 12, dtype=jnp.float32)
    right, wrong = kernel_of(1.0), kernel_of(1.01)
    report = mg.audit(lambda x: jnp.sum(right(x)), x, references={right: pinned})
    assert report.passed, report.text()
    assert all("the reference does not resolve float64" in f.note for f in report.findings)
    wrong_report = mg.audit(lambda x: jnp.sum(wrong(x)), x, references={wrong: pinned})
    assert [f.argument for f in wrong_report.failures()] == ["x"], wrong_report.text()


def test_bfloat16_without_a_reference_is_not_applicable_and_with_one_judged_by_the_golden():
    """In bfloat16 the coarse differences resolve no tenth of a derivative: they pass nothing."""

    def kernel_of(factor):
        @jax.custom_vjp
        def kernel(h):
            return jnp.tanh(h)

        kernel.defvjp(lambda h: (jnp.tanh(h), h), lambda h, g: (factor * (1 - jnp.tanh(h) ** 2) * g,))
        return kernel

    h = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.bfloat16)
    right = kernel_of(1.0)
    alone = mg.audit(lambda h: jnp.sum(right(h)), h)
    (finding,) = alone.findings
    assert alone.passed and finding.status == "not applicable" and "give the audit a reference" in finding.note
    assert alone.sites[0].judged == "coarse finite differences" and "1 of 1 comparisons not applicable" in alone.text()
    assert mg.audit(lambda h: jnp.sum(right(h)), h, references={right: jnp.tanh}).passed
    # 10 % is about 25 bfloat16 ulps: far beyond twice the reference's rounding.
    wrong = kernel_of(1.1)
    report = mg.audit(lambda h: jnp.sum(wrong(h)), h, references={"kernel": jnp.tanh})
    assert [f.argument for f in report.failures()] == ["h"], report.text()


def test_a_reference_for_a_function_never_called_is_refused():
    m = _pallas_layer_norm()
    args = _inputs(jnp.float32)
    unused = _planted(m, "dx scaled by 1.01")
    cases = [
        ({unused: m.layer_norm_reference}, "audit: loss never calls layer_norm, given a reference"),
        (
            {"layer_nrom": m.layer_norm_reference},
            "loss never calls layer_nrom, given a reference (the custom_vjp functions it calls: layer_norm)",
        ),  # fmt: skip
        ({jnp.tanh: jnp.tanh}, "references are keyed by a custom_vjp function or its name, got tanh"),
        ({m.layer_norm: None}, "the reference given for layer_norm is a NoneType, not a function"),
    ]
    for references, message in cases:
        with pytest.raises(CheckError, match=message.replace("(", r"\(").replace(")", r"\)")):
            mg.audit(_loss(m.layer_norm), *args, references=references)


def _decay(y, t, a):
    return -a * y


def _ode_loss(y0, a):
    from jax.experimental.ode import odeint

    return jnp.sum(odeint(_decay, y0, jnp.linspace(0.0, 1.0, 5), a))


def test_odeint_adjoint_passes_in_float64():
    """JAX cannot reverse-differentiate the adaptive solver's while loop: finite differences judge
    the adjoint, to the solver's tolerance (the decoupled components' cross-derivatives are 0 in the
    adjoint and about 1e-9 in the differences of the discrete solution)."""
    report = mg.audit(_ode_loss, jnp.asarray([1.0, 2.0]), jnp.asarray(0.7))
    assert report.passed, report.text()
    (site,) = report.sites
    assert site.name == "_odeint" and site.judged == "finite differences"
    assert max(f.max_rel_error for f in report.findings) < 1e-6


def measure() -> None:
    """Prints the figures: per kernel and way of judging it, the verdict, the worst argument's errors
    and ratio (or the coarse step and allowance), the seconds; then planted mistakes caught."""
    m = _pallas_layer_norm()
    rows = []

    def run(name, loss, args, references, seed=0):
        start = time.perf_counter()
        report = mg.audit(loss, *args, references=references, seed=seed)
        seconds = time.perf_counter() - start
        worst = max(report.findings, key=lambda f: f.error_over_allowed)
        rows.append((name, report.sites[0].judged, str(args[0].dtype), seed, report.passed, worst, seconds))
        return report

    given = {m.layer_norm: m.layer_norm_reference}
    for seed in range(3):
        run("layer_norm", _loss(m.layer_norm), _inputs(jnp.float32, seed), given, seed)
    run("layer_norm", _loss(m.layer_norm), _inputs(jnp.float64), given)
    run("layer_norm", _loss(m.layer_norm), _inputs(jnp.float32), None)
    attention, loss_of, reference, args = _mha()
    with jax.enable_x64(False):
        run("mha (64-bit mode off)", loss_of(attention.mha), args, {attention.mha: reference})
        run("mha (64-bit mode off)", loss_of(attention.mha), args, None)
    caught = {"reference (golden)": 0, "coarse finite differences": 0}
    for mistake in MISTAKES:
        planted = _planted(m, mistake)
        for references in ({planted: m.layer_norm_reference}, None):
            report = run(f"planted: {mistake}", _loss(planted), _inputs(jnp.float32), references)
            caught[report.sites[0].judged] += [f.argument for f in report.failures()] == [MISTAKES[mistake][1]]
    for name, judged, dtype, seed, passed, f, seconds in rows:
        figures = (
            f"err_fn {f.max_abs_error:.2e} err_ref {f.err_ref:.2e} ratio {f.ratio:.3g} allowed {f.allowed:.2e}"
            if f.golden
            else f.note.split(": ", 1)[1] + f", error {f.max_abs_error:.2e}"
        )
        verdict = "ok" if passed else "FAIL"
        arguments = f"{dtype} arguments, {f.dtype} criterion" if f.golden else f"{dtype} arguments"
        print(f"{name:36} {judged:26} {arguments:36} seed {seed} {verdict:4} {f.argument:8} {figures} {seconds:.2f} s")
    print(", ".join(f"{judged}: {n} of {len(MISTAKES)} planted mistakes caught" for judged, n in caught.items()))
    _spread_over_seeds(m)
    start = time.perf_counter()
    ode = mg.audit(_ode_loss, jnp.asarray([1.0, 2.0]), jnp.asarray(0.7))
    worst = max(f.max_rel_error for f in ode.findings)
    print(f"odeint (float64, finite differences): {'ok' if ode.passed else 'FAIL'}, worst relative error "
          f"{worst:.1e}, {time.perf_counter() - start:.2f} s")  # fmt: skip


def _spread_over_seeds(m, seeds: int = 8) -> None:
    """Error over allowed, per way of judging: its largest on the right kernel, its smallest on the
    argument a 1 % mistake spoils, over ``seeds`` draws of the inputs and cotangents."""
    scaled = [mistake for mistake in MISTAKES if "1.01" in mistake]
    for judged in ("reference (golden)", "coarse finite differences"):
        right, wrong = [], []
        for seed in range(seeds):
            args = _inputs(jnp.float32, seed)
            for kernel in [m.layer_norm, *(_planted(m, mistake) for mistake in scaled)]:
                references = {kernel: m.layer_norm_reference} if judged.startswith("reference") else None
                report = mg.audit(_loss(kernel), *args, seed=seed, references=references)
                if kernel is m.layer_norm:
                    right.append(max(f.error_over_allowed for f in report.findings))
                else:
                    spoilt = MISTAKES[scaled[len(wrong) % len(scaled)]][1]
                    wrong.append(min(f.error_over_allowed for f in report.findings if f.argument == spoilt))
        print(
            f"{judged} over {seeds} seeds: right kernel's error/allowed at most {max(right):.3g} (median "
            f"{np.median(right):.3g}); 1 % mistakes' at least {min(wrong):.3g}, {sum(w > 1 for w in wrong)} of "
            f"{len(wrong)} caught"
        )


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    measure()
