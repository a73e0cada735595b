"""Grading submissions, each in a process of its own with a time limit.

Grading runs the student's code. :func:`grade_files` grades each file in a new Python process
(``python -m manualgrad.teach.grading FILE DTYPE RESULT``, in the caller's working directory and
a process group of its own), which writes its :class:`~manualgrad.teach.results.Result` as JSON.
A process still running after ``timeout`` seconds is killed with its whole group; one that dies
without a result (the interpreter crashed, the code called ``os._exit``) leaves none. Either way
the submission fails, with one failing row per test of its exercise, and the grader goes on to the
next. A process is not a sandbox: the student's code can read and write what the grader can, so
grade untrusted code in a container (as Gradescope does).

:func:`grade_file` grades one file in the calling process: an exercise file (``.py``) of a rule
or of a whole network (:mod:`~manualgrad.teach.network_grading`), or an exercise notebook (``.ipynb``,
:mod:`~manualgrad.teach.notebook`); a file that cannot be graded is a
:data:`~manualgrad.teach.results.ERROR` result with its one-sentence reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from manualgrad import registry
from manualgrad.errors import ManualgradError
from manualgrad.teach import exercise, network_grading, networks, notebook, results

# The student's own output kept in a failed submission's reason, from its end.
OUTPUT_TAIL = 2000


def rule_name(path: str | pathlib.Path) -> str:
    """The rule or network a submission names (its first line, or a notebook's metadata), or ``""``; nothing runs."""
    try:
        if _is_notebook(path):
            return notebook.rule_name(path)
        if network_grading.is_network_file(path):
            return network_grading.network_of(path).name
        return exercise.rule_of(path).name
    except ManualgradError:  # not an exercise, or a notebook that cannot be read here
        return ""


def tests_of(name: str) -> list[str]:
    """The tests of exercise ``name``: a rule's graded checks, a network's gradients (``dNAME``)
    in backward order; none for a name that is neither."""
    if name in networks.NETWORKS:
        return [f"d{n}" for n in networks.order(networks.network(name))]
    rules = {r.name: r for r in registry.rules()}
    return exercise.graded_checks(rules[name]) if name in rules else []


def how_to_write(name: str) -> str:
    """The command that writes exercise ``name``."""
    return f"manualgrad exercise {'--network ' if name in networks.NETWORKS else ''}{name}"


def _is_notebook(path: str | pathlib.Path) -> bool:
    return pathlib.Path(path).suffix == ".ipynb"


def failed(file: str, rule: str, status: str, reason: str, seconds: float = 0.0) -> results.Result:
    """A submission that was not graded: one failing row per test of its rule or network
    (:func:`tests_of`; one row ``FILE: grade`` where it names none), each with ``reason``."""
    tests = tests_of(rule)
    known = bool(tests)
    rows = tuple(results.Row(rule if known else file, t, False, reason) for t in tests or ["grade"])
    return results.Result(file, rule if known else "", status, rows, f"{file}: {reason}", seconds)


def missing(rule: str) -> results.Result:
    """The result for an expected rule or network that no submitted file is for."""
    reason = f"no file is for {rule}: write it with `{how_to_write(rule)}` and submit it"
    return failed("(no file)", rule, results.ERROR, reason)


def test_names() -> set[str]:
    """Every name a weight may have: each rule and network, and each ``RULE: CHECK`` and ``NETWORK: dNAME``."""
    names = [r.name for r in registry.rules()] + list(networks.NETWORKS)
    return set(names) | {f"{n}: {t}" for n in names for t in tests_of(n)}


def grade_file(path: str | pathlib.Path, dtype: str = "float64") -> results.Result:
    """Grades one submission in this process (it runs the student's code here)."""
    start = time.perf_counter()
    try:
        if _is_notebook(path):
            return notebook.grade(path, dtype)
        grade = network_grading.grade if network_grading.is_network_file(path) else exercise.grade
        return grade(path, dtype)
    except ManualgradError as error:  # an ExerciseError, or the missing nbformat of a notebook
        return failed(str(path), rule_name(path), results.ERROR, str(error), time.perf_counter() - start)


def grade_files(
    paths: Sequence[str | pathlib.Path], dtype: str = "float64", timeout: float = results.DEFAULT_TIMEOUT
) -> list[results.Result]:
    """Grades each submission in a process of its own (:func:`grade_isolated`), one after another."""
    return [grade_isolated(p, dtype, timeout) for p in paths]


def grade_isolated(path: str | pathlib.Path, dtype: str, timeout: float) -> results.Result:
    """:func:`grade_file` in a new process, killed after ``timeout`` seconds; its time is the
    process's, from start to end."""
    shown = str(path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="manualgrad-grade-") as folder:
        out = pathlib.Path(folder) / "result.json"
        command = [sys.executable, "-m", "manualgrad.teach.grading", str(path), dtype, str(out)]
        process = subprocess.Popen(
            command,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            printed, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            reason = f"timed out after {timeout:g} s: the grader stopped your code (does it loop forever?)"
            return failed(shown, rule_name(path), results.TIMEOUT, reason, time.perf_counter() - start)
        if out.is_file():
            result = results.Result(**json.loads(out.read_text()))
            rows = tuple(results.Row(**r) for r in result.rows)
            return dataclasses.replace(result, rows=rows, seconds=time.perf_counter() - start)
    ended = (
        f"was killed by {signal.Signals(-process.returncode).name}"
        if process.returncode < 0
        else f"exited with status {process.returncode}"
    )
    tail = printed.decode(errors="replace")[-OUTPUT_TAIL:].strip()
    reason = f"the grading process {ended} before grading finished: your code crashed it or ended it" + (
        f"; its last output: {tail}" if tail else ""
    )
    return failed(shown, rule_name(path), results.CRASHED, reason, time.perf_counter() - start)


def _environment() -> dict[str, str]:
    """This environment, with this copy of manualgrad first on the child's import path."""
    here = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH", "")]))
    return env


def _main(argv: Sequence[str]) -> int:
    """The grading process: ``FILE DTYPE RESULT``; writes the result as JSON to RESULT."""
    path, dtype, out = argv
    result = grade_file(path, dtype)
    pathlib.Path(out).write_text(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
