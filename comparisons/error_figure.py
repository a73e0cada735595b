"""One picture of every rule's accuracy, drawn as the checker judges it.

The checker fails an entry only when its relative error exceeds the tolerance *and* its
absolute error exceeds the round-off floor: the error allowed an entry whose larger value is
``|g|`` is ``max(tol·|g|, floor)``. For every registered rule the figure draws the worst
entry over the rule's samples of

    error / allowed = min(relative error / tol, absolute error / floor),

which is above 1 exactly where the checker fails an entry, on a log scale with the line at 1:

- the hand VJP against ``jax.vjp`` of the plain-``jnp`` reference (check ``vjp``), in float64
  (tol 1e-12, floor ten ulps of 1) and in float32 (tol 1e-5, floor ten float32 ulps of 1);
- the hand VJP against central finite differences (check ``finite_diff``: tol 1e-6, floor
  1e-8). The differences, and the hand VJP they are compared with, are float64 whatever the
  ``dtype`` of the run, so this is drawn once, from the float64 run.

Run: ``python comparisons/error_figure.py`` writes the figure to a temporary folder (the
working tree stays clean); ``--out PATH`` writes it to PATH; ``--update`` rewrites the
committed ``comparisons/errors.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from manualgrad import registry, text  # noqa: E402
from manualgrad.check import checker, tolerances  # noqa: E402

COMMITTED = Path(__file__).with_name("errors.png")
FLOOR = 1e-6  # an error of exactly 0 is drawn here, so it shows on the log scale
SERIES = {
    ("vjp", "float64"): "hand VJP vs jax.grad, float64",
    ("vjp", "float32"): "hand VJP vs jax.grad, float32",
    ("finite_diff", "float64"): "hand VJP vs finite differences, both float64",
}
RUNS = {"float64": ("vjp", "finite_diff"), "float32": ("vjp",)}
ATOLS = {
    ("vjp", "float64"): tolerances.ATOL["float64"],
    ("vjp", "float32"): tolerances.ATOL["float32"],
    ("finite_diff", "float64"): tolerances.FD_ATOL,
}


def errors(rules: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """``{(check, dtype): {rule: worst error / allowed}}`` from one checker run per dtype."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for dtype, checks in RUNS.items():
        report = checker.check(rules, dtype=dtype, checks=checks)
        assert report.passed, "\n".join(f.describe() for f in report.failures())
        for f in report.findings:
            worst = out.setdefault((f.check, dtype), {})
            worst[f.rule] = max(worst.get(f.rule, 0.0), f.error_over_allowed)
    return out


def _label(check: str, dtype: str) -> str:
    tol = tolerances.TOLERANCES[dtype][check]
    return f"{SERIES[(check, dtype)]}: allowed max({tol:.0e}·|g|, {ATOLS[(check, dtype)]:.1e})"


def figure(values: dict[tuple[str, str], dict[str, float]], out: Path) -> Path:
    names = list(values[next(iter(SERIES))])
    y = np.arange(len(names))
    height = 0.8 / len(SERIES)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.8))
    for i, (check, dtype) in enumerate(SERIES):
        ratios = np.array([values[(check, dtype)][n] for n in names])
        ax.barh(y + (i - 1) * height, np.maximum(ratios, FLOOR), height, label=_label(check, dtype))
        for at in y[ratios == 0] + (i - 1) * height:
            ax.text(FLOOR, at, " 0", va="center", fontsize=6)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="1: an entry beyond it fails the check")
    ax.set_xscale("log")
    ax.set_xlim(FLOOR / 2, 10)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel(
        "worst entry over the rule's samples: error / allowed = min(relative / tol, absolute / floor)"
        f"  (0 drawn at {FLOOR:.0e}, marked 0)",
        fontsize=9,
    )
    ax.set_title("manualgrad: hand-derived backward rules as the checker judges them", fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -1.1 / len(names) - 0.02), fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def output_path(argv: Sequence[str] | None = None) -> Path:
    """Where the figure goes: ``--update``, the committed figure; ``--out PATH``; else a
    temporary folder, so that running the script leaves the working tree as it was."""
    parser = argparse.ArgumentParser(description=text.first_line(__doc__))
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="write the figure to this PNG file")
    where.add_argument("--update", action="store_true", help=f"rewrite the committed {COMMITTED.name}")
    args = parser.parse_args(argv)
    if args.update:
        return COMMITTED
    return args.out or Path(tempfile.mkdtemp(prefix="manualgrad_errors_")) / "errors.png"


def main(out: Path, rules: list[str] | None = None) -> Path:
    values = errors(rules)
    path = figure(values, out)
    for series, label in SERIES.items():
        rule, worst = max(values[series].items(), key=lambda kv: kv[1])
        print(f"{label:<45} worst error / allowed {worst:.1e} ({rule})")
    print(f"wrote {path} ({len(registry.rules()) if rules is None else len(rules)} rules)")
    return path


if __name__ == "__main__":
    main(output_path())
