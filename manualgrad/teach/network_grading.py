"""Grading a whole-network exercise (:mod:`~manualgrad.teach.networks`): the student's
``backward(values)`` run on the network's values, each gradient compared with the reference
(``jax.vjp`` of the forward) in backward order: *exact* (bit-equal), *close* (within the checker's
``vjp`` tolerance), the max abs difference and the diagnosis of a wrong one. A backward that uses
autodiff or the reference gradients is not by hand and scores 0.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from manualgrad import text
from manualgrad.check import comparison, diagnose
from manualgrad.check.tolerances import ATOL, TOLERANCES
from manualgrad.teach import exercise, networks, results
from manualgrad.teach.networks import Network, numerics, order, reference, users


def network_of(path: str | pathlib.Path) -> Network:
    """The network the exercise file at ``path`` is for, read from its first line (nothing runs)."""
    title = exercise.title_of(path)
    if not title.startswith(exercise.NETWORK):
        raise exercise.ExerciseError(f"{path} is not a network exercise (it is for {title!r})")
    try:
        return networks.network(title[len(exercise.NETWORK) :].strip())
    except KeyError as error:
        raise exercise.ExerciseError(f"{path} is for {error.args[0]}") from None


def is_network_file(path: str | pathlib.Path) -> bool:
    """Whether the exercise file at ``path`` is for a network (nothing runs; ``False`` for no exercise file)."""
    try:
        return exercise.title_of(path).startswith(exercise.NETWORK)
    except exercise.ExerciseError:
        return False


def grade(path: str | pathlib.Path, dtype: str = "float64", shown: str | None = None) -> results.Result:
    """The graded network exercise file at ``path`` (named ``shown`` in the report, default
    ``path``): one row per gradient in backward order, the report's text, the time it took."""
    start = time.perf_counter()
    net = network_of(path)
    module = exercise.load_module(path, f"{exercise.NETWORK}{net.name}")
    if not callable(getattr(module, "backward", None)):
        raise exercise.ExerciseError(f"{path} defines no backward function")
    source = pathlib.Path(path).read_text(errors="replace")
    text, rows = grade_module(net, module, source, shown or str(path), dtype)
    return results.Result(shown or str(path), net.name, results.GRADED, rows, text, time.perf_counter() - start)


def forbidden() -> dict[int, tuple[Any, str, str]]:
    """What a network's hand backward may not use (:func:`manualgrad.teach.exercise.forbidden`),
    and the reference gradients of this module."""
    out = exercise.forbidden(None)
    for f in (networks.reference, networks.gradients):
        out[id(f)] = (f, f"{networks.__name__}.{f.__name__}", "manualgrad's reference gradients")
    return out


@dataclasses.dataclass(frozen=True)
class Graded:
    """One gradient graded: the cells of its line of the table, and its row."""

    name: str
    exact: bool
    close: bool
    max_abs: float | None  # None where it cannot be compared (missing, not an array, wrong shape)
    diagnosis: str
    output: str


def grade_module(net: Network, module: Any, source: str, shown: str, dtype: str) -> tuple[str, tuple[results.Row, ...]]:
    """Grades the ``backward`` of ``module`` (anything with that attribute and the namespace it was
    defined in), ``source`` its code: the report and one row per gradient, in backward order."""
    graded = order(net)
    head = f"grading your backward for network {net.name} ({shown}), {dtype}: {len(graded)} gradients in backward order"
    calls = exercise.autodiff_in(forbidden(), module, source)
    if calls:
        why = "not a hand backward: " + "; ".join(calls)
        lines = [
            f"{head}: not by hand, not graded",
            "your backward uses JAX's autodiff or manualgrad's own gradients instead of gradients derived by hand:",
            *(f"  {line}" for line in calls),
            f"score: 0/{len(graded)} gradients right",
        ]
        return "\n".join(lines), tuple(results.Row(net.name, f"d{n}", False, why) for n in graded)
    cells, failure = _graded_all(net, module.backward, dtype)
    return _report(net, head, cells, failure), tuple(
        results.Row(net.name, f"d{c.name}", c.close, c.output) for c in cells
    )


def _graded_all(net: Network, backward: Callable[..., Any], dtype: str) -> tuple[list[Graded], str]:
    """Every gradient of ``backward`` graded, in backward order, and why none could be (or ``""``)."""
    vals, grads = reference(net.name, dtype)
    with numerics():  # the student's gradients, and the diagnoses' candidates, in float64 where asked
        received, failure = _call(backward, vals)
        cells = [
            _graded(
                net,
                n,
                vals,
                grads,
                dtype,
                failure or ("" if n in received else f"backward's dict has no {n!r}"),
                received.get(n),
            )
            for n in order(net)
        ]
    wrong = next((c for c in cells if not c.close), None)
    return [_after(c, wrong) if wrong and i > cells.index(wrong) else c for i, c in enumerate(cells)], failure


def _report(net: Network, head: str, cells: list[Graded], failure: str) -> str:
    """The table, the score, and where the backward first goes wrong (or why it did not run)."""
    right = [c for c in cells if c.close]
    exact = sum(c.exact for c in cells)
    lines = [head, *_table(cells)]
    lines.append(f"score: {len(right)}/{len(cells)} gradients right ({exact} exact, {len(right) - exact} close)")
    wrong = next((c for c in cells if not c.close), None)
    if failure:
        lines.append(failure)
    elif wrong is None:
        lines.append("every gradient is right: each one bit-equal to jax.vjp of the forward, or within float round-off")
    else:
        uses = "; ".join(f"{s.name} = {s.code}" for s in users(net, wrong.name))
        above = "every gradient above it is right" if cells.index(wrong) else "it is the first in backward order"
        lines.append(f"first wrong: d{wrong.name}, the gradient of {wrong.name}, used by {uses}; {above}")
    if wrong is not None:
        lines.append(f"reread: {net.seed_text}")
    return "\n".join(lines)


def _after(cell: Graded, first: Graded) -> Graded:
    """A wrong gradient below the first wrong one that no mistake explains: it may only carry that one's error."""
    if cell.close or cell.diagnosis != diagnose.NO_EXPLANATION:
        return cell
    carried = f"{cell.diagnosis}: it may only carry the error of d{first.name} above"
    return dataclasses.replace(cell, diagnosis=carried, output=cell.output.replace(cell.diagnosis, carried))


def _call(backward: Callable[..., Any], vals: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``(the student's gradients by name, "")``, or ``({}, why not)``: the backward raised
    (where in its file) or returned something else than a dict."""
    try:
        out = backward(dict(vals))
    except Exception as error:  # the student's code: its error in one line, every gradient not run
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == backward.__code__.co_filename]
        where = f" at line {frames[-1].lineno}" if frames else ""
        return {}, f"not run: your backward raised {type(error).__name__}{where}: {text.first_line(error)}"
    if not isinstance(out, dict):
        what = "None" if out is None else type(out).__name__
        return (
            {},
            f"not run: your backward returned {what}: it must return a dict of gradients by name, "
            "as its return statement is written",
        )
    return out, ""


def _graded(
    net: Network, name: str, vals: dict[str, Any], grads: dict[str, Any], dtype: str, failure: str | None, value: Any
) -> Graded:
    """Gradient ``name`` graded: ``value`` (the student's) against the reference ``grads[name]``."""
    right = np.asarray(grads[name])
    if failure:
        return Graded(name, False, False, None, failure, failure)
    if value is None:
        return Graded(name, False, False, None, "not computed yet (None)", f"d{name} is None: not computed yet")
    try:
        mine = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        why = f"d{name} is {type(value).__name__}, not an array of numbers"
        return Graded(name, False, False, None, why, why)
    extra = [(m.text, m.wrong(vals, grads)) for m in net.mistakes if m.name == name]
    if mine.shape != right.shape:
        diagnosis = diagnose.diagnose_array(mine, right, vals, dtype, extra)
        output = f"wrong shape {mine.shape}, expected {right.shape}: {diagnosis}"
        return Graded(name, False, False, None, f"wrong shape {mine.shape}: {diagnosis}", output)
    finding = comparison.compare(
        net.name, "vjp", dtype, "fixed inputs", f"d{name}", mine, right, TOLERANCES[dtype]["vjp"], ATOL[dtype]
    )
    exact = bool(np.array_equal(mine, right.astype(np.float64)))
    if finding.passed:
        return Graded(
            name,
            exact,
            True,
            finding.max_abs_error,
            "",
            "exact" if exact else f"close: max abs difference {finding.max_abs_error:.1e}",
        )
    diagnosis = diagnose.diagnose_array(mine, right, vals, dtype, extra)
    output = (
        f"wrong: {finding.mismatches} of {finding.size} entries differ, "
        f"max abs difference {finding.max_abs_error:.3g}; "
        f"worst at {finding.where}: expected {finding.expected:.6g}, received {finding.received:.6g}; {diagnosis}"
    )
    return Graded(name, False, False, finding.max_abs_error, diagnosis, output)


def _table(cells: list[Graded]) -> list[str]:
    """The rows as an aligned table: gradient, exact, close, max abs difference, diagnosis."""
    rows = [("gradient", "exact", "close", "max abs diff", "diagnosis")]
    for c in cells:
        diff = "-" if c.max_abs is None else "0" if c.max_abs == 0 else f"{c.max_abs:.1e}"
        rows.append((f"d{c.name}", "yes" if c.exact else "no", "yes" if c.close else "NO", diff, c.diagnosis))
    return text.table(rows, indent="  ")
