"""The command line and the README, both driven from the registry."""

import json
import pathlib
import subprocess
import sys

import pytest

from manualgrad import cli
from manualgrad.check import checker
from manualgrad.teach import docs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_check_prints_table_and_passes(capsys):
    assert cli.main(["check", "identity", "relu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "dtype float32" in out
    for column in ("forward", "vjp", "finite_diff", "adjoint", "jit", "vmap", "grad_of_grad"):
        assert column in out
    # relu is not linear: its adjoint cell is a dash, not a pass
    relu_row = next(line for line in out.splitlines() if line.startswith("relu "))
    assert relu_row.split()[7] == "-" and relu_row.count("ok") == 6
    assert out.splitlines()[-1].startswith("13 passed, 0 failed")


def test_check_json_has_one_record_per_rule_and_check(capsys):
    assert cli.main(["check", "mse", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # mse is not linear in any argument: no adjoint record
    assert sorted(r["check"] for r in records) == sorted(set(checker.CHECKS) - {"adjoint"})
    assert all(r["rule"] == "mse" and r["passed"] and r["dtype"] == "float64" for r in records)
    assert all(r["max_rel_error"] <= r["tolerance"] for r in records)


def test_check_unknown_rule_exits_2(capsys):
    assert cli.main(["check", "nope"]) == 2
    assert "unknown rule(s) nope" in capsys.readouterr().err


def test_console_script_exits_1_on_failure(tmp_path):
    """A failing check makes the process exit 1 (run as a subprocess, like a user would)."""
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, jax\n"
        "import manualgrad\n"
        "from manualgrad import cli\n"
        "from manualgrad.rules import activations\n"
        "activations.sigmoid.defvjp(activations.sigmoid_forward, lambda f, g: (g,))\n"
        "sys.exit(cli.main(['check', 'sigmoid']))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "FAIL sigmoid, argument z" in result.stdout
    assert (
        "DIAGNOSIS sigmoid, argument z: your gradient equals the cotangent G itself: the factor σ' is missing"
        in result.stdout.splitlines()
    )


def test_readme_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    assert docs.rules_table() in readme


def test_readme_quickstart_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "python3 -m pytest -q"
    assert test_command in readme and test_command in ci


def test_readme_python_examples_run():
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    namespaces = [{} for _ in blocks]
    for code, namespace in zip(blocks, namespaces):
        exec(compile(code, "README.md", "exec"), namespace)
    quickstart, audit_example, backprop_example = namespaces
    assert set(quickstart["grads"]) == {"w1", "b1", "w2"}
    assert quickstart["report"].passed
    assert [s.name for s in audit_example["report"].sites if not s.passed] == ["square"]
    assert [g[0].shape for g in backprop_example["grads"]] == [(3, 3, 1, 8), (3, 3, 8, 16), (2304, 10)]


def test_help_offers_what_is_defined(capsys):
    """Each sub-command's --help offers the choices where they are defined: datasets, models, optimizers."""
    from manualgrad.bench import bench
    from manualgrad.train import data, models, step

    for command, names in (
        ("train", (*data.SPECS, *models.MODELS, *step.OPTIMIZERS, *step.GRADS)),
        ("bench", tuple(bench.MODELS)),
    ):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        shown = capsys.readouterr().out
        assert [n for n in names if n not in shown] == []


def test_explain_of_a_collective_in_a_one_device_process_says_why_its_live_check_cannot_run():
    """The command line has one CPU device (the suite's second is not inherited): a collective's
    live check is not applicable, said in one sentence, and nothing counts as passed."""
    done = subprocess.run(
        [sys.executable, "-m", "manualgrad", "explain", "all_gather"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Live check: not applicable: all_gather is a collective and needs 2 devices" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith("0 passed, 0 failed, 2 not applicable in ")
    assert "all passed" not in done.stdout


def test_grading_a_collective_in_a_one_device_process_says_its_checks_are_not_applicable(tmp_path):
    path = tmp_path / "all_gather_exercise.py"
    assert cli.main(["exercise", "all_gather", "--out", str(path)]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "manualgrad", "grade", str(path)], capture_output=True, text=True, timeout=300
    )
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert rows and all(row[1] == "n/a" for row in rows), done.stdout
    assert "not every check could be graded here: needs 2 devices" in done.stdout
    assert "all checks passed" not in done.stdout and done.returncode == 1
