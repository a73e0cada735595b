"""The result of a check: one :class:`Finding` per comparison, gathered in a :class:`Report`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from manualgrad.check.tolerances import CHECKS
from manualgrad.text import table

# Finding.where of a check that could not run on a sample (it raised): a failure of that check.
NOT_RUN = "not run"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One comparison: a rule, a check, a sample and an argument (or the output)."""

    rule: str
    check: str
    dtype: str
    sample: str
    argument: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    mismatches: int
    size: int
    where: str = ""
    expected: float = 0.0
    received: float = 0.0
    note: str = ""
    diagnosis: str = ""  # for a failing vjp check: the usual mistake that explains it (manualgrad.check.diagnose)
    # Entry-by-entry comparisons (comparison.compare): the worst entry's error over the error allowed it,
    # min(relative / tolerance, absolute / atol); above 1 exactly where an entry fails. NaN elsewhere.
    error_over_allowed: float = np.nan

    @classmethod
    def not_run(
        cls, rule: str, check: str, dtype: str, sample: str, note: str, *, argument: str = "(all)", tolerance: float
    ) -> Finding:
        """``check`` could not run on ``sample`` (it raised, or the code never reached the rule): a
        failure of that check, its ``note`` saying why."""
        return cls(
            rule=rule,
            check=check,
            dtype=dtype,
            sample=sample,
            argument=argument,
            max_abs_error=np.inf,
            max_rel_error=np.inf,
            tolerance=tolerance,
            mismatches=1,
            size=1,
            where=NOT_RUN,
            note=note,
        )

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    def describe(self) -> str:
        head = f"{self.rule}, argument {self.argument}, sample {self.sample!r}, {self.check} ({self.dtype})"
        if self.passed:
            return f"{head}: ok, worst relative error {self.max_rel_error:.1e}"
        if self.where == NOT_RUN:
            return f"{head}: not run: {self.note}" + (f"; {self.diagnosis}" if self.diagnosis else "")
        if self.check == "adjoint":
            return (
                f"{head}: ⟨C(u), y⟩ = {self.expected:.6g} but Σ ⟨u, C†(y)⟩ = {self.received:.6g}, "
                f"mismatch {self.max_rel_error:.2e} > {self.tolerance:.0e}"
            )
        return (
            f"{head}: {self.mismatches} of {self.size} entries differ beyond {self.tolerance:.0e}; "
            f"worst at {self.where}: expected {self.expected:.6g}, received {self.received:.6g} "
            f"(relative error {self.max_rel_error:.2e})"
            + (f"; {self.note}" if self.note else "")
            + (f"; {self.diagnosis}" if self.diagnosis else "")
        )


@dataclasses.dataclass
class Report:
    """Every :class:`Finding` of one :func:`check` call; ``seconds`` of wall time, of which
    ``compile_seconds`` went to building programs (:mod:`~manualgrad.check.timing`)."""

    dtype: str
    findings: list[Finding]
    seconds: float
    compile_seconds: float = 0.0

    @property
    def run_seconds(self) -> float:
        return max(self.seconds - self.compile_seconds, 0.0)

    def timing(self) -> str:
        """E.g. ``21.3 s (compile 15.2 s, run 6.1 s)``."""
        return f"{self.seconds:.1f} s (compile {self.compile_seconds:.1f} s, run {self.run_seconds:.1f} s)"

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.passed]

    def diagnoses(self) -> list[str]:
        """One line per (rule, argument) with a diagnosed failure, e.g. ``dense, argument w: your
        gradient equals the right one transposed``; samples are named where they disagree."""
        by_argument: dict[tuple[str, str], dict[str, list[str]]] = {}
        for f in self.failures():
            if f.diagnosis:
                by_argument.setdefault((f.rule, f.argument), {}).setdefault(f.diagnosis, []).append(f.sample)
        lines = []
        for (rule, argument), texts in by_argument.items():
            for text, samples in texts.items():
                where = f" (samples {', '.join(map(repr, samples))})" if len(texts) > 1 else ""
                lines.append(f"{rule}, argument {argument}: {text}{where}")
        return lines

    def worst(self) -> dict[tuple[str, str], Finding]:
        """The worst finding per (rule, check): a failing one first, then the largest error."""
        out: dict[tuple[str, str], Finding] = {}
        for f in self.findings:
            key = (f.rule, f.check)
            old = out.get(key)
            if old is None or (not f.passed, f.max_rel_error) > (not old.passed, old.max_rel_error):
                out[key] = f
        return out

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per rule and check."""
        return [
            {
                "rule": f.rule,
                "check": f.check,
                "dtype": self.dtype,
                "passed": all(g.passed for g in self.findings if (g.rule, g.check) == key),
                "max_rel_error": f.max_rel_error,
                "max_abs_error": f.max_abs_error,
                "tolerance": f.tolerance,
                "worst_sample": f.sample,
                "worst_argument": f.argument,
                "detail": f.describe(),
            }
            for key, f in self.worst().items()
        ]

    def table(self) -> str:
        """One row per rule, one column per check: the worst relative error and ``ok`` or ``FAIL``."""
        worst = self.worst()
        names = list(dict.fromkeys(f.rule for f in self.findings))
        checks = [c for c in CHECKS if any(k[1] == c for k in worst)]

        def cell(f: Finding | None) -> str:
            return "-" if f is None else f"{f.max_rel_error:>9.1e} {'ok' if f.passed else 'FAIL':>3}"

        rows = [["rule", *checks], *([name, *(cell(worst.get((name, c))) for c in checks)] for name in names)]
        return "\n".join(table(rows, align="<" + ">" * len(checks)))
