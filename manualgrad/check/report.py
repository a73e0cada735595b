"""The result of a check: one :class:`Finding` per comparison, gathered in a :class:`Report`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from manualgrad.check.tolerances import CHECKS
from manualgrad.text import table

# Finding.where of a check that could not run on a sample (it raised): a failure of that check.
NOT_RUN = "not run"
# Finding.where of a check that cannot apply to a function (nothing in it is linear, JAX cannot
# differentiate its backward, finite differences cannot resolve its dtype): neither passed nor failed.
NOT_APPLICABLE = "not applicable"


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
    # Judged against a float64 golden (manualgrad.check.golden): the reference's own error against it
    # (max_abs_error is the function's), and the absolute error allowed. NaN elsewhere.
    err_ref: float = np.nan
    allowed: float = np.nan

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

    @classmethod
    def not_applicable(
        cls, rule: str, check: str, dtype: str, sample: str, why: str, *, argument: str = "(all)"
    ) -> Finding:
        """``check`` cannot apply to this function, for the reason the sentence ``why`` gives: it
        counts neither as a pass nor as a failure (:attr:`status`)."""
        return cls(
            rule=rule,
            check=check,
            dtype=dtype,
            sample=sample,
            argument=argument,
            max_abs_error=np.nan,
            max_rel_error=np.nan,
            tolerance=np.nan,
            mismatches=0,
            size=0,
            where=NOT_APPLICABLE,
            note=why,
        )

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"`` or ``"not applicable"``."""
        if self.where == NOT_APPLICABLE:
            return NOT_APPLICABLE
        return "passed" if self.mismatches == 0 else "failed"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def golden(self) -> bool:
        """Judged against a float64 golden (:mod:`~manualgrad.check.golden`)."""
        return not np.isnan(self.err_ref)

    @property
    def ratio(self) -> float:
        """``err_fn / err_ref`` of a golden comparison (``inf`` where the reference is exact and the
        function is not, NaN where both are exact or the finding is no golden comparison)."""
        if not self.golden or (self.max_abs_error == 0 and self.err_ref == 0):
            return np.nan
        return self.max_abs_error / self.err_ref if self.err_ref > 0 else np.inf

    def describe(self) -> str:
        head = f"{self.rule}, argument {self.argument}, sample {self.sample!r}, {self.check} ({self.dtype})"
        if self.where == NOT_APPLICABLE:
            return f"{head}: not applicable: {self.note}"
        if self.golden and self.where != NOT_RUN:
            return self._describe_golden(head)
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

    def _describe_golden(self, head: str) -> str:
        errors = (
            f"error {self.max_abs_error:.2e} against the float64 golden, the reference's {self.err_ref:.2e} "
            f"(ratio {self.ratio:.3g}), allowed {self.allowed:.2e}"
        )
        if self.passed:
            return f"{head}: ok, {errors}" + (f"; {self.note}" if self.note else "")
        return (
            f"{head}: {errors}; worst at {self.where}: golden {self.expected:.6g}, received {self.received:.6g}"
            + (f"; {self.note}" if self.note else "")
            + (f"; {self.diagnosis}" if self.diagnosis else "")
        )


@dataclasses.dataclass
class Report:
    """Every :class:`Finding` of one :func:`check` call; ``seconds`` of wall time, of which
    ``compile_seconds`` went to building programs (:mod:`~manualgrad.check.timing`); ``notes``,
    sentences about the whole check (what a function was judged against)."""

    dtype: str
    findings: list[Finding]
    seconds: float
    compile_seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def run_seconds(self) -> float:
        return max(self.seconds - self.compile_seconds, 0.0)

    def timing(self) -> str:
        """E.g. ``21.3 s (compile 15.2 s, run 6.1 s)``."""
        return f"{self.seconds:.1f} s (compile {self.compile_seconds:.1f} s, run {self.run_seconds:.1f} s)"

    @property
    def passed(self) -> bool:
        """No finding failed (one not applicable is no failure)."""
        return not any(f.failed for f in self.findings)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failed]

    def not_applicable(self) -> list[Finding]:
        return [f for f in self.findings if f.status == NOT_APPLICABLE]

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
        """The worst finding per (rule, check): a failing one first, then the largest error; one
        not applicable only where the check applied nowhere."""
        out: dict[tuple[str, str], Finding] = {}

        def rank(f: Finding) -> tuple[int, float]:
            return (f.failed - (f.status == NOT_APPLICABLE), -np.inf if np.isnan(f.max_rel_error) else f.max_rel_error)

        for f in self.findings:
            key = (f.rule, f.check)
            old = out.get(key)
            if old is None or rank(f) > rank(old):
                out[key] = f
        return out

    def counts(self) -> dict[str, int]:
        """How many (rule, check) pairs passed, failed and were not applicable, by :attr:`Finding.status`
        of their :meth:`worst` finding."""
        statuses = [f.status for f in self.worst().values()]
        return {status: statuses.count(status) for status in ("passed", "failed", NOT_APPLICABLE)}

    def summary(self) -> str:
        """E.g. ``5 passed, 1 failed, 2 not applicable in 3.2 s (compile 2.1 s, run 1.1 s)``."""
        n = self.counts()
        return f"{n['passed']} passed, {n['failed']} failed, {n[NOT_APPLICABLE]} not applicable in {self.timing()}"

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per rule and check; a check judged against the golden also lists,
        per argument, the function's error, the reference's and their ratio. A number that is not
        finite (a check not run, not applicable, an exact reference) is ``None``: strict JSON has none."""
        return [
            {
                "rule": f.rule,
                "check": f.check,
                "dtype": f.dtype if f.golden else self.dtype,
                "status": f.status,
                "passed": f.status == "passed",
                "max_rel_error": _finite(f.max_rel_error),
                "max_abs_error": _finite(f.max_abs_error),
                "tolerance": _finite(f.tolerance),
                "worst_sample": f.sample,
                "worst_argument": f.argument,
                "detail": f.describe(),
                **({"arguments": [_golden_record(g) for g in self._of(*key)]} if f.golden else {}),
            }
            for key, f in self.worst().items()
        ]

    def text(self, heading: str) -> str:
        """The report as ``manualgrad check`` prints it: ``heading``, the table, then one line per
        note (``NOTE``), failure (``FAIL``), check not applicable (``N/A``) and diagnosis
        (``DIAGNOSIS``), and the :meth:`summary`."""
        lines = [heading, self.table(), *("NOTE " + note for note in self.notes)]
        lines += ["FAIL " + f.describe() for f in self.failures()]
        lines += ["N/A " + f.describe() for f in self.not_applicable()]
        lines += ["DIAGNOSIS " + line for line in self.diagnoses()]
        return "\n".join([*lines, self.summary()])

    def _of(self, rule: str, check: str) -> list[Finding]:
        return [f for f in self.findings if (f.rule, f.check) == (rule, check)]

    def table(self) -> str:
        """One row per rule, one column per check: the worst relative error and ``ok``, ``FAIL`` or
        ``n/a``; for a function judged against the golden, one row per check and argument instead,
        with both errors and their ratio (:meth:`golden_table`)."""
        if any(f.golden for f in self.findings):
            return self.golden_table()
        worst = self.worst()
        names = list(dict.fromkeys(f.rule for f in self.findings))
        checks = [c for c in CHECKS if any(k[1] == c for k in worst)]

        def cell(f: Finding | None) -> str:
            if f is None:
                return "-"
            if f.status == NOT_APPLICABLE:
                return "n/a"
            return f"{f.max_rel_error:>9.1e} {'ok' if f.passed else 'FAIL':>3}"

        rows = [["rule", *checks], *([name, *(cell(worst.get((name, c))) for c in checks)] for name in names)]
        return "\n".join(table(rows, align="<" + ">" * len(checks)))

    def golden_table(self) -> str:
        """One row per finding: check, argument, dtype, ``err_fn`` and ``err_ref`` against the
        float64 golden, their ratio, the error allowed and the verdict."""
        rows = [["check", "argument", "dtype", "err_fn", "err_ref", "ratio", "allowed", ""]]
        for f in self.findings:
            if f.golden and f.where != NOT_RUN:
                numbers = [f"{f.max_abs_error:.2e}", f"{f.err_ref:.2e}", f"{f.ratio:.3g}", f"{f.allowed:.2e}"]
            elif f.status == NOT_APPLICABLE or f.where == NOT_RUN:
                numbers = ["-"] * 4
            else:
                numbers = [f"{f.max_abs_error:.2e}", "-", "-", f"rel {f.tolerance:.0e}"]
            verdict = {"passed": "ok", "failed": "FAIL", NOT_APPLICABLE: "n/a"}[f.status]
            rows.append([f.check, f.argument, f.dtype, *numbers, verdict])
        return "\n".join(table(rows, align="<<<>>>><"))


def _golden_record(f: Finding) -> dict[str, Any]:
    return {
        "argument": f.argument,
        "status": f.status,
        "err_fn": _finite(f.max_abs_error),
        "err_ref": _finite(f.err_ref),
        "ratio": _finite(f.ratio),
        "allowed": _finite(f.allowed),
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
