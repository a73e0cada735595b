"""Graded results as rows, their points, and the formats they are written in.

A :class:`Row` is one graded test: one check of a rule's backward (``dense: vjp``), and in the same
form the gradient of one intermediate of a whole-network exercise (``mlp_bn: dbnvar``,
:mod:`~manualgrad.teach.networks`). A :class:`Result` is one submission file: its
rows, the full text report, how long it took and its status: ``graded``, ``error`` (not an exercise,
an unknown rule, a file that does not run), ``timeout`` or ``crashed`` (the grading process died).

Points (:func:`points`): a row's own key in the weights (``"dense: vjp": 3``), else its share of its
group's key (``"dense": 10``, split equally over that rule's rows), else 1.

Formats:

* :func:`gradescope`: Gradescope's ``results.json`` for one submission made of every file graded:
  ``score``, ``execution_time``, ``output`` and ``tests[]`` (``name``, ``score``, ``max_score``,
  ``status`` ``passed``/``failed``, ``output``, ``visibility``), one test per row.
* :func:`to_json`: this project's schema :data:`SCHEMA`, one record per submission::

      {"schema": "manualgrad-grade/1", "dtype": "float64", "passed": bool, "score": float, "max_score": float,
       "submissions": [{"file", "rule", "status", "passed", "score", "max_score", "seconds", "report",
                        "tests": [{"name", "group", "test", "passed", "score", "max_score", "output"}]}]}

* :func:`junit`: JUnit XML, one ``testsuite`` per submission and one ``testcase`` per row
  (``classname`` the group, ``name`` the test); a row that failed has a ``failure``, a submission
  that could not be graded, timed out or crashed an ``error`` on each of its rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from manualgrad import text
from manualgrad.errors import ManualgradError

SCHEMA = "manualgrad-grade/1"
FORMATS = ("text", "gradescope", "json", "junit")
GRADED, ERROR, TIMEOUT, CRASHED = "graded", "error", "timeout", "crashed"
DEFAULT_TIMEOUT = 600.0  # seconds a submission may take to grade (manualgrad.teach.grading)


class WeightsError(ManualgradError, ValueError):
    """A weights file that cannot be used: missing, not JSON, or not names to points."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One graded test: ``test`` (a check, or an intermediate) of ``group`` (a rule, or a network)."""

    group: str
    test: str
    passed: bool
    output: str

    @property
    def name(self) -> str:
        return f"{self.group}: {self.test}"


@dataclasses.dataclass(frozen=True)
class Result:
    """One submission file graded."""

    file: str
    rule: str  # the rule or network the file is for; "" where it names neither
    status: str
    rows: tuple[Row, ...]
    report: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == GRADED and bool(self.rows) and all(r.passed for r in self.rows)


def load_weights(path: str | pathlib.Path) -> dict[str, float]:
    """A JSON object of names (``RULE`` or ``RULE: CHECK``) to non-negative points."""
    try:
        weights = json.loads(pathlib.Path(path).read_text())
    except OSError as error:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {error.strerror}") from None
    except ValueError as error:
        raise WeightsError(f"weights file {path} is not JSON: {error}") from None
    if not isinstance(weights, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in weights.values()
    ):
        raise WeightsError(
            f'weights file {path} must be one JSON object of names to points ≥ 0, e.g. {{"dense": 10, "relu: vjp": 2}}'
        )
    return {str(k): float(v) for k, v in weights.items()}


def points(result: Result, weights: dict[str, float]) -> list[float]:
    """Each row's points: its own weight, else its share of its group's, else 1."""
    groups = {r.group: sum(1 for s in result.rows if s.group == r.group and s.name not in weights) for r in result.rows}
    return [
        weights[r.name] if r.name in weights else weights[r.group] / groups[r.group] if r.group in weights else 1.0
        for r in result.rows
    ]


def _scored(result: Result, weights: dict[str, float]) -> list[tuple[Row, float, float]]:
    """``(row, score, max_score)`` for each row."""
    return [(r, p if r.passed else 0.0, p) for r, p in zip(result.rows, points(result, weights))]


def totals(result: Result, weights: dict[str, float]) -> tuple[float, float]:
    scored = _scored(result, weights)
    return sum(s for _, s, _ in scored), sum(m for _, _, m in scored)


def gradescope(results: Sequence[Result], weights: dict[str, float]) -> dict[str, Any]:
    """Gradescope's results format, the files graded together being one student's submission."""
    tests = [
        {
            "name": row.name,
            "score": score,
            "max_score": top,
            "status": "passed" if row.passed else "failed",
            "output": row.output,
            "visibility": "visible",
        }
        for result in results
        for row, score, top in _scored(result, weights)
    ]
    return {
        "score": sum(t["score"] for t in tests),
        "execution_time": round(sum(r.seconds for r in results), 3),
        "output": "\n\n".join(r.report for r in results),
        "tests": tests,
    }


def to_json(results: Sequence[Result], weights: dict[str, float], dtype: str) -> dict[str, Any]:
    """This project's schema (:data:`SCHEMA`), one record per submission."""
    submissions = []
    for result in results:
        score, top = totals(result, weights)
        submissions.append(
            {
                "file": result.file,
                "rule": result.rule,
                "status": result.status,
                "passed": result.passed,
                "score": score,
                "max_score": top,
                "seconds": round(result.seconds, 3),
                "report": result.report,
                "tests": [
                    {
                        "name": row.name,
                        "group": row.group,
                        "test": row.test,
                        "passed": row.passed,
                        "score": s,
                        "max_score": m,
                        "output": row.output,
                    }
                    for row, s, m in _scored(result, weights)
                ],
            }
        )
    return {
        "schema": SCHEMA,
        "dtype": dtype,
        "passed": all(r.passed for r in results),
        "score": sum(s["score"] for s in submissions),
        "max_score": sum(s["max_score"] for s in submissions),
        "submissions": submissions,
    }


def junit(results: Sequence[Result]) -> str:
    """JUnit XML: a ``testsuite`` per submission, a ``testcase`` per row."""
    root = ET.Element("testsuites", name="manualgrad grade")
    counts = {"tests": 0, "failures": 0, "errors": 0}
    for result in results:
        errored = result.status != GRADED
        failures = 0 if errored else sum(not r.passed for r in result.rows)
        errors = len(result.rows) if errored else 0
        suite = ET.SubElement(
            root,
            "testsuite",
            name=result.file,
            tests=str(len(result.rows)),
            failures=str(failures),
            errors=str(errors),
            time=f"{result.seconds:.3f}",
        )
        for row in result.rows:
            case = ET.SubElement(suite, "testcase", classname=row.group, name=row.test)
            if errored or not row.passed:
                tag = "error" if errored else "failure"
                ET.SubElement(case, tag, message=text.first_line(row.output) or tag).text = row.output
        ET.SubElement(suite, "system-out").text = result.report
        for key, n in (("tests", len(result.rows)), ("failures", failures), ("errors", errors)):
            counts[key] += n
    root.attrib.update({k: str(v) for k, v in counts.items()})
    root.set("time", f"{sum(r.seconds for r in results):.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def document(results: Sequence[Result], fmt: str, weights: dict[str, float], dtype: str) -> str:
    """The results in ``fmt`` (one of :data:`FORMATS` but ``text``), as the file's text."""
    if fmt == "gradescope":
        return json.dumps(gradescope(results, weights), indent=2) + "\n"
    if fmt == "json":
        return json.dumps(to_json(results, weights, dtype), indent=2) + "\n"
    if fmt == "junit":
        return junit(results)
    raise ValueError(f"results: no document format {fmt!r}; choose from {FORMATS[1:]}")


def summary(results: Sequence[Result], weights: dict[str, float]) -> str:
    """One line per submission: file, rule, score, time, status; and the total."""
    rows = [("file", "rule", "score", "seconds", "status")]
    for result in results:
        score, top = totals(result, weights)
        status = "passed" if result.passed else "failed" if result.status == GRADED else result.status
        rows.append((result.file, result.rule or "-", f"{score:g}/{top:g}", f"{result.seconds:.1f}", status))
    lines = text.table(rows)
    passed = sum(r.passed for r in results)
    lines.append(f"{passed} of {len(results)} submissions passed every test")
    return "\n".join(lines)
