"""manualgrad.audit: every custom_vjp inside a function checked at the values it receives there.

The network: manualgrad's dense, tanh and softmax cross-entropy, a user's custom_vjp that closes
over an array (``mix``) and a user's custom_vjp ``square`` whose backward is planted wrong (1.5 ×
the right cotangent). Shapes are small and shared, so each audit is one pass of a few eager ops."""

import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad import cli
from manualgrad.check import audit as audit_module

MIX = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)))


@jax.custom_vjp
def mix(h):
    return h @ MIX


mix.defvjp(lambda h: (h @ MIX, None), lambda _, g: (g @ MIX.T,))


def _square(factor):
    @jax.custom_vjp
    def square(h):
        return h * h

    square.defvjp(lambda h: (h * h, h), lambda h, g: (factor * g * h,))
    return square


RIGHT, PLANTED = _square(2.0), _square(3.0)  # 3 g h: 1.5 × the right 2 g h


def _network(square):
    def loss(x, w, labels):
        h = mix(mg.tanh(mg.dense(x, w)))
        return mg.softmax_cross_entropy(square(h), labels)

    return loss


X = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)))
W = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3)))
LABELS = jnp.asarray([0, 2, 1, 2])


def _failing(report):
    return [s.name for s in report.sites if not s.passed]


def test_the_planted_mistake_is_named_and_only_it():
    report = mg.audit(_network(PLANTED), X, W, LABELS)
    assert not report.passed
    assert [s.name for s in report.sites] == ["softmax_cross_entropy", "square", "mix", "tanh", "dense"]
    assert _failing(report) == ["square"]
    first = report.first_failure()
    assert first.name == "square" and first.defined.endswith(f"test_audit.py:{_square.__code__.co_firstlineno + 1}")
    lines, start = inspect.getsourcelines(_network)
    called = start + next(i for i, line in enumerate(lines) if "square(h)" in line)
    assert first.called.endswith(f"test_audit.py:{called}")
    (failure,) = report.failures()
    assert failure.argument == "h" and failure.max_rel_error == pytest.approx(1 / 3)
    assert "1.5 × the right one" in failure.diagnosis
    text = report.text()
    assert "the gradient first goes wrong at square" in text and "1.5 × the right one" in failure.describe()


def test_a_correct_network_passes_with_every_site_checked():
    report = mg.audit(_network(RIGHT), X, W, LABELS)
    assert report.passed, report.text()
    assert all(s.calls == 1 and s.checked == 1 for s in report.sites)
    # Every floating argument of every call is compared, the closed-over MIX is not an argument of mix.
    assert sorted((f.rule.split(" ")[0], f.argument) for f in report.findings) == [
        ("dense", "w"),
        ("dense", "x"),
        ("mix", "h"),
        ("softmax_cross_entropy", "logits"),
        ("square", "h"),
        ("tanh", "z"),
    ]
    assert max(f.max_rel_error for f in report.findings) < 1e-13
    assert "every custom_vjp call site agrees" in report.text()


def test_the_values_are_those_the_call_receives_inside_the_function():
    seen = []

    @jax.custom_vjp
    def spy(h):
        return h

    def bwd(h, g):  # compiled by the audit: the residual is seen by a callback
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), h)
        return (g,)

    spy.defvjp(lambda h: (h, h), bwd)
    mg.audit(lambda x, w: jnp.sum(spy(mg.dense(x, w))), X, W)
    # To round-off: the audit runs each call compiled, eager X @ W may round another way.
    np.testing.assert_allclose(seen[0], X @ W, rtol=4 * np.finfo(np.float64).eps)


def _scanned(square):
    def loss(x, w):
        def step(h, _):
            return mix(square(mg.tanh(h))), None

        h, _ = jax.lax.scan(step, mg.dense(x, w), None, length=5)
        return jnp.sum(h)

    return loss


@pytest.mark.parametrize(
    "transform",
    [
        "jit",
        "nested jit",
        "vmap",
        "scan",
    ],
)
def test_under_transformations_the_planted_mistake_is_still_the_only_one(transform):
    if transform == "jit":
        report = mg.audit(jax.jit(_network(PLANTED)), X, W, LABELS)
    elif transform == "nested jit":
        inner = jax.jit(lambda h: PLANTED(mix(h)))
        report = mg.audit(jax.jit(lambda x, w: jnp.sum(inner(jax.jit(mg.dense)(x, w)))), X, W)
    elif transform == "vmap":
        report = mg.audit(jax.vmap(_network(PLANTED), (0, None, 0)), jnp.stack([X, -X]), W, jnp.stack([LABELS] * 2))
    else:
        report = mg.audit(_scanned(PLANTED), X, W)
        sites = {s.name: s for s in report.sites}
        assert sites["square"].calls == 5 and sites["square"].checked == audit_module.CALLS_PER_SITE
        samples = {f.sample for f in report.failures()}
        assert samples == {f"called at {sites['square'].called} (scan iteration {i})" for i in (0, 2, 4)}
    assert _failing(report) == ["square"], report.text()
    assert all("1.5 × the right one" in f.diagnosis for f in report.failures())


def test_under_scan_a_correct_network_passes():
    report = mg.audit(_scanned(RIGHT), X, W)
    assert report.passed and {s.name: s.calls for s in report.sites} == {"mix": 5, "square": 5, "tanh": 5, "dense": 1}


def test_the_first_wrong_site_in_backward_order_is_named():
    before = _square(1.0)  # half the right one, earlier in the forward: later in the backward
    report = mg.audit(lambda x, w: jnp.sum(PLANTED(mix(before(mg.dense(x, w))))), X, W)
    assert [s.name for s in report.sites] == ["square", "mix", "square", "dense"]
    assert _failing(report) == ["square", "square"]
    assert report.first_failure() is report.sites[0] and "1.5 ×" in report.sites[0].findings[0].diagnosis
    assert "half the right one" in report.sites[2].findings[0].diagnosis


def test_a_branch_not_taken_is_listed_as_not_reached():
    def loss(x, w):
        h = mg.dense(x, w)
        return jnp.sum(jax.lax.cond(jnp.sum(h) > 1e9, PLANTED, mg.tanh, h))

    report = mg.audit(loss, X, W)
    assert report.passed, report.text()
    (unreached,) = [s for s in report.sites if not s.calls]
    assert unreached.name == "square" and unreached.findings == []
    assert "1 call site(s) never ran on these arguments" in report.text()


def test_a_site_inside_a_primitive_the_audit_does_not_enter_fails_not_run():
    mesh = jax.make_mesh((1,), ("i",))
    spec = jax.sharding.PartitionSpec()
    sharded = jax.shard_map(mg.tanh, mesh=mesh, in_specs=spec, out_specs=spec)
    report = mg.audit(lambda x, w: jnp.sum(sharded(mg.dense(x, w))), X, W)
    assert _failing(report) == ["tanh"] and report.sites[0].calls == 0
    assert report.failures()[0].note == "inside shard_map, which the audit does not enter"
    assert "tanh" in report.text() and "not run" in report.text()


@jax.custom_vjp
def _sines(x):
    """sin applied three times in a while loop: JAX cannot reverse-differentiate the primal."""
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1])), (0, x))[1]


def _sines_bwd(factor):
    def bwd(x, g):
        d = jnp.cos(x) * jnp.cos(jnp.sin(x)) * jnp.cos(jnp.sin(jnp.sin(x)))
        return (factor * g * d,)

    return bwd


def test_a_primal_jax_cannot_differentiate_is_checked_by_finite_differences():
    _sines.defvjp(lambda x: (_sines(x), x), _sines_bwd(1.0))
    right = mg.audit(lambda x: jnp.sum(_sines(x)), X)
    assert right.passed and {f.check for f in right.findings} == {"finite_diff"}
    _sines.defvjp(lambda x: (_sines(x), x), _sines_bwd(1.01))
    wrong = mg.audit(lambda x: jnp.sum(_sines(x)), X)
    assert _failing(wrong) == ["_sines"]
    # In float32 the call is checked by coarse finite differences in its own dtype, and says so.
    f32 = mg.audit(lambda x: jnp.sum(_sines(x)), X.astype(jnp.float32))
    assert not f32.passed and f32.failures()[0].note.startswith("coarse finite differences in float32")
    assert f32.sites[0].judged == "coarse finite differences"


def test_a_backward_that_raises_fails_its_site_and_the_audit_goes_on():
    @jax.custom_vjp
    def broken(h):
        return h

    broken.defvjp(lambda h: (h, None), lambda _, g: (g.reshape(-1),))
    report = mg.audit(lambda x, w: jnp.sum(broken(mg.tanh(mg.dense(x, w)))), X, W)
    assert _failing(report) == ["broken"]
    assert report.failures()[0].note.startswith("the backward raised ValueError")
    assert [s.passed for s in report.sites] == [False, True, True]


def test_calls_per_site_must_be_positive():
    with pytest.raises(ValueError, match="calls_per_site must be at least 1, got 0"):
        mg.audit(_network(RIGHT), X, W, LABELS, calls_per_site=0)


NETWORK_FILE = """
import jax
import jax.numpy as jnp
import numpy as np

import manualgrad as mg

jax.config.update("jax_enable_x64", True)


@jax.custom_vjp
def square(h):
    return h * h


square.defvjp(lambda h: (h * h, h), lambda h, g: (FACTOR * g * h,))


def loss(x, w):
    return jnp.sum(square(mg.tanh(mg.dense(x, w))))


def audit_args():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((3, 2)))
"""


@pytest.mark.parametrize("factor, code", [(2.0, 0), (3.0, 1)])
def test_audit_command_on_a_file(factor, code, tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(f"FACTOR = {factor}\n" + NETWORK_FILE)
    assert cli.main(["audit", f"{path}:loss"]) == code
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("audit of loss: 3 custom_vjp call sites, 3 calls checked"), err + out
    if code:
        assert "the gradient first goes wrong at square" in out and "1.5 × the right one" in out
    else:
        assert "every custom_vjp call site agrees" in out


def test_audit_command_bad_input_is_one_line(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text("FACTOR = 2.0\n" + NETWORK_FILE.replace("def audit_args", "def other_args"))
    raising = tmp_path / "raising.py"
    raising.write_text("def loss(x):\n    return x\n\ndef audit_args():\n    return 1.0\n")
    cases = [
        ([str(path)], "give FILE:FUNCTION"),
        ([f"{tmp_path}/missing.py:loss"], "no file"),
        ([f"{path}:nope"], "defines no function nope to audit"),
        ([f"{path}:loss"], "defines no function audit_args returning the arguments of loss"),
        ([f"{raising}:loss"], "TypeError: it returned float, not a tuple of loss's positional arguments"),
    ]
    for argv, message in cases:
        assert cli.main(["audit", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("manualgrad audit: ") and message in err and err.count("\n") == 1, err
    assert cli.main(["audit", f"{path}:loss", "--args", "other_args"]) == 0


def test_paths_are_shown_from_the_package_and_the_working_directory(monkeypatch, tmp_path):
    """manualgrad's own files read from the package's folder wherever the command runs; a user's
    file relative to the working directory when it lies below it, else absolute."""
    here = pathlib.Path(__file__).resolve()
    dense_line = inspect.getsourcelines(mg.dense.fun)[1]
    square_line = _square.__code__.co_firstlineno + 1
    for cwd, square_file in [(tmp_path, str(here)), (here.parent, here.name)]:
        monkeypatch.chdir(cwd)
        sites = {s.name: s for s in mg.audit(_network(RIGHT), X, W, LABELS).sites}
        assert sites["dense"].defined == f"manualgrad/rules/linear.py:{dense_line}"
        assert sites["square"].defined == f"{square_file}:{square_line}"
        assert sites["square"].called.startswith(f"{square_file}:")


KERNEL_FILE = """
import jax
import jax.numpy as jnp


@jax.custom_vjp
def kernel(x):
    return jnp.sin(x)


kernel.defvjp(lambda x: (kernel(x), x), lambda x, g: (FACTOR * g * jnp.cos(x),))


def loss(x):
    return jnp.sum(kernel(x))


def audit_args():
    return (jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32),)


def audit_references():
    return {kernel: jnp.sin}
"""


@pytest.mark.parametrize("factor, code", [(1.0, 0), (1.01, 1)])
def test_audit_command_takes_the_files_references(factor, code, tmp_path, capsys):
    path = tmp_path / "kernel.py"
    path.write_text(f"FACTOR = {factor}\n" + KERNEL_FILE)
    assert cli.main(["audit", f"{path}:loss"]) == code
    out = capsys.readouterr().out
    assert "reference (golden)" in out and "err_ref" in out
    assert cli.main(["audit", f"{path}:loss", "--references", "nope"]) == 2
    assert "defines no function nope returning references (--references)" in capsys.readouterr().err
