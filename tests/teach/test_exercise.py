"""Exercises for every registered rule, and grading: a right solution passes, wrong ones fail
with the right diagnosis, and a file that cannot be graded is a one-line error with exit 2."""

import inspect
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad import cli, registry
from manualgrad.teach import exercise

RULES = [rule.name for rule in manualgrad.rules()]


def _write(tmp_path, name, body=None):
    """The exercise for ``name``, its backward's body replaced by ``body`` (lines at function indent)."""
    text = exercise.exercise(name)
    if body is not None:
        text = text[: text.index("    raise NotImplementedError(")] + body
    path = tmp_path / f"{name}_exercise.py"
    path.write_text(text)
    return path


def _library_backward(name):
    """A right solution: the library's own backward, called from the exercise."""
    bwd = manualgrad.get(name).fn.bwd
    params = ", ".join(inspect.signature(bwd).parameters)
    return f"    from {bwd.__module__} import {bwd.__name__}\n    return {bwd.__name__}({params})\n"


@pytest.mark.parametrize("name", RULES)
def test_exercise_exists_for_every_rule(name, tmp_path):
    rule = manualgrad.get(name)
    text = exercise.exercise(name)
    assert text.startswith(f"{exercise.HEADER}{name}\n")
    # The derivation up to its result, and nothing of the result itself.
    setup = rule.derivation_setup
    result = rule.derivation[len(setup):].split(registry.RESULT_MARKER, 1)[1].strip()
    first_result_line = result.splitlines()[0].strip()
    assert all(line.strip() in text for line in setup.splitlines())
    assert first_result_line and first_result_line not in text
    # Runs: its forward is the rule's forward, its backward is empty.
    namespace = runpy.run_path(str(_write(tmp_path, name)))
    args = rule.sample_inputs(jax.random.PRNGKey(0), jnp.float64)[0].args
    np.testing.assert_array_equal(namespace["forward"](*args)[0], rule.fn(*args))
    with pytest.raises(NotImplementedError, match=f"{name}: write backward"):
        namespace["backward"](*[None] * len(inspect.signature(namespace["backward"]).parameters))


@pytest.mark.parametrize("name", ["dense", "conv2d"])
def test_right_solution_passes(name, tmp_path, capsys):
    assert cli.main(["grade", str(_write(tmp_path, name, _library_backward(name)))]) == 0
    out = capsys.readouterr().out
    assert "score: 7/7 checks passed" in out and "FAIL" not in out


def test_unwritten_backward_scores_zero(tmp_path, capsys):
    assert cli.main(["grade", str(_write(tmp_path, "relu"))]) == 1
    out = capsys.readouterr().out
    assert "score: 0/6 checks passed" in out and "not written yet" in out
    assert "adjoint       -     relu is linear in no argument" in out


@pytest.mark.parametrize("name, body, diagnosis, reread", [
    ("dense", "    from manualgrad.rules.linear import _dense_vjp\n    dx, dw = _dense_vjp(residuals, g)\n"
              "    return dx, jnp.reshape(dw.T, dw.shape)\n",
     "diagnosis: dense, argument w: your gradient equals the right one transposed", "seed 004"),
    ("sigmoid", "    f = residuals\n    return (g * jax.nn.sigmoid(f) * (1 - jax.nn.sigmoid(f)),)\n",
     "diagnosis: sigmoid, argument z: your gradient equals the right one with σ' taken at the output", "Remark 8"),
    ("mse", "    return g * residuals, -g * residuals\n",
     "diagnosis: mse, argument pred: your gradient equals 4 × the right one: a missing mean over the batch", "§3 mse"),
])
def test_wrong_solution_fails_with_its_diagnosis(name, body, diagnosis, reread, tmp_path, capsys):
    assert cli.main(["grade", str(_write(tmp_path, name, body))]) == 1
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
    cases = [(tmp_path / "missing.py", "no file"), (not_exercise, "is not an exercise file"),
             (unknown, "no rule named 'densse'"), (broken, "does not run: SyntaxError")]
    for path, message in cases:
        assert cli.main(["grade", str(path)]) == 2
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
