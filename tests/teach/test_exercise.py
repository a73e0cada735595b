"""Exercises for every registered rule, and grading: a right solution passes, wrong ones fail
with the right diagnosis, and a file that cannot be graded is a one-line error with exit 2."""

import functools
import inspect
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad import cli, registry
from manualgrad.check import sharded
from manualgrad.teach import exercise
from manualgrad.text import plain

RULES = [rule.name for rule in manualgrad.rules()]


def _write(tmp_path, name, body=None, backward=None):
    """The exercise for ``name``, its backward's body replaced by ``body`` (lines at function
    indent), or the whole ``def backward`` by ``backward``."""
    text = exercise.exercise(name)
    if body is not None:
        text = text[: text.index("    raise NotImplementedError(")] + body
    if backward is not None:
        text = text[: text.index("def backward(")] + backward
    path = tmp_path / f"{name}_exercise.py"
    path.write_text(text)
    return path


def _grade(path, capsys):
    """``manualgrad grade path``: (exit code, stdout); nothing may go to stderr (no traceback)."""
    code = cli.main(["grade", "--in-process", str(path)])
    out, err = capsys.readouterr()
    assert err == "" and "Traceback" not in out, err + out
    return code, out


def _check_lines(out):
    """The per-check lines of a grade: ``{check: (verdict, detail)}``."""
    rows = [line.split(None, 2) for line in out.splitlines() if line.startswith("  ")]
    return {row[0]: (row[1], row[2] if len(row) > 2 else "") for row in rows}


# Right solutions, derived by hand (no autodiff, no call into manualgrad's backward functions).
DENSE = (
    "    x, w = residuals\n    lead = tuple(range(x.ndim - 1))\n"
    "    return g @ w.T, jnp.tensordot(x, g, axes=(lead, lead))\n"
)
LEAKY_RELU = "    f = residuals\n    return (jnp.where(f > 0, g, negative_slope * g),)\n"
# conv2d, tap by tap: tap (i, j) reads the strided window x_pad[:, i·d : i·d + (o−1)s + 1 : s, ...]; the
# padding from the exercise file's own helpers, as its forward computes it.
CONV2D = """    x, w = residuals
    (sh, sw), (dh, dw_), (oh, ow) = spatial(stride, 2), spatial(dilation, 2), g.shape[1:3]
    (hlo, hhi), (wlo, whi) = zero_padding(padding, x.shape[1:3], w.shape[:2], (sh, sw), (dh, dw_))
    xp = jnp.pad(x, ((0, 0), (hlo, hhi), (wlo, whi), (0, 0)))
    dxp, dw = jnp.zeros_like(xp), jnp.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            window = (slice(None), slice(i * dh, i * dh + (oh - 1) * sh + 1, sh),
                      slice(j * dw_, j * dw_ + (ow - 1) * sw + 1, sw), slice(None))
            dxp = dxp.at[window].add(g @ w[i, j].T)
            dw = dw.at[i, j].set(jnp.einsum("nhwc,nhwo->co", xp[window], g))
    return dxp[:, hlo : hlo + x.shape[1], wlo : wlo + x.shape[2], :], dw
"""


@pytest.mark.parametrize("name", RULES)
def test_exercise_exists_for_every_rule(name, tmp_path):
    rule = manualgrad.get(name)
    text = exercise.exercise(name)
    assert text.startswith(f"{exercise.HEADER}{name}\n# manualgrad exercise format {exercise.FORMAT}, written by ")
    # The derivation up to its result, and nothing of the result itself.
    setup = rule.derivation_setup
    result = rule.derivation[len(setup) :].split(registry.RESULT_MARKER, 1)[1].strip()
    first_result_line = result.splitlines()[0].strip()
    assert all(line.strip() in text for line in plain(setup).splitlines())
    assert first_result_line and first_result_line not in text
    # Runs: its forward is the rule's forward, its backward is empty (a collective's, on the mesh).
    namespace = runpy.run_path(str(_write(tmp_path, name)))
    args = rule.sample_inputs(jax.random.PRNGKey(0), jnp.float64)[0].args
    run = functools.partial(sharded.on_devices, rule) if sharded.on_mesh(rule) else lambda f: f
    np.testing.assert_array_equal(run(namespace["forward"])(*args)[0], run(rule.fn)(*args))
    with pytest.raises(NotImplementedError, match=f"{name}: write backward"):
        namespace["backward"](*[None] * len(inspect.signature(namespace["backward"]).parameters))


@pytest.mark.parametrize(
    "name, body, score", [("dense", DENSE, "7/7"), ("leaky_relu", LEAKY_RELU, "6/6"), ("conv2d", CONV2D, "7/7")]
)
def test_right_solution_passes(name, body, score, tmp_path, capsys):
    code, out = _grade(_write(tmp_path, name, body), capsys)
    assert code == 0 and f"score: {score} checks passed" in out and "FAIL" not in out, out


def test_unwritten_backward_passes_only_the_forward(tmp_path, capsys):
    assert cli.main(["grade", "--in-process", str(_write(tmp_path, "relu"))]) == 1
    out = capsys.readouterr().out
    assert "score: 1/6 checks passed" in out and "not written yet" in out
    assert _check_lines(out)["vjp"] == ("FAIL", "not run: the backward raised on 5 of 5 samples")
    assert "adjoint       -     relu is linear in no argument" in out


@pytest.mark.parametrize(
    "name, body, diagnosis, reread",
    [
        (
            "dense",
            DENSE.replace(
                "return g @ w.T, jnp.tensordot(x, g, axes=(lead, lead))",
                "dw = jnp.tensordot(x, g, axes=(lead, lead))\n    return g @ w.T, jnp.reshape(dw.T, dw.shape)",
            ),
            "diagnosis: dense, argument w: your gradient equals the right one transposed",
            "seed 004",
        ),
        (
            "sigmoid",
            "    f = residuals\n    return (g * jax.nn.sigmoid(f) * (1 - jax.nn.sigmoid(f)),)\n",
            "diagnosis: sigmoid, argument z: your gradient equals the right one with σ' taken at the output",
            "Remark 8",
        ),
        (
            "mse",
            "    return g * residuals, -g * residuals\n",
            "diagnosis: mse, argument pred: your gradient equals 4 × the right one: a missing mean over the batch",
            "§3 mse",
        ),
    ],
)
def test_wrong_solution_fails_with_its_diagnosis(name, body, diagnosis, reread, tmp_path, capsys):
    assert cli.main(["grade", "--in-process", str(_write(tmp_path, name, body))]) == 1
    out = capsys.readouterr().out
    assert "vjp           FAIL" in out and "forward       ok" in out
    assert any(line.startswith(diagnosis) for line in out.splitlines()), out
    assert "reread: " in out and reread in out.split("reread: ")[1]


def test_grade_bad_input_exits_2_with_one_line(tmp_path, capsys):
    not_exercise = tmp_path / "plain.py"
    not_exercise.write_text("print('hello')\n")
    unknown = tmp_path / "unknown.py"
    unknown.write_text(f"{exercise.HEADER}densse\n")
    broken = tmp_path / "broken.py"
    broken.write_text(f"{exercise.HEADER}dense\ndef backward(:\n")
    cases = [
        (tmp_path / "missing.py", "no file"),
        (not_exercise, "is not an exercise file"),
        (unknown, "no rule named 'densse'"),
        (broken, "does not run: SyntaxError"),
    ]
    for path, message in cases:
        assert cli.main(["grade", "--in-process", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("manualgrad grade: ") and message in err and err.count("\n") == 1


def test_exercise_command_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "mine.py"
    assert cli.main(["exercise", "flatten", "--out", str(out)]) == 0
    assert out.read_text() == exercise.exercise("flatten")
    assert cli.main(["exercise", "flatten", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["exercise", "nope"]) == 2
    assert "unknown rule nope" in capsys.readouterr().err


# The transpose of the right dw, (out, in): custom_vjp refuses it on every sample but
# 'width 1' (w of shape 1 × 1): a check that could not run on a sample fails on it.
TRANSPOSED_DW = (
    "    x, w = residuals\n    x2 = jnp.reshape(x, (-1, x.shape[-1]))\n"
    "    g2 = jnp.reshape(g, (-1, g.shape[-1]))\n    return g @ w.T, g2.T @ x2\n"
)


def test_a_check_that_could_not_run_on_a_sample_fails_on_it(tmp_path, capsys):
    code, out = _grade(_write(tmp_path, "dense", TRANSPOSED_DW), capsys)
    assert code == 1 and "score: 1/7 checks passed" in out, out
    checks = _check_lines(out)
    assert checks["forward"][0] == "ok"  # the forward is the library's: never failed for the backward
    for c in ("vjp", "finite_diff", "adjoint", "jit", "vmap", "grad_of_grad"):
        assert checks[c] == ("FAIL", "not run: the backward raised on 4 of 5 samples"), (c, out)
    assert "backward returned a cotangent of shape (5, 3) for w, of shape (3, 5) (sample 'batch 4')" in out.splitlines()


def test_a_wrong_shape_cotangent_is_diagnosed(tmp_path, capsys):
    # The same dw is exactly the right one transposed, and the diagnosis says so.
    _, out = _grade(_write(tmp_path, "dense", TRANSPOSED_DW), capsys)
    diagnoses = [line for line in out.splitlines() if line.startswith("diagnosis: ")]
    assert diagnoses == ["diagnosis: dense, argument w: your gradient equals the right one transposed"], out


# The usual slips of the backward's contract, each one plain sentence.
MUST = "it must return a tuple with one cotangent per argument of the forward, here "
SLIPS = {
    "no return": (
        "dense",
        "    x, w = residuals\n    dx = g @ w.T\n",
        None,
        "backward returned None: " + MUST + "(dx, dw)",
    ),
    "a bare array": (
        "relu",
        "    return g * (residuals > 0)\n",
        None,
        "backward returned an array, not a tuple: " + MUST + "(dz,)",
    ),
    "a list": (
        "dense",
        DENSE.replace(
            "return g @ w.T, jnp.tensordot(x, g, axes=(lead, lead))",
            "return [g @ w.T, jnp.tensordot(x, g, axes=(lead, lead))]",
        ),
        None,
        "backward returned a list: " + MUST + "(dx, dw)",
    ),
    "one cotangent short": (
        "dense",
        "    x, w = residuals\n    return (g @ w.T,)\n",
        None,
        "backward returned a tuple of 1 cotangent: " + MUST + "(dx, dw)",
    ),
    "wrong number of arguments": (
        "dense",
        None,
        "def backward(g):\n    return g, g\n",
        ("backward is defined as backward(g) but is called with 2 arguments: write it as backward(residuals, g)"),
    ),
    "numpy on a traced array": (
        "dense",
        DENSE.replace("    lead", "    x = np.asarray(x)\n    lead"),
        None,
        "use jax.numpy (jnp), not numpy, inside backward: its inputs are traced arrays",
    ),
}


@pytest.mark.parametrize("slip", SLIPS)
def test_a_common_slip_is_a_graded_failure_with_one_sentence(slip, tmp_path, capsys):
    name, body, backward, sentence = SLIPS[slip]
    code, out = _grade(_write(tmp_path, name, body, backward), capsys)
    graded = 7 if name == "dense" else 6
    assert code == 1 and f"score: 1/{graded} checks passed" in out, out
    assert sentence in out.splitlines(), out
    assert _check_lines(out)["forward"][0] == "ok"


# Autodiff, or manualgrad's own backward, inside a hand backward.
AUTODIFF = {
    "jax.vjp": ("    x, w = residuals\n    return jax.vjp(lambda a, b: a @ b, x, w)[1](g)\n", "jax.vjp"),
    "from jax import": (
        "    from jax import vjp\n    x, w = residuals\n    return vjp(jnp.matmul, x, w)[1](g)\n",
        "vjp, that is jax.vjp",
    ),
    "import jax as j": (
        (
            "    import jax as j\n    x, w = residuals\n"
            "    return j.grad(lambda a, b: jnp.vdot(a @ b, g), argnums=(0, 1))(x, w)\n"
        ),
        "j.grad, that is jax.grad",
    ),
    "jax.jacrev": ("    x, w = residuals\n    return jax.jacrev(jnp.matmul)(x, w), x\n", "jax.jacrev"),
    "dense_backward": (
        (
            "    from manualgrad.rules import linear\n    x, w = residuals\n"
            "    return linear.dense_backward(w, g), x.T @ g\n"
        ),
        "linear.dense_backward, that is manualgrad.rules.linear.dense_backward",
    ),
    "mg.dense": (
        (
            "    import manualgrad as mg\n    x, w = residuals\n"
            "    return jax.linear_transpose(lambda a: mg.dense(a, w), x)(g)[0], x.T @ g\n"
        ),
        "mg.dense, that is manualgrad.rules.linear.dense",
    ),
}


@pytest.mark.parametrize("call", AUTODIFF)
def test_autodiff_in_a_hand_backward_scores_zero(call, tmp_path, capsys):
    body, named = AUTODIFF[call]
    path = _write(tmp_path, "dense", body)
    code, out = _grade(path, capsys)
    assert code == 1 and "score: 0/7 checks passed" in out, out
    first = next(
        i
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if named.split(",")[0] in line and "import" not in line
    )
    assert f"  line {first}: {named}" in out, out


@pytest.mark.parametrize("name", RULES)
def test_no_exercise_as_written_is_taken_for_autodiff(name, tmp_path):
    assert exercise.autodiff_calls(_write(tmp_path, name)) == []
