"""Exercise notebooks: valid nbformat for every rule, maths as LaTeX, graded by `manualgrad grade`
and in place by their last cell."""

import re
import runpy

import nbformat
import pytest

import manualgrad
from manualgrad import cli
from manualgrad.teach import exercise, notebook

RULES = [rule.name for rule in manualgrad.rules()]
RELU = "    return (g * (residuals > 0),)\n"
SIGMOID_AT_OUTPUT = "    f = residuals\n    return (g * jax.nn.sigmoid(f) * (1 - jax.nn.sigmoid(f)),)\n"


def _solved(name, body, path):
    """Rule ``name``'s notebook with its backward's body replaced by ``body``, written to ``path``."""
    nb = notebook.notebook(name)
    cell = next(c for c in nb.cells if c.metadata.get(notebook.KEY) == "backward")
    cell.source = cell.source[: cell.source.index("    raise NotImplementedError(")] + body
    nbformat.write(nb, str(path))
    return path


@pytest.mark.parametrize("name", RULES)
def test_every_rule_has_a_valid_notebook(name):
    nb = notebook.notebook(name)
    nbformat.validate(nb)
    roles = [c.metadata[notebook.KEY] for c in nb.cells]
    assert roles == ["derivation", "forward", "backward", "grade"]
    assert nb.metadata[notebook.KEY] == {"rule": name, "format": exercise.FORMAT, "version": exercise.version()}
    assert f"mg.grade_here({name!r}, globals())" in nb.cells[-1].source
    text = nb.cells[0].source
    assert text.count("$") % 2 == 0  # every formula closed
    maths = re.findall(r"\$\$?([^$]+)\$\$?", text)
    assert maths and not [m for m in maths if set(m) & set(notebook.SYMBOLS) - {"‖"}], maths


def test_the_maths_is_latex():
    assert notebook.latex("dx = G Wᵀ, σ'(z) ⊙ ∂L/∂y, x₁² ∈ R^{m×n}") == (
        r"dx = G W^{\top}, \sigma '(z) \odot  \partial L/\partial y, x_{1}^{2} \in  R^{m\times n}"
    )
    markdown = notebook.markdown("Dense ``y = x W`` of ``dense``:\n\n    dx = G Wᵀ\n")
    assert markdown == "Dense $y = x W$ of `dense`:\n\n$$dx = G W^{\\top}$$"


def test_a_solved_notebook_grades_full_marks_and_a_planted_mistake_its_diagnosis(tmp_path, capsys):
    right = _solved("relu", RELU, tmp_path / "relu.ipynb")
    assert cli.main(["grade", "--in-process", str(right)]) == 0
    out = capsys.readouterr().out
    assert f"grading your backward for relu ({right})" in out and "score: 6/6 checks passed" in out
    wrong = _solved("sigmoid", SIGMOID_AT_OUTPUT, tmp_path / "sigmoid.ipynb")
    assert cli.main(["grade", "--in-process", str(wrong)]) == 1
    out = capsys.readouterr().out
    assert "diagnosis: sigmoid, argument z: your gradient equals the right one with σ' taken at the output" in out


def test_the_last_cell_grades_in_place(tmp_path, capsys):
    """The notebook's cells run in order, as Jupyter runs them (from a file, so that the source of
    backward can be read as IPython's cells can)."""
    nb = nbformat.read(str(_solved("relu", RELU, tmp_path / "relu.ipynb")), as_version=4)
    script = tmp_path / "cells.py"
    script.write_text("\n\n".join(c.source for c in nb.cells if c.cell_type == "code") + "\n")
    runpy.run_path(str(script))
    out = capsys.readouterr().out
    assert "grading your backward for relu (this notebook)" in out and "score: 6/6 checks passed" in out


def test_exercise_command_writes_a_notebook_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "relu.ipynb"
    assert cli.main(["exercise", "relu", "--notebook", "--out", str(out)]) == 0
    nbformat.validate(nbformat.read(str(out), as_version=4))
    assert "run its last cell" in capsys.readouterr().out
    assert cli.main(["exercise", "relu", "--notebook", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_notebook_that_is_no_exercise_is_one_line(tmp_path, capsys):
    plain = tmp_path / "plain.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), str(plain))
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{")
    for path, message in [(plain, "is not an exercise notebook"), (broken, "is not a notebook")]:
        assert cli.main(["grade", "--in-process", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("manualgrad grade: ") and message in err and err.count("\n") == 1, err
