"""``comparisons/error_figure.py`` draws the quantity the checker decides on, and leaves the tree clean.

The checker fails an entry when its relative error exceeds the tolerance *and* its absolute
error exceeds the round-off floor. ``Finding.error_over_allowed`` is the worst entry's
``min(relative / tol, absolute / floor)``, the figure's bars: a relative error alone (what
the figure used to draw) can exceed the tolerance on a sample that passes.
"""

import pathlib
import runpy

import pytest

import manualgrad
from manualgrad.check import checker
from mutations import MUTATIONS, mutant

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIGURE = runpy.run_path(str(ROOT / "comparisons" / "error_figure.py"))


def test_float32_relative_error_past_the_tolerance_passes_and_stays_under_1():
    report = manualgrad.check("tanh", dtype="float32", checks=("vjp",))
    assert report.passed
    # A small entry (1 − F² at large |z|) with float32 round-off: relative error 1e-4 > 1e-5,
    # absolute error under the floor (ten float32 ulps of 1, 1.2e-6), so no failure.
    assert max(f.max_rel_error for f in report.findings) > checker.TOLERANCES["float32"]["vjp"]
    assert 0 < max(f.error_over_allowed for f in report.findings) <= 1


@pytest.mark.parametrize("mistake", ["missing σ' factor", "dx scaled by 2"])
def test_error_over_allowed_is_above_1_exactly_on_failures(mistake):
    mutation = next(m for m in MUTATIONS if m.mistake == mistake)
    report = manualgrad.check(mutant(mutation), checks=("vjp", "finite_diff"))
    assert report.failures()
    for finding in report.findings:
        assert (finding.error_over_allowed > 1) == (not finding.passed), finding.describe()


def test_figure_values_are_error_over_allowed():
    values = FIGURE["errors"](["relu", "sigmoid"])
    assert set(values) == set(FIGURE["SERIES"])
    assert values[("vjp", "float64")]["relu"] == 0.0  # the mask is exact
    assert all(0 <= v <= 1 for series in values.values() for v in series.values())
    assert 0 < values[("vjp", "float32")]["sigmoid"] < 1


def test_default_output_leaves_the_working_tree_alone(tmp_path):
    output_path = FIGURE["output_path"]
    default = output_path([])
    assert ROOT not in default.resolve().parents and default.name == "errors.png"
    assert output_path(["--update"]) == ROOT / "comparisons" / "errors.png"
    assert output_path(["--out", str(tmp_path / "e.png")]) == tmp_path / "e.png"
    with pytest.raises(SystemExit):
        output_path(["--update", "--out", str(tmp_path / "e.png")])
