"""Where a ``custom_vjp`` call site is defined and called, as the audit's report shows it: ``file:line``
and the parameter names, read from JAX's debug info and from the source."""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import re
from typing import Any

# manualgrad's own files are shown from the folder that holds the package: manualgrad/rules/linear.py:52.
_ROOT = pathlib.Path(__file__).resolve().parents[2]
_PACKAGE = _ROOT / "manualgrad"
_SOURCE = re.compile(r"^(?P<name>.+) at (?P<file>.+):(?P<line>\d+)$")


def shown(file: str) -> str:
    """``file`` as a reader finds it: manualgrad's own files from the folder holding the package
    (``manualgrad/rules/linear.py``, wherever it is installed), a user's relative to the working
    directory where they lie below it, else as they are."""
    if not os.path.isabs(file):
        return file
    path = pathlib.Path(file).resolve()
    if path.is_relative_to(_PACKAGE):
        return path.relative_to(_ROOT).as_posix()
    relative = os.path.relpath(file)
    return file if relative.startswith("..") else relative


def definition(eqn, jaxpr) -> tuple[str, tuple[str, int]]:
    """The custom_vjp function's name and ``file:line``: from the primal's debug info, else the backward's code."""
    info = getattr(getattr(jaxpr, "debug_info", None), "func_src_info", None) or ""
    match = _SOURCE.match(info)
    if match:
        return match["name"], (match["file"], int(match["line"]))
    f = backward(eqn)
    code = getattr(f, "__code__", None)
    name = eqn.params.get("name") or getattr(f, "__name__", "custom_vjp")
    return str(name), (code.co_filename, code.co_firstlineno) if code else ("(unknown)", 0)


def backward(eqn) -> Any:
    """The custom_vjp call's backward as its author wrote it (``defvjp``'s ``bwd``), unwrapped."""
    bwd = eqn.params.get("bwd")
    f = getattr(bwd, "f", bwd)
    while isinstance(f, functools.partial):
        f = f.func
    return f


def called(eqn) -> str:
    """Where the user's code made the call (JAX's record of the user frame; private, so defensive)."""
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
    except Exception:  # another jax release: the call site goes unnamed
        return ""
    return f"{shown(frame.file_name)}:{frame.start_line}" if frame else ""


@functools.cache
def _parsed(file: str) -> ast.Module | None:
    try:
        return ast.parse(pathlib.Path(file).read_text())
    except (OSError, SyntaxError, ValueError):
        return None


def argnames(file: str, line: int, n: int) -> tuple[str, ...]:
    """The parameter names of the function defined at ``file:line``, read from its source, less
    those its decorator's ``nondiff_argnums`` names (they are no inputs of the jaxpr's call), where
    ``n`` remain; else ``args[i]``."""
    tree = _parsed(file)
    for node in ast.walk(tree) if tree else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            names = [a.arg for a in [*node.args.posonlyargs, *node.args.args]]
            static = {i for d in node.decorator_list for i in _nondiff_argnums(d)}
            names = [name for i, name in enumerate(names) if i not in static]
            if line in (first, node.lineno) and len(names) == n and not node.args.vararg:
                return tuple(names)
    return tuple(f"args[{i}]" for i in range(n))


def _nondiff_argnums(decorator: ast.expr) -> tuple[int, ...]:
    """The literal ``nondiff_argnums`` of a decorator such as ``@partial(jax.custom_vjp, nondiff_argnums=(1,))``."""
    for keyword in decorator.keywords if isinstance(decorator, ast.Call) else ():
        if keyword.arg == "nondiff_argnums":
            try:
                value = ast.literal_eval(keyword.value)
            except ValueError:
                return ()
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return ()
