"""One picture of every rule's accuracy: the hand rule's error against jax.grad and finite differences.

For every registered rule, the worst relative error over its samples of

- the hand VJP against ``jax.vjp`` of the plain-``jnp`` reference (check ``vjp``), and
- the hand VJP against central finite differences in float64 (check ``finite_diff``),

in float32 and float64, on a log scale, with the tolerances the checker enforces drawn in.
Float64 against ``jax.grad`` sits at round-off (~1e-16); float32 at ~1e-7; finite differences
are limited by their own truncation and cancellation error (~1e-10 … 1e-7), whatever the dtype.

Run: ``python comparisons/error_figure.py [--out comparisons/errors.png]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from manualgrad import registry  # noqa: E402
from manualgrad.check import checker  # noqa: E402

FLOOR = 1e-18  # an error of exactly 0 is drawn here, so it shows on the log scale
SERIES = [("vjp", "float64"), ("vjp", "float32"), ("finite_diff", "float64"), ("finite_diff", "float32")]
LABELS = {"vjp": "vs jax.grad", "finite_diff": "vs finite differences"}


def errors(rules: list[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """``{(check, dtype): {rule: worst relative error}}`` from two checker runs."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for dtype in ("float64", "float32"):
        report = checker.check(rules, dtype=dtype, checks=("vjp", "finite_diff"))
        assert report.passed, "\n".join(f.describe() for f in report.failures())
        for (rule, check), finding in report.worst().items():
            out.setdefault((check, dtype), {})[rule] = finding.max_rel_error
    return out


def figure(values: dict[tuple[str, str], dict[str, float]], out: Path) -> Path:
    names = list(next(iter(values.values())))
    y = np.arange(len(names))
    height = 0.8 / len(SERIES)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.5))
    for i, (check, dtype) in enumerate(SERIES):
        errs = [max(values[(check, dtype)][n], FLOOR) for n in names]
        ax.barh(y + (i - 1.5) * height, errs, height, label=f"{dtype} {LABELS[check]}")
    for dtype, style in (("float64", ":"), ("float32", "--")):
        ax.axvline(checker.TOLERANCES[dtype]["vjp"], color="gray", linestyle=style, linewidth=1,
                   label=f"{dtype} tolerance vs jax.grad")
    ax.set_xscale("log")
    ax.set_xlim(FLOOR / 2, 1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("worst relative error over the rule's samples (0 drawn at 1e-18)")
    ax.set_title("manualgrad: hand-derived backward rules against jax.grad and finite differences")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(out: Path = Path(__file__).with_name("errors.png"), rules: list[str] | None = None) -> Path:
    values = errors(rules)
    path = figure(values, out)
    for check, dtype in SERIES:
        worst = max(values[(check, dtype)].items(), key=lambda kv: kv[1])
        print(f"{dtype} {LABELS[check]:<22} worst {worst[1]:.1e} ({worst[0]})")
    print(f"wrote {path} ({len(registry.rules()) if rules is None else len(rules)} rules)")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("errors.png"))
    main(parser.parse_args().out)
