"""Every script in ``comparisons/`` runs and its hand formulas agree with the rules and jax.grad.

Each script's ``main()`` asserts agreement itself (``manualgrad.teach.compare.report``, 1e-12
relative in float64) and returns the worst difference, which is checked again here.
"""

import pathlib
import runpy
import subprocess
import sys

import pytest

import manualgrad
from manualgrad import cli

COMPARISONS = pathlib.Path(__file__).resolve().parents[2] / "comparisons"
SEEDS = sorted(p.name for p in COMPARISONS.glob("seed_*.py"))


def test_one_script_per_seed():
    assert SEEDS == [f"seed_00{i}.py" for i in range(5)]


@pytest.mark.parametrize("script", SEEDS)
def test_seed_comparison_agrees(script, capsys):
    worst = runpy.run_path(str(COMPARISONS / script))["main"]()
    assert 0 <= worst <= 1e-12
    out = capsys.readouterr().out
    assert "hand formula (seed)" in out and "jax.grad" in out and "max difference" in out


def test_seed_001_names_its_typos(capsys):
    runpy.run_path(str(COMPARISONS / "seed_001.py"))["main"]()
    out = capsys.readouterr().out
    assert sorted(line.split(":")[0].strip() for line in out.splitlines() if "TYPO" in line) == [
        "∂L/∂w_0",
        "∂L/∂w_1",
        "∂L/∂w_2",
        "∂L/∂w_3",
    ]


def test_script_runs_from_the_command_line():
    result = subprocess.run([sys.executable, str(COMPARISONS / "seed_004.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "max difference" in result.stdout


def test_remark_8_memory_small_batch(capsys):
    result = runpy.run_path(str(COMPARISONS / "remark8_memory.py"))["main"](batch=8)
    # Storing F_k alone keeps half of what Algorithm 1 as printed keeps (a_k and σ(a_k)).
    assert result["algorithm_F_tape_bytes"] * 2 == result["algorithm_a_and_F_tape_bytes"]
    assert result["algorithm_F_tape_bytes"] == result["algorithm_a_tape_bytes"]
    # The hand rules save F_k too: their residuals are exactly Remark 8's tape.
    assert result["custom_vjp_residual_bytes"] == result["algorithm_F_tape_bytes"]
    assert result["jax_grad_residual_bytes"] > result["custom_vjp_residual_bytes"]
    # Compiled alone, the backward pass takes the tape as arguments: the choice binds XLA there,
    # and Algorithm 1 as printed costs at least the extra tape (the a_k it keeps besides F_k).
    extra_tape = result["algorithm_a_and_F_tape_bytes"] - result["algorithm_F_tape_bytes"]
    backward = {store: result[f"algorithm_{store}_backward_program_bytes"] for store in ("F", "a_and_F")}
    assert backward["a_and_F"] - backward["F"] >= extra_tape - result["algorithm_F_tape_bytes"] // 3
    assert "Remark 8" in capsys.readouterr().out


def test_error_figure_writes_png(tmp_path):
    path = runpy.run_path(str(COMPARISONS / "error_figure.py"))["main"](tmp_path / "errors.png", ["dense", "relu"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_prints_derivation_seed_and_live_check(capsys):
    assert cli.main(["explain", "dense"]) == 0
    out = capsys.readouterr().out
    assert "seed 000" in out and "∇_W L = Oᵀ G" in out and "004_392e797842596cf6.txt" in out
    assert "dx: max relative difference" in out and "all passed" in out


def test_explain_list_and_unknown(capsys):
    assert cli.main(["explain", "--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(manualgrad.rules())
    assert cli.main(["explain", "nope"]) == 2
    assert "unknown rule nope" in capsys.readouterr().err


def test_manual_vs_autodiff_labels_each_training_run(tmp_path, capsys):
    """Each of the two runs' epoch lines comes under a line naming its --grad."""
    runpy.run_path(str(COMPARISONS / "manual_vs_autodiff.py"))["main"](1, "mlp", tmp_path)
    lines = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("--grad ")]
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch   1  train loss")]
    assert [lines[i].split()[1].rstrip(":") for i in heads] == ["manual", "autodiff"]
    assert len(epochs) == 2 and heads[0] < epochs[0] < heads[1] < epochs[1]
    assert "hand rules" in lines[heads[0]] and "jax.grad" in lines[heads[1]]
