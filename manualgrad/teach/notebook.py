"""Exercises as Jupyter notebooks (nbformat 4), graded in place or by ``manualgrad grade``.

:func:`notebook` lays an exercise (:func:`manualgrad.teach.exercise.parts`) out as cells: the
derivation as Markdown, its maths as LaTeX (:func:`latex`) that Jupyter renders; the imports and
the forward as code; the empty backward; and a last cell that grades the backward in place
(:func:`grade_here`). :func:`network_notebook` does the same for a whole-network exercise
(:mod:`~manualgrad.teach.networks`): the forward's steps as a code listing, a cell that puts
every value of the forward in ``values``, the backward to fill in, and a grading cell
(:func:`grade_network_here`). The notebook's metadata names its rule or network. :func:`grade`
grades a saved notebook: its code cells but the last, in order, as one exercise file.

Writing and reading notebooks needs nbformat, from the ``teach`` extra; grading in place does not.
"""

from __future__ import annotations

import inspect
import pathlib
import re
import tempfile
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from manualgrad import extras, registry, text
from manualgrad.teach import exercise, network_grading, networks, results

if TYPE_CHECKING:
    import nbformat

KEY = "manualgrad"  # the notebook's metadata[KEY]["rule"] (or ["network"]); a cell's metadata[KEY] is its role
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
    "½": r"\tfrac{1}{2}",
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


def markdown(text: str, is_maths: Callable[[str], bool] | None = None) -> str:
    """A docstring's derivation as Markdown: ``spans`` with maths in them (:data:`MATHS`, or as
    ``is_maths`` says) as ``$…$``, the others as code; indented lines (displayed formulas) as ``$$…$$``."""

    def span(match: re.Match) -> str:
        inner = match[1]
        maths = is_maths(inner) if is_maths else bool(set(inner) & MATHS)
        return f"${latex(inner).strip()}$" if maths else f"`{inner}`"

    lines = []
    for line in text.splitlines():
        if line.startswith("    ") and line.strip():
            lines.append(f"$${latex(line.strip()).strip()}$$")
        else:
            lines.append(_SPAN.sub(span, line))
    return "\n".join(lines)


def _nbformat(purpose: str) -> types.ModuleType:
    return extras.require("nbformat", "teach", purpose)


def _new(kind: str, name: str, derivation: str, forward: str, backward: str, grade: str) -> nbformat.NotebookNode:
    """A notebook whose metadata names its ``kind`` (``rule`` or ``network``) ``name``, of four
    cells: the ``derivation`` (Markdown), the ``forward`` and the ``backward`` code, and the cell
    that calls ``grade`` (a function of this module's, public as ``mg.NAME``)."""
    nbf = _nbformat("writing a notebook")
    cells = [
        nbf.v4.new_markdown_cell(derivation, metadata={KEY: "derivation"}),
        nbf.v4.new_code_cell(forward, metadata={KEY: "forward"}),
        nbf.v4.new_code_cell(backward, metadata={KEY: "backward"}),
        nbf.v4.new_code_cell(f"import manualgrad as mg\n\nmg.{grade}", metadata={KEY: "grade"}),
    ]
    nb = nbf.v4.new_notebook(cells=cells)
    nb.metadata[KEY] = {kind: name, "format": exercise.FORMAT, "version": exercise.version()}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def notebook(name: str) -> nbformat.NotebookNode:
    """Rule ``name``'s exercise as a notebook: derivation, forward, empty backward, grading cell."""
    p = exercise.parts(name, NOTEBOOK_GRADING)
    reread = "\n".join(f"* {s}" for s in p.seeds)
    return _new(
        "rule",
        p.rule.name,
        f"# Exercise: the backward rule of `{p.rule.name}`\n\n{markdown(p.derivation)}\n\n"
        f"{markdown(p.task)}\n\n**Reread:**\n\n{reread}",
        p.imports + "\n\n" + p.forward,
        p.backward,
        f"grade_here({p.rule.name!r}, globals())",
    )


def write(name: str, path: str | pathlib.Path) -> None:
    """Writes rule ``name``'s notebook to ``path``."""
    _nbformat("writing a notebook").write(notebook(name), str(path))


def _network_maths(span: str) -> bool:
    """A network's text writes code names (``counts_sum_inv``) in spans: maths is what has an ``=`` or is not ASCII."""
    return "=" in span or not span.isascii()


def network_notebook(name: str) -> nbformat.NotebookNode:
    """Network ``name``'s exercise as a notebook: derivation and forward, values, backward, grading cell."""
    p = networks.parts(name, NOTEBOOK_GRADING)
    reread = "\n".join(f"* {s}" for s in p.seeds)
    return _new(
        "network",
        name,
        f"# Exercise: backpropagate `{name}` by hand, every intermediate\n\n{markdown(p.net.title, _network_maths)}"
        f"\n\n{markdown(p.net.about, _network_maths)}\n\nThe forward, on fixed inputs (the grader computes it "
        f"and passes every value to `backward`):\n\n```python\n{p.forward}\n```\n\n"
        f"{markdown(p.task, _network_maths)}\n\n**Reread:**\n\n{reread}",
        f"{p.imports}import manualgrad as mg\n\n"
        f"# every input and intermediate of the forward by name, to look at and to try backward on\n"
        f"values = mg.network_values({name!r})",
        p.backward,
        f"grade_network_here({name!r}, globals())",
    )


def write_network(name: str, path: str | pathlib.Path) -> None:
    """Writes network ``name``'s notebook to ``path``."""
    _nbformat("writing a notebook").write(network_notebook(name), str(path))


def _read(path: str | pathlib.Path) -> tuple[str, str]:
    """``(title, source)`` of a saved exercise notebook: its rule's name or ``network NAME``
    (the first line of an exercise file, :func:`manualgrad.teach.exercise.title_of`), and the
    rest of the file its cells make: the format line where the notebook records its format, then
    every code cell but the grading one, in order, each headed by its number; IPython's ``%``/``!``
    lines commented out."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise exercise.ExerciseError(f"no file {str(path)!r}")
    nbf = _nbformat("grading a notebook")
    try:
        nb = nbf.read(str(path), as_version=4)
    except Exception as error:  # nbformat raises JSON, schema and OS errors of its own kinds
        raise exercise.ExerciseError(
            f"{path} is not a notebook: {type(error).__name__}: {text.first_line(error)}"
        ) from None
    meta = nb.metadata.get(KEY) if isinstance(nb.metadata.get(KEY), dict) else {}
    network = meta.get("network")
    title = f"{exercise.NETWORK}{network}" if network else meta.get("rule")
    if not title:
        raise exercise.ExerciseError(
            f"{path} is not an exercise notebook (its metadata names no rule or network; "
            "write one with `manualgrad exercise RULE --notebook` or `manualgrad exercise --network NAME --notebook`)"
        )
    code = [
        f"# cell {i}\n" + re.sub(r"(?m)^(\s*)([%!])", r"\1# \2", c.source)
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and c.metadata.get(KEY) != "grade"
    ]
    # The format line of the file the cells make; none for a notebook written before notebooks recorded it.
    head = f"{exercise.format_line(meta['format'], meta.get('version', 'unknown'))}\n" if "format" in meta else ""
    return str(title), head + "\n\n".join(code) + "\n"


def rule_name(path: str | pathlib.Path) -> str:
    """The rule or network a saved exercise notebook is for (an ExerciseError if none)."""
    return _read(path)[0].removeprefix(exercise.NETWORK)


def grade(path: str | pathlib.Path, dtype: str = "float64") -> results.Result:
    """Grades a saved exercise notebook as :func:`manualgrad.teach.exercise.grade` (or
    :func:`manualgrad.teach.network_grading.grade`) grades a file."""
    title, source = _read(path)
    with tempfile.TemporaryDirectory() as folder:
        file = pathlib.Path(folder) / f"{title.removeprefix(exercise.NETWORK)}_notebook.py"
        file.write_text(f"{exercise.HEADER}{title}\n{source}")
        grader = network_grading.grade if title.startswith(exercise.NETWORK) else exercise.grade
        try:
            return grader(file, dtype, shown=str(path))
        except exercise.ExerciseError as error:  # said of the notebook, not of the file made from it
            raise exercise.ExerciseError(str(error).replace(str(file), str(path))) from None


def grade_here(rule: str, namespace: dict[str, Any], dtype: str = "float64") -> bool:
    """The notebook's last cell: grades the ``forward`` and ``backward`` defined in the notebook
    (``namespace``, its ``globals()``), prints the report, and says whether every check passed."""
    return _grade_in_place(
        namespace,
        ("forward", "backward"),
        lambda module, source: exercise.grade_module(registry.get(rule), module, source, "this notebook", dtype),
    )


def grade_network_here(name: str, namespace: dict[str, Any], dtype: str = "float64") -> bool:
    """A network notebook's last cell: grades the ``backward`` defined in the notebook
    (``namespace``), prints the table, and says whether every gradient is right."""
    net = networks.network(name)
    return _grade_in_place(
        namespace,
        ("backward",),
        lambda module, source: network_grading.grade_module(net, module, source, "this notebook", dtype),
    )


def _grade_in_place(
    namespace: dict[str, Any],
    needed: tuple[str, ...],
    grade: Callable[[Any, str], tuple[str, tuple[results.Row, ...]]],
) -> bool:
    """Grades the functions of a notebook's namespace with ``grade(module, source of backward)``,
    prints the report, and says whether every test passed."""
    missing = [f for f in needed if not callable(namespace.get(f))]
    if missing:
        print(f"grade: this notebook defines no {' or '.join(missing)} function yet: run its cells first")
        return False
    try:
        source = inspect.getsource(namespace["backward"])
    except (TypeError, OSError):
        print("grade: the source of backward cannot be read: save the notebook and run `manualgrad grade` on it")
        return False
    text, rows = grade(types.SimpleNamespace(**namespace), source)
    print(text)
    return all(r.passed for r in rows)
