"""Exercises: write a rule's backward yourself, then get graded by the checker.

:func:`exercise` writes, for any registered rule, a Python file with the rule's forward
(:mod:`~manualgrad.teach.forwards`: readable on its own, importing only manualgrad's public
names, so that the file survives an upgrade), its docstring's derivation up to the ``Result:``
line, and an empty ``backward`` to fill in. Its second line records the exercise format and the
manualgrad version that wrote it; a file of a format this version cannot grade is refused in one
sentence (:func:`load_module`). :func:`grade` loads such a file,
registers the student's backward as a ``custom_vjp`` beside the real rule (same name, same
samples, same reference) and runs every check of :func:`manualgrad.check` on it, with the
diagnosis of a wrong gradient and the seed sections to reread.

Grading is honest: a check that cannot run on a sample fails on it; the usual slips of the
backward's contract (no ``return``, a bare array or a list for the tuple, the wrong number of
parameters or of cotangents, NumPy on a traced array) are one plain sentence each; and a
backward that calls JAX's autodiff or manualgrad's own backward (:func:`autodiff_calls`) is
not a hand rule and scores 0.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import pathlib
import re
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax

from manualgrad import registry, text, user_code
from manualgrad.check import checker
from manualgrad.check.report import NOT_APPLICABLE
from manualgrad.errors import ManualgradError
from manualgrad.registry import Rule
from manualgrad.teach import forwards, results

HEADER = "# manualgrad exercise: "
NETWORK = "network "  # the title of a whole-network exercise: ``# manualgrad exercise: network NAME``
# The layout of the files this version writes: 1 had no version line and imported manualgrad's
# private modules; 2 imports only public names. A new layout that old graders cannot read bumps it.
FORMAT = 2
_FORMAT_LINE = re.compile(r"# manualgrad exercise format (\d+), written by manualgrad (\S+)")
# JAX's automatic differentiation: none of it belongs in a hand-written backward.
AUTODIFF = ("vjp", "grad", "value_and_grad", "jacrev", "jacfwd", "jvp", "linearize", "hessian", "linear_transpose")


class ExerciseError(ManualgradError, ValueError):
    """A file that cannot be graded: missing, not an exercise, an unknown rule, or broken."""


def _names_used(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_used(const)
    return names


def _backward_signature(rule: Rule) -> tuple[list[str], list[str]]:
    """The backward's parameters (the nondiff arguments, ``residuals``, ``g``) and the names of
    the cotangents it returns, one per other argument."""
    nondiff = set(getattr(rule.fn, "nondiff_argnums", ()))
    static = [n for i, n in enumerate(rule.argnames) if i in nondiff]
    returned = [f"d{n}" for i, n in enumerate(rule.argnames) if i not in nondiff]
    return [*static, "residuals", "g"], returned


def _cotangents(returned: list[str]) -> str:
    """``(dx, dw)``, or ``(dz,)`` for one cotangent."""
    return "(" + ", ".join(returned) + ("," if len(returned) == 1 else "") + ")"


@dataclasses.dataclass(frozen=True)
class Parts:
    """An exercise's pieces, which the file (:func:`exercise`) and the notebook put together."""

    rule: Rule
    derivation: str  # the docstring's derivation up to its result
    task: str  # what to write, and how to get graded
    seeds: list[str]  # the seed sections to reread, cited
    imports: str
    forward: str
    backward: str  # the empty backward


FILE_GRADING = ("run ``manualgrad grade THIS_FILE``", "then run `manualgrad grade` on this file")


def parts(name: str, grading: tuple[str, str] = FILE_GRADING) -> Parts:
    """The pieces of rule ``name``'s exercise; ``grading`` says how to get graded, in the task
    and in the empty backward's error."""
    rule = registry.get(name)
    imports, forward = forwards.source(rule)
    forward = text.plain(forward)
    params, returned = _backward_signature(rule)
    cotangents = _cotangents(returned)[1:-1]
    task = f"""Your task: carry the derivation through to the result and write ``backward`` below. It
receives {", ".join(f"``{p}``" for p in params)} — ``residuals`` is the second value ``forward``
returns — and returns ``({cotangents})``, one cotangent per input, shaped like that input
(an integer input such as class labels gets ``np.zeros(shape, jax.dtypes.float0)``).
Then {grading[0]}."""
    backward = f"""def backward({", ".join(params)}):
    raise NotImplementedError(
        "{rule.name}: write backward({", ".join(params)}) returning ({cotangents}); "
        "derive it from the docstring above, {grading[1]}"
    )
"""
    seeds = [registry.cite(s, section) for s, section in rule.seeds]
    head = "from __future__ import annotations\n\n" + "\n".join(imports) + "\n"
    return Parts(rule, rule.derivation_setup, task, seeds, head, forward, backward)


def version() -> str:
    """The installed manualgrad's version, or ``"unknown"`` for a copy run from its source tree uninstalled."""
    try:
        return importlib.metadata.version("manualgrad")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def header(title: str) -> str:
    """The first two lines of an exercise file for ``title`` (a rule's name or ``network NAME``):
    what it is for, and the format and version that wrote it."""
    return f"{HEADER}{title}\n{format_line()}"


def format_line(number: int = FORMAT, written_by: str | None = None) -> str:
    """An exercise file's second line: format ``number``, written by manualgrad ``written_by`` (this version)."""
    return f"# manualgrad exercise format {number}, written by manualgrad {written_by or version()}"


def exercise(name: str) -> str:
    """The exercise file for rule ``name``."""
    p = parts(name)

    def indented(block: str) -> str:
        return "\n".join(("    " + line).rstrip() for line in text.plain(block).splitlines())

    seeds = "\n".join(f"    {s}" for s in p.seeds)
    return f'''{header(p.rule.name)}
"""Exercise: the backward rule of {p.rule.name}.

{indented(p.derivation)}

{indented(p.task)}

    Reread:
{seeds}
"""

{p.imports}

{p.forward}

{p.backward}'''


def title_of(path: str | pathlib.Path) -> str:
    """What the exercise file at ``path`` is for, read from its first line (nothing runs): a rule's
    name, or ``network NAME`` (:mod:`manualgrad.teach.networks`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ExerciseError(f"no file {str(path)!r}")
    first = path.read_text(errors="replace").partition("\n")[0]
    if not first.startswith(HEADER):
        raise ExerciseError(
            f"{path} is not an exercise file (its first line must be '{HEADER}RULE' or '{HEADER}network NAME'; "
            "write one with `manualgrad exercise RULE` or `manualgrad exercise --network NAME`)"
        )
    return first[len(HEADER) :].strip()


def rule_of(path: str | pathlib.Path) -> Rule:
    """The registered rule the exercise file at ``path`` is for (nothing runs)."""
    try:
        return registry.get(title_of(path))
    except KeyError as error:
        raise ExerciseError(f"{path} is for {error.args[0]}") from None


def _module(path: str | pathlib.Path) -> tuple[Rule, types.ModuleType]:
    """The registered rule an exercise file is for, and the file run as a module."""
    rule = rule_of(path)
    module = load_module(path, rule.name)
    missing = [f for f in ("forward", "backward") if not callable(getattr(module, f, None))]
    if missing:
        raise ExerciseError(f"{path} defines no {' or '.join(missing)} function")
    return rule, module


def format_of(path: str | pathlib.Path) -> tuple[int, str]:
    """``(exercise format, the manualgrad version that wrote it)`` from the file's second line;
    ``(1, "an earlier manualgrad")`` for a file without that line, as format 1 wrote them."""
    lines = pathlib.Path(path).read_text(errors="replace").splitlines()
    match = _FORMAT_LINE.fullmatch(lines[1].strip()) if len(lines) > 1 else None
    return (int(match[1]), f"manualgrad {match[2]}") if match else (1, "an earlier manualgrad")


def load_module(path: str | pathlib.Path, title: str) -> types.ModuleType:
    """The exercise file at ``path`` for ``title`` (a rule's name or ``network NAME``) run as a
    module; :class:`ExerciseError`, one sentence, where this version cannot grade its format (a
    format it does not know, or an older file that imports what manualgrad no longer has)."""
    number, writer = format_of(path)
    name = title.removeprefix(NETWORK)
    fresh = f"write a fresh file with `manualgrad exercise {'--network ' if title.startswith(NETWORK) else ''}{name}`"
    if not 1 <= number <= FORMAT:
        raise ExerciseError(
            f"{path} was written by {writer} in exercise format {number}; this manualgrad ({version()}) "
            f"grades formats 1 to {FORMAT}: {fresh}"
        )
    try:
        return user_code.run(path, f"manualgrad_exercise_{name}")
    except ImportError as error:
        if number == FORMAT:
            raise _does_not_run(path, error) from None
        gone = error.name or text.first_line(error)
        raise ExerciseError(
            f"{path} was written by {writer} in exercise format {number} and imports {gone}, which this "
            f"manualgrad ({version()}) no longer has; it grades format {FORMAT}: {fresh}"
        ) from None
    except Exception as error:
        raise _does_not_run(path, error) from None


def _does_not_run(path: str | pathlib.Path, error: Exception) -> ExerciseError:
    return ExerciseError(user_code.does_not_run(path, error))


def load(path: str | pathlib.Path) -> tuple[Rule, Rule]:
    """``(the registered rule, the same rule with the file's forward and backward)``."""
    return _student(*_module(path))


def _student(rule: Rule, module: Any) -> tuple[Rule, Rule]:
    student = rule.with_backward(
        _checked_backward(rule, module.backward), module.forward, primal=lambda *args: module.forward(*args)[0]
    )
    return rule, student


def _checked_backward(rule: Rule, backward: Callable[..., Any]) -> Callable[..., Any]:
    """``backward``, with the usual slips of its contract raised as one plain sentence
    (:class:`manualgrad.check.checker.BackwardError`) instead of JAX's error far from the cause."""
    params, returned = _backward_signature(rule)
    must = f"it must return a tuple with one cotangent per argument of the forward, here {_cotangents(returned)}"
    signature = inspect.signature(backward)

    @functools.wraps(backward)
    def checked(*args):
        try:
            signature.bind(*args)
        except TypeError:
            raise checker.BackwardError(
                f"backward is defined as backward({', '.join(signature.parameters)}) but is called with "
                f"{len(args)} arguments: write it as backward({', '.join(params)})"
            ) from None
        try:
            out = backward(*args)
        except jax.errors.TracerArrayConversionError:
            raise checker.BackwardError(
                "use jax.numpy (jnp), not numpy, inside backward: its inputs are traced arrays"
            ) from None
        except jax.errors.TracerBoolConversionError:
            raise checker.BackwardError(
                "use jnp.where, not a Python if, and or or, on arrays inside backward: its inputs are traced arrays"
            ) from None
        if isinstance(out, tuple) and len(out) == len(returned):
            return out
        if out is None or isinstance(out, list):
            what = "None" if out is None else "a list"
        elif not isinstance(out, tuple):
            what = f"{'an array' if hasattr(out, 'shape') else type(out).__name__}, not a tuple"
        else:
            what = f"a tuple of {len(out)} cotangent{'' if len(out) == 1 else 's'}"
        raise checker.BackwardError(f"backward returned {what}: {must}")

    return checked


def autodiff_calls(path: str | pathlib.Path) -> list[str]:
    """Where the exercise file at ``path`` uses JAX's autodiff (:data:`AUTODIFF`) or one of
    manualgrad's rules or backward functions, e.g. ``line 42: j.vjp, that is jax.vjp (JAX's
    autodiff)``: a backward that does is not a hand rule.

    Static: every name and attribute chain in the file (``jax.vjp``, ``vjp`` after ``from jax
    import vjp``, ``j.grad`` after ``import jax as j``, ``mg.linear.dense_backward``) is looked
    up, through the file's imports, as the object it names, and compared with those functions.
    """
    rule, module = _module(path)
    return autodiff_in(forbidden(rule), module, _source(path))


def _source(path: str | pathlib.Path) -> str:
    return pathlib.Path(path).read_text(errors="replace")


def autodiff_in(forbidden: dict[int, tuple[Any, str, str]], module: Any, source: str) -> list[str]:
    """:func:`autodiff_calls` in ``source`` of what ``forbidden`` (:func:`forbidden`) names, its
    names looked up in ``module``'s namespace."""
    tree = ast.parse(source)
    references = list(_references(tree, vars(module)))  # first: it imports what the file's functions import
    found = []
    for node, written, obj in references:
        what = forbidden.get(id(obj))
        if what is not None and what[0] is obj:
            canonical = what[1]
            named = written if written == canonical else f"{written}, that is {canonical}"
            found.append((node.lineno, f"line {node.lineno}: {named} ({what[2]})"))
    return [line for _, line in sorted(set(found))]


def forbidden(rule: Rule | None) -> dict[int, tuple[Any, str, str]]:
    """``id → (object, its name, what it is)`` for what a hand backward of ``rule`` (of a whole
    network where ``None``) may not use: JAX's autodiff and manualgrad's functions that run it,
    every registered rule, and every function that some rule's backward uses but ``rule``'s
    forward does not (the forward's helpers, such as ``geometry``, stay allowed)."""
    out = {id(f): (f, f"jax.{name}", "JAX's autodiff") for name in AUTODIFF if (f := getattr(jax, name, None))}
    allowed = _reachable(rule.fn.fwd) if rule else {}
    for module in [m for name, m in list(sys.modules.items()) if _in_manualgrad(name)]:
        for f in vars(module).values():
            if inspect.isfunction(f) and f.__module__ == module.__name__ and id(f) not in allowed and _runs_autodiff(f):
                out[id(f)] = (f, f"{f.__module__}.{f.__qualname__}", "runs JAX's autodiff")
    for other in [*([rule] if rule else []), *registry.rules()]:  # a helper of several backwards: this rule's
        fn = other.fn
        out[id(fn)] = (fn, f"{inspect.getmodule(fn.fwd).__name__}.{other.name}", "a manualgrad rule")
        for key, f in _reachable(fn.bwd).items():
            if key not in allowed:
                out.setdefault(
                    key, (f, f"{f.__module__}.{f.__qualname__}", f"manualgrad's own backward of {other.name}")
                )
    return out


def _in_manualgrad(module: str) -> bool:
    return module == "manualgrad" or module.startswith("manualgrad.")


def _runs_autodiff(f: Callable[..., Any]) -> bool:
    """Whether ``f``'s code names one of :data:`AUTODIFF`, as ``jax.NAME`` or imported by name."""
    names = _names_used(f.__code__)
    named = [f.__globals__.get(n) for n in names]
    return any(g is getattr(jax, n, None) for n, g in zip(names, named) if n in AUTODIFF) or (
        any(g is jax for g in named) and bool(names & set(AUTODIFF))
    )


@functools.cache
def _reachable(fn: Callable[..., Any]) -> dict[int, Callable[..., Any]]:
    """``fn`` and the manualgrad functions it calls, transitively, by ``id``: every global name
    of their code, and every attribute of a manualgrad module they name, that is such a function."""
    out: dict[int, Callable[..., Any]] = {}
    todo = [fn]
    while todo:
        f = todo.pop()
        if id(f) in out or not _in_manualgrad(getattr(f, "__module__", "") or ""):
            continue
        out[id(f)] = f
        code = getattr(f, "__code__", None)
        if code is None:
            continue
        names = _names_used(code)
        namespace = f.__globals__
        for name in names:
            value = namespace.get(name)
            if isinstance(value, types.ModuleType) and _in_manualgrad(value.__name__):
                todo += [getattr(value, n) for n in names if inspect.isfunction(getattr(value, n, None))]
            elif inspect.isfunction(value):
                todo.append(value)
    return out


def _references(tree: ast.Module, namespace: dict[str, Any]) -> Iterator[tuple[ast.expr, str, Any]]:
    """``(node, its source, the object it names)`` for every name and attribute chain of the
    module ``tree`` that names an object through ``namespace`` (the module's globals) or an
    import inside a function; a function's own variables name nothing global."""
    for statement in tree.body:
        scope = dict(namespace)
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(statement):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    scope.update(_imported(node))
                elif (
                    isinstance(node, ast.Name)
                    and isinstance(node.ctx, (ast.Store, ast.Del))
                    or isinstance(node, ast.arg)
                ):
                    scope.pop(node.id if isinstance(node, ast.Name) else node.arg, None)
        yield from _named(statement, scope)


def _imported(node: ast.Import | ast.ImportFrom) -> dict[str, Any]:
    """The names an import statement binds, as objects (those that cannot be imported left out)."""
    out = {}
    for alias in node.names:
        try:
            if isinstance(node, ast.Import):
                top = alias.name if alias.asname else alias.name.partition(".")[0]
                module = importlib.import_module(alias.name)
                out[alias.asname or top] = module if alias.asname else importlib.import_module(top)
            elif not node.level:
                source = importlib.import_module(node.module)
                out[alias.asname or alias.name] = (
                    getattr(source, alias.name)
                    if hasattr(source, alias.name)
                    else importlib.import_module(f"{node.module}.{alias.name}")
                )
        except Exception:  # a module that cannot be imported names nothing
            continue
    return out


def _named(tree: ast.AST, scope: dict[str, Any]) -> Iterator[tuple[ast.expr, str, Any]]:
    """Every prefix of every attribute chain ``a.b.c`` under ``tree`` rooted at a name of
    ``scope``, followed through modules only, with the object it names."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Attribute, ast.Name)):
            continue
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.append(root.attr)
            skip.add(id(root.value))
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in scope:
            continue
        obj, parts = scope[root.id], [root.id]
        yield node, root.id, obj
        for attr in reversed(chain):
            if not isinstance(obj, types.ModuleType) or not hasattr(obj, attr):
                break
            obj = getattr(obj, attr)
            parts.append(attr)
            yield node, ".".join(parts), obj


def graded_checks(rule: Rule) -> list[str]:
    """The checks an exercise of ``rule`` is graded on: every check, the adjoint only for a rule linear in something."""
    return [c for c in checker.CHECKS if c != "adjoint" or rule.linear_in]


def grade(path: str | pathlib.Path, dtype: str = "float64", shown: str | None = None) -> results.Result:
    """The graded exercise file at ``path`` (named ``shown`` in the report, default ``path``): one
    row per graded check, the report's text, and the time it took."""
    start = time.perf_counter()
    rule, module = _module(path)
    text, rows = grade_module(rule, module, _source(path), shown or str(path), dtype)
    return results.Result(shown or str(path), rule.name, results.GRADED, rows, text, time.perf_counter() - start)


def grade_module(rule: Rule, module: Any, source: str, shown: str, dtype: str) -> tuple[str, tuple[results.Row, ...]]:
    """Grades the ``forward`` and ``backward`` of ``module`` (anything with those attributes and
    the namespace they were defined in), ``source`` their code: the report and one row per check."""
    graded = graded_checks(rule)
    calls = autodiff_in(forbidden(rule), module, source)
    if calls:
        why = "not a hand rule: " + "; ".join(calls)
        return "\n".join(
            [
                f"grading your backward for {rule.name} ({shown}), {dtype}: not a hand rule, not graded",
                "your backward uses JAX's autodiff or manualgrad's own backward instead of a rule derived by hand:",
                *(f"  {line}" for line in calls),
                f"score: 0/{len(graded)} checks passed",
                "derive the cotangents from the docstring and write them with jax.numpy; reread: " + _reread(rule),
            ]
        ), tuple(results.Row(rule.name, c, False, why) for c in graded)
    _, student = _student(rule, module)
    report = checker.check(student, dtype=dtype)
    failures = report.failures()
    lines = [
        f"grading your backward for {rule.name} ({shown}), {dtype}, {len({f.sample for f in report.findings})} samples"
    ]
    forward_raised = {f.sample for f in report.findings if f.check == "forward" and f.where == checker.NOT_RUN}
    rows = []
    for c in graded:
        ok, detail = _verdict([f for f in report.findings if f.check == c], forward_raised)
        rows.append(results.Row(rule.name, c, ok, detail))
        mark = "ok" if ok else "n/a" if detail.startswith("not applicable") else "FAIL"
        lines.append(f"  {c:<13} {mark:<5} {detail}")
    if "adjoint" not in graded:
        lines.append(f"  {'adjoint':<13} -     {rule.name} is linear in no argument: no dot-product test")
    lines.append(f"score: {sum(r.passed for r in rows)}/{len(graded)} checks passed")
    lines += _why_not_run([f for f in failures if f.where == checker.NOT_RUN])
    lines += [f"diagnosis: {line}" for line in report.diagnoses()]
    if failures:
        lines.append(f"first failure: {failures[0].describe()}")
        lines.append(f"reread: {_reread(rule)}; and `manualgrad explain {rule.name}` once you have tried again")
    elif report.not_applicable():
        lines.append(f"not every check could be graded here: {report.not_applicable()[0].note}")
    else:
        lines.append(
            "all checks passed: compare with the rule's own derivation, `manualgrad explain " + rule.name + "`"
        )
    return "\n".join(lines), tuple(rows)


def _verdict(mine: list[checker.Finding], forward_raised: set[str]) -> tuple[bool, str]:
    """Whether one check passed on every sample it applies to, and the detail: a sample on which
    it could not run is a failure, said apart (the forward raised there, or else the backward)."""
    samples = {f.sample for f in mine}
    if not samples:
        return False, "not run on any sample"
    if all(f.status == NOT_APPLICABLE for f in mine):  # not graded here, so not passed either
        return False, f"not applicable here: {mine[0].note}"
    not_run = {f.sample for f in mine if f.where == checker.NOT_RUN}
    failed = {f.sample for f in mine if not f.passed} - not_run
    if not failed and not not_run:
        return True, f"worst relative error {max(f.max_rel_error for f in mine):.1e}"
    n = len(samples)
    parts = [f"fails on {len(failed)} of {n} samples"] if failed else []
    parts += [
        f"not run: the {who} raised on {len(where)} of {n} samples"
        for who, where in (("forward", not_run & forward_raised), ("backward", not_run - forward_raised))
        if where
    ]
    return False, "; ".join(parts)


def _why_not_run(raised: list[checker.Finding]) -> list[str]:
    """One line on why the checks that could not run did not: the first sample's reason."""
    if not raised:
        return []
    if any("NotImplementedError" in f.note for f in raised):
        return ["your backward is not written yet (it raises NotImplementedError)"]
    first = raised[0]
    note = f"your backward {first.note}" if first.note.startswith("raised ") else first.note
    lines = [note if len({f.note for f in raised}) == 1 else f"{note} (sample {first.sample!r})"]
    if any("jax_numpy_rank_promotion" in f.note for f in raised):
        lines.append(_RANK_PROMOTION)
    return lines


_RANK_PROMOTION = (
    "the checks refuse NumPy's implicit rank promotion (jax_numpy_rank_promotion='raise'): give the array of "
    "fewer axes its size-1 axes yourself, e.g. jnp.reshape(v, (1,) * (g.ndim - 1) + (-1,)) for a (C,) vector v"
)


def _reread(rule: Rule) -> str:
    return rule.seed_text
