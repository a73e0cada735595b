"""A user's own Python file, run as a module, and the functions it names as ``FILE:NAME``: what
``manualgrad check FILE.py:FN``, ``manualgrad audit FILE.py:FN`` and ``manualgrad grade`` load."""

from __future__ import annotations

import importlib.util
import pathlib
import types
from collections.abc import Callable
from typing import Any

from manualgrad.errors import ManualgradError
from manualgrad.text import first_line


class UserCodeError(ManualgradError, ValueError):
    """A ``FILE:NAME`` that names nothing callable, or a file that raises when it runs."""


def run(path: str | pathlib.Path, name: str) -> types.ModuleType:
    """The Python file at ``path`` run as a module called ``name``; whatever it raises propagates."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def does_not_run(path: str | pathlib.Path, error: BaseException) -> str:
    """The one sentence for a user's file that raised while it ran: its error's type and first line."""
    return f"{path} does not run: {type(error).__name__}: {first_line(error)}"


def function(target: str, role: str, modules: dict[str, Any]) -> tuple[types.ModuleType, Callable[..., Any]]:
    """The module FILE and its function NAME that ``target``, ``FILE:NAME``, names (``role`` says
    what for, in a refusal); each FILE run once, kept in ``modules``."""
    file, sep, name = target.rpartition(":")
    if not sep or not file or not name.isidentifier():
        raise UserCodeError(f"give FILE:FUNCTION, e.g. model.py:loss; got {target!r}")
    if not pathlib.Path(file).is_file():
        raise UserCodeError(f"no file {file!r}")
    key = str(pathlib.Path(file).resolve())
    if key not in modules:
        try:
            modules[key] = run(file, f"manualgrad_loaded_{len(modules)}")
        except Exception as error:  # the user's code: its error in one line
            raise UserCodeError(does_not_run(file, error)) from None
    fn = getattr(modules[key], name, None)
    if not callable(fn):
        raise UserCodeError(f"{file} defines no function {name} {role}")
    return modules[key], fn


def arguments(make: Callable[..., Any], of: str) -> tuple[Any, ...]:
    """``make()``, the positional arguments of the function ``of``, as a tuple."""
    values = make()
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"it returned {type(values).__name__}, not a tuple of {of}'s positional arguments")
    return tuple(values)
