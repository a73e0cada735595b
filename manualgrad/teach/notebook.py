"""Exercises as Jupyter notebooks (nbformat 4), graded in place or by ``manualgrad grade``.

:func:`notebook` lays an exercise (:func:`manualgrad.teach.exercise.parts`) out as cells: the
derivation as Markdown, its maths as LaTeX (:func:`latex`) that Jupyter renders; the imports and
the forward as code; the empty backward; and a last cell that grades the backward in place
(:func:`grade_here`). The notebook's metadata names its rule. :func:`grade` grades a saved
notebook: its code cells but the last, in order, as one exercise file.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import tempfile
import types
from typing import Any

import nbformat

from manualgrad import registry
from manualgrad.teach import exercise, results

KEY = "manualgrad"  # the notebook's metadata[KEY]["rule"]; a cell's metadata[KEY] is its role
NOTEBOOK_GRADING = (
    "run the last cell, which grades it in place (or `manualgrad grade` on the saved notebook)",
    "then run the notebook's last cell",
)

# Unicode maths as the docstrings write it, in LaTeX.
SYMBOLS = {
    "∂": r"\partial ",
    "⊙": r"\odot ",
    "ᵀ": r"^{\top}",
    "·": r"\cdot ",
    "×": r"\times ",
    "∈": r"\in ",
    "Σ": r"\sum ",
    "∏": r"\prod ",
    "⟨": r"\langle ",
    "⟩": r"\rangle ",
    "≈": r"\approx ",
    "≤": r"\le ",
    "≥": r"\ge ",
    "≠": r"\ne ",
    "→": r"\to ",
    "⇒": r"\Rightarrow ",
    "∘": r"\circ ",
    "⊗": r"\otimes ",
    "√": r"\sqrt ",
    "∞": r"\infty ",
    "−": "-",
    "‖": r"\| ",
    "…": r"\dots ",
    "ε": r"\varepsilon ",
    "ℓ": r"\ell ",
    "∇": r"\nabla ",
    **{
        g: f"\\{n} "
        for g, n in zip(
            "αβγδζηθικλμνξπρστφχψωΓΔΘΛΞΠΦΨΩ",
            "alpha beta gamma delta zeta eta theta iota kappa lambda mu nu xi pi rho sigma tau phi chi psi "
            "omega Gamma Delta Theta Lambda Xi Pi Phi Psi Omega".split(),
        )
    },
}
SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺ⁿ", "0123456789-+n"))
SUBSCRIPTS = dict(zip("₀₁₂₃₄₅₆₇₈₉ᵢⱼₖₘₙ", "0123456789ijkmn"))
MATHS = set(SYMBOLS) | set(SUPERSCRIPTS) | set(SUBSCRIPTS) | set("=^_/")
_SPAN = re.compile(r"``(.+?)``")


def latex(expression: str) -> str:
    """A docstring's Unicode expression in LaTeX, e.g. ``dx = G Wᵀ`` → ``dx = G W^{\\top}``:
    symbols by :data:`SYMBOLS`, runs of super- and subscript characters as ``^{…}`` and ``_{…}``."""
    out, i = [], 0
    while i < len(expression):
        c = expression[i]
        for table, mark in ((SUPERSCRIPTS, "^"), (SUBSCRIPTS, "_")):
            if c in table:
                j = i
                while j < len(expression) and expression[j] in table:
                    j += 1
                out.append(mark + "{" + "".join(table[x] for x in expression[i:j]) + "}")
                i = j
                break
        else:
            out.append(SYMBOLS.get(c, "\\" + c if c in "$%&#" else c))
            i += 1
    return "".join(out)


def markdown(text: str) -> str:
    """A docstring's derivation as Markdown: ``spans`` with maths in them as ``$…$``, the others as
    code; indented lines (displayed formulas) as ``$$…$$``."""

    def span(match: re.Match) -> str:
        inner = match[1]
        return f"${latex(inner).strip()}$" if set(inner) & MATHS else f"`{inner}`"

    lines = []
    for line in text.splitlines():
        if line.startswith("    ") and line.strip():
            lines.append(f"$${latex(line.strip()).strip()}$$")
        else:
            lines.append(_SPAN.sub(span, line))
    return "\n".join(lines)


def notebook(name: str) -> nbformat.NotebookNode:
    """Rule ``name``'s exercise as a notebook: derivation, forward, empty backward, grading cell."""
    p = exercise.parts(name, NOTEBOOK_GRADING)
    reread = "\n".join(f"* {s}" for s in p.seeds)
    cells = [
        nbformat.v4.new_markdown_cell(
            f"# Exercise: the backward rule of `{p.rule.name}`\n\n{markdown(p.derivation)}\n\n"
            f"{markdown(p.task)}\n\n**Reread:**\n\n{reread}",
            metadata={KEY: "derivation"},
        ),
        nbformat.v4.new_code_cell(p.imports + "\n\n" + p.forward, metadata={KEY: "forward"}),
        nbformat.v4.new_code_cell(p.backward, metadata={KEY: "backward"}),
        nbformat.v4.new_code_cell(
            f"from manualgrad.teach import notebook\n\nnotebook.grade_here({p.rule.name!r}, globals())",
            metadata={KEY: "grade"},
        ),
    ]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata[KEY] = {"rule": p.rule.name}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def write(name: str, path: str | pathlib.Path) -> None:
    """Writes rule ``name``'s notebook to ``path``."""
    nbformat.write(notebook(name), str(path))


def _read(path: str | pathlib.Path) -> tuple[str, str]:
    """``(rule name, source)`` of a saved exercise notebook: every code cell but the grading one, in
    order, each headed by its number; IPython's ``%``/``!`` lines commented out."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise exercise.ExerciseError(f"no file {str(path)!r}")
    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as error:  # nbformat raises JSON, schema and OS errors of its own kinds
        first = str(error).splitlines()[0] if str(error) else ""
        raise exercise.ExerciseError(f"{path} is not a notebook: {type(error).__name__}: {first}") from None
    rule = nb.metadata.get(KEY, {}).get("rule") if isinstance(nb.metadata.get(KEY), dict) else None
    if not rule:
        raise exercise.ExerciseError(
            f"{path} is not an exercise notebook (its metadata names no rule; "
            "write one with `manualgrad exercise RULE --notebook`)"
        )
    code = [
        f"# cell {i}\n" + re.sub(r"(?m)^(\s*)([%!])", r"\1# \2", c.source)
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and c.metadata.get(KEY) != "grade"
    ]
    return str(rule), "\n\n".join(code) + "\n"


def rule_name(path: str | pathlib.Path) -> str:
    """The rule a saved exercise notebook is for (:class:`~manualgrad.teach.exercise.ExerciseError` if none)."""
    return _read(path)[0]


def grade(path: str | pathlib.Path, dtype: str = "float64") -> results.Result:
    """Grades a saved exercise notebook as :func:`manualgrad.teach.exercise.grade` grades a file."""
    rule, source = _read(path)
    with tempfile.TemporaryDirectory() as folder:
        file = pathlib.Path(folder) / f"{rule}_notebook.py"
        file.write_text(f"{exercise.HEADER}{rule}\n{source}")
        return exercise.grade(file, dtype, shown=str(path))


def grade_here(rule: str, namespace: dict[str, Any], dtype: str = "float64") -> bool:
    """The notebook's last cell: grades the ``forward`` and ``backward`` defined in the notebook
    (``namespace``, its ``globals()``), prints the report, and says whether every check passed."""
    missing = [f for f in ("forward", "backward") if not callable(namespace.get(f))]
    if missing:
        print(f"grade: this notebook defines no {' or '.join(missing)} function yet: run its cells first")
        return False
    try:
        source = inspect.getsource(namespace["backward"])
    except (TypeError, OSError):
        print("grade: the source of backward cannot be read: save the notebook and run `manualgrad grade` on it")
        return False
    module = types.SimpleNamespace(**namespace)
    text, rows = exercise.grade_module(registry.get(rule), module, source, "this notebook", dtype)
    print(text)
    return all(r.passed for r in rows)
