"""Exercise files that survive an upgrade: every file ``manualgrad exercise`` writes imports only
manualgrad's public names, shows a forward that computes what its rule computes, and records the
format and version that wrote it; a file of a format this version cannot grade is refused in one
sentence, exit 2."""

import ast
import json
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad
from manualgrad import cli, registry
from manualgrad.check import tolerances
from manualgrad.rules import attention as mg_attention
from manualgrad.teach import exercise, forwards, grading, networks

RULES = [rule.name for rule in manualgrad.rules()]
NETWORKS = list(networks.NETWORKS)
# What an exercise file may import: the standard library's plain modules, JAX, NumPy, and
# manualgrad's public names (the package itself and manualgrad.validation).
ALLOWED = {"__future__", "math", "numbers", "functools", "itertools", "operator", "typing"}
ALLOWED |= {"jax", "jax.numpy", "jax.lax", "numpy", "manualgrad", "manualgrad.validation"}


def _written(tmp_path, argv, name):
    path = tmp_path / f"{name}_exercise.py"
    assert cli.main(["exercise", *argv, "--out", str(path)]) == 0
    return path


def _imports(source):
    """``(module, name)`` for every import of ``source``: ``name`` None for ``import module``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module
            out += [(node.module, alias.name) for alias in node.names]
    return out


def _public(module, name):
    """Whether ``from module import name`` (``import module`` where ``name`` is None) names a public thing."""
    full = module if name is None or module == "__future__" else f"{module}.{name}"
    if module == "manualgrad" and name is not None and name != "validation":
        return not name.startswith("_") and name in manualgrad.__all__
    parts = full.split(".") if module != "__future__" else [name]
    return (
        full.split(".")[0] in ALLOWED
        and not any(p.startswith("_") for p in parts)
        and (full in ALLOWED or module in ALLOWED and full.split(".")[0] != "manualgrad")
    )


@pytest.mark.parametrize("argv", [[r] for r in RULES] + [["--network", n] for n in NETWORKS], ids=" ".join)
def test_every_exercise_file_imports_only_public_names_and_runs(argv, tmp_path, capsys):
    name = argv[-1]
    path = _written(tmp_path, argv, name)
    source = path.read_text()
    title = f"{exercise.NETWORK}{name}" if argv[0] == "--network" else name
    assert source.startswith(exercise.header(title) + "\n")
    assert exercise.format_of(path) == (exercise.FORMAT, f"manualgrad {exercise.version()}")
    imported = _imports(source)
    assert ("jax.numpy", None) in imported or ("jax", None) in imported
    private = [f"{m} {n or ''}".strip() for m, n in imported if not _public(m, n)]
    assert not private, private
    assert "``" not in source  # reST literals shown as a terminal shows them
    namespace = runpy.run_path(str(path))
    assert callable(namespace["backward"]) and (argv[0] == "--network" or callable(namespace["forward"]))


# A forward a file shows for whole rows where its rule computes in tiles, and whether the rule tiles
# a sample. A row that fits one tile is the same computation, bit for bit; over several tiles the
# sums run in another order, so the output and residuals agree to the checker's forward tolerance
# above its round-off floor (entries of order one).
WHOLE_ROWS = {"attention": lambda q, k, v, causal: max(q.shape[1], k.shape[1]) > mg_attention.tile_size()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_plain_forwards_give_their_rules_output_and_residuals(dtype):
    shown = [rule for rule in manualgrad.rules() if forwards.plain_forward(rule)]
    assert shown  # the rules whose own forward computes with a private helper
    with jax.enable_x64(True):
        for rule in shown:
            for sample in rule.sample_inputs(jax.random.PRNGKey(0), jnp.dtype(dtype)):
                mine, theirs = forwards.plain_forward(rule)(*sample.args), rule.fn.fwd(*sample.args)
                where = f"{rule.name}, sample {sample.label!r}"
                assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(theirs), where
                for a, b in zip(jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(theirs)):
                    if jax.dtypes.issubdtype(jnp.result_type(b), jax.dtypes.prng_key):
                        a, b = jax.random.key_data(a), jax.random.key_data(b)
                    a, b = np.asarray(a), np.asarray(b)
                    assert a.dtype == b.dtype and a.shape == b.shape, where
                    if rule.name in WHOLE_ROWS and WHOLE_ROWS[rule.name](*sample.args):
                        tolerance = (tolerances.TOLERANCES[dtype]["forward"], tolerances.ATOL[dtype])
                        np.testing.assert_allclose(a, b, *tolerance, err_msg=where)
                    else:
                        np.testing.assert_array_equal(a, b, err_msg=where)


def test_a_plain_forward_stands_only_for_a_rule_whose_own_forward_cannot_be_shown():
    rules = {rule.name: rule for rule in manualgrad.rules()}
    plain = [
        name.removesuffix("_forward")
        for name in vars(forwards)
        if name.endswith("_forward") and name != "plain_forward"
    ]
    assert set(plain) <= set(rules), set(plain) - set(rules)
    for name in plain:
        with pytest.raises(forwards.ForwardSourceError):
            forwards._closure(rules[name], rules[name].fn.fwd)


# Right solutions of rules whose file shows a plain forward, written against this layout.
RIGHT = {
    "softmax": ("    p = residuals\n    return (p * (g - jnp.sum(g * p, axis=axis, keepdims=True)),)\n", "6/6"),
    "layer_norm": (
        "    xhat, inv, gamma = residuals\n"
        "    lead = tuple(range(g.ndim - 1))\n"
        "    gx = jnp.reshape(gamma, (1,) * (g.ndim - 1) + (-1,)) * g\n"
        "    mean = lambda a: jnp.mean(a, axis=-1, keepdims=True)\n"
        "    dx = inv * (gx - mean(gx) - xhat * mean(gx * xhat))\n"
        "    return dx, jnp.sum(g * xhat, axis=lead), jnp.sum(g, axis=lead)\n",
        "6/6",
    ),
}


@pytest.mark.parametrize("name", RIGHT)
def test_a_right_solution_written_against_this_layout_passes(name, tmp_path, capsys):
    path = _written(tmp_path, [name], name)
    body, score = RIGHT[name]
    text = path.read_text()
    path.write_text(text[: text.index("    raise NotImplementedError(")] + body)
    assert cli.main(["grade", "--in-process", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"score: {score} checks passed" in out and "FAIL" not in out, out


def _refused(path, capsys):
    """``manualgrad grade path``: exit 2 and its one line on stderr."""
    assert cli.main(["grade", "--in-process", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("manualgrad grade: "), err
    return err.strip()


@pytest.mark.parametrize("argv", [["dense"], ["--network", "seed003"]], ids=" ".join)
def test_a_file_of_a_format_this_version_does_not_know_is_refused_in_one_sentence(argv, tmp_path, capsys):
    path = _written(tmp_path, argv, argv[-1])
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "# manualgrad exercise format 99, written by manualgrad 9.0.0\n"
    path.write_text("".join(lines))
    capsys.readouterr()
    assert _refused(path, capsys) == (
        f"manualgrad grade: {path} was written by manualgrad 9.0.0 in exercise format 99; this manualgrad "
        f"({exercise.version()}) grades formats 1 to {exercise.FORMAT}: write a fresh file with "
        f"`manualgrad exercise {' '.join(argv)}`"
    )
    assert grading.grade_file(path).status == "error"


# What the first layout's `manualgrad exercise dense` wrote: no format line, a module that has moved.
FORMAT_1 = f'''{exercise.HEADER}dense
"""Exercise: the backward rule of dense."""

import jax.numpy as jnp
from manualgrad.linear import validation


def forward(x, w):
    validation.floating("dense", "x", x)
    return x @ w, (x, w)


def backward(residuals, g):
    raise NotImplementedError
'''


def test_a_format_1_file_whose_imports_are_gone_is_refused_in_one_sentence(tmp_path, capsys):
    path = tmp_path / "old.py"
    path.write_text(FORMAT_1)
    assert exercise.format_of(path) == (1, "an earlier manualgrad")
    assert _refused(path, capsys) == (
        f"manualgrad grade: {path} was written by an earlier manualgrad in exercise format 1 and imports "
        f"manualgrad.linear, which this manualgrad ({exercise.version()}) no longer has; it grades format "
        f"{exercise.FORMAT}: write a fresh file with `manualgrad exercise dense`"
    )


def test_a_format_1_file_that_still_runs_is_graded(tmp_path, capsys):
    path = tmp_path / "old.py"
    path.write_text(FORMAT_1.replace("from manualgrad.linear import validation", "from manualgrad import validation"))
    assert cli.main(["grade", "--in-process", str(path)]) == 1
    assert "score: 1/7 checks passed" in capsys.readouterr().out


def test_without_nbformat_the_notebook_command_names_the_extra_and_the_rest_works(tmp_path, capsys, monkeypatch):
    notebook = tmp_path / "relu.ipynb"
    assert cli.main(["exercise", "relu", "--notebook", "--out", str(notebook)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "nbformat", None)  # an import of nbformat now raises ImportError
    assert cli.main(["exercise", "relu", "--notebook", "--out", str(tmp_path / "again.ipynb")]) == 2
    err = capsys.readouterr().err
    assert "writing a notebook needs nbformat: pip install 'manualgrad[teach]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "again.ipynb").exists()
    graded = grading.grade_file(notebook)
    assert graded.status == "error" and "grading a notebook needs nbformat" in graded.rows[0].output
    assert cli.main(["exercise", "relu", "--out", str(tmp_path / "relu.py")]) == 0
    assert cli.main(["grade", "--in-process", str(tmp_path / "relu.py")]) == 1


def test_manualgrad_and_its_teaching_modules_import_without_nbformat():
    code = (
        "import sys; sys.modules['nbformat'] = None\n"
        "import manualgrad, manualgrad.cli\n"
        "from manualgrad.teach import autograder, exercise, grading, network_grading, notebook\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_explain_shows_the_derivation_without_rest_markup(capsys):
    assert cli.main(["explain", "conv2d"]) == 0
    out = capsys.readouterr().out
    assert registry.get("conv2d").derivation.count("``") and "``" not in out


def test_a_notebook_from_before_the_format_whose_imports_are_gone_is_refused_in_one_sentence(tmp_path):
    import nbformat

    path = tmp_path / "dense.ipynb"
    assert cli.main(["exercise", "dense", "--notebook", "--out", str(path)]) == 0
    nb = nbformat.read(str(path), as_version=4)
    nb.metadata["manualgrad"] = {"rule": "dense"}  # as notebooks were written before they recorded their format
    forward = next(c for c in nb.cells if c.metadata.get("manualgrad") == "forward")
    forward.source = forward.source.replace("from manualgrad import", "from manualgrad.linear import")
    nbformat.write(nb, str(path))
    graded = grading.grade_file(path)
    assert graded.status == "error" and graded.rows[0].output == (
        f"{path} was written by an earlier manualgrad in exercise format 1 and imports manualgrad.linear, which "
        f"this manualgrad ({exercise.version()}) no longer has; it grades format {exercise.FORMAT}: write a fresh "
        "file with `manualgrad exercise dense`"
    )


@pytest.mark.parametrize("argv", [["relu"], ["conv2d"], ["lstm"], ["--network", "seed001"]], ids=" ".join)
def test_every_code_cell_of_a_notebook_imports_only_public_names(argv, tmp_path):
    path = tmp_path / "exercise.ipynb"
    assert cli.main(["exercise", *argv, "--notebook", "--out", str(path)]) == 0
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    imported = [i for cell in cells for i in _imports("".join(cell["source"]))]
    assert ("manualgrad", None) in imported
    private = [f"{m} {n or ''}".strip() for m, n in imported if not _public(m, n)]
    assert not private, private
