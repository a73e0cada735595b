"""Exercises: write a rule's backward yourself, then get graded by the checker.

:func:`exercise` writes, for any registered rule, a Python file with the rule's forward (its
source, importing what it uses from its module), its docstring's derivation up to the
``Result:`` line, and an empty ``backward`` to fill in. :func:`grade` loads such a file,
registers the student's backward as a ``custom_vjp`` beside the real rule (same name, same
samples, same reference) and runs every check of :func:`manualgrad.check` on it, with the
diagnosis of a wrong gradient and the seed sections to reread.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import importlib.util
import inspect
import pathlib
import types

import jax

from manualgrad import registry
from manualgrad.check import checker
from manualgrad.registry import Rule

HEADER = "# manualgrad exercise: "


class ExerciseError(ValueError):
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


def exercise(name: str) -> str:
    """The exercise file for rule ``name``."""
    rule = registry.get(name)
    forward = rule.fn.fwd
    module = inspect.getmodule(forward)
    source = inspect.getsource(forward).replace(f"def {forward.__name__}(", "def forward(", 1)
    given = {"jax", "jnp", "np"}  # imported by every exercise
    used = sorted(n for n in _names_used(forward.__code__) - given if n in vars(module) and not hasattr(builtins, n))
    params, returned = _backward_signature(rule)
    cotangents = ", ".join(returned) + ("," if len(returned) == 1 else "")
    seeds = "\n".join(f"    seed {s} ({registry.SEED_FILES[s]}): {section}" for s, section in rule.seeds)
    derivation = "\n".join(("    " + line).rstrip() for line in rule.derivation_setup.splitlines())
    return f'''{HEADER}{rule.name}
"""Exercise: the backward rule of ``{rule.name}``.

{derivation}

    Your task: carry the derivation through to the result and write ``backward`` below. It
    receives {", ".join(f"``{p}``" for p in params)} — ``residuals`` is the second value ``forward``
    returns — and returns ``({cotangents})``, one cotangent per input, shaped like that input
    (an integer input such as class labels gets ``np.zeros(shape, jax.dtypes.float0)``).
    Then run ``manualgrad grade THIS_FILE``.

    Reread:
{seeds}
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
{f"from {module.__name__} import {', '.join(used)}" if used else ""}


{source}

def backward({", ".join(params)}):
    raise NotImplementedError(
        "{rule.name}: write backward({", ".join(params)}) returning ({cotangents}); "
        "derive it from the docstring above, then run `manualgrad grade` on this file"
    )
'''


def load(path: str | pathlib.Path) -> tuple[Rule, Rule]:
    """``(the registered rule, the same rule with the file's forward and backward)``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ExerciseError(f"no file {str(path)!r}")
    first = path.read_text(errors="replace").partition("\n")[0]
    if not first.startswith(HEADER):
        raise ExerciseError(f"{path} is not an exercise file (its first line must be '{HEADER}RULE'; "
                            "write one with `manualgrad exercise RULE`)")
    name = first[len(HEADER):].strip()
    try:
        rule = registry.get(name)
    except KeyError as error:
        raise ExerciseError(f"{path} is for {error.args[0]}") from None
    spec = importlib.util.spec_from_file_location(f"manualgrad_exercise_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ExerciseError(f"{path} does not run: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    missing = [f for f in ("forward", "backward") if not callable(getattr(module, f, None))]
    if missing:
        raise ExerciseError(f"{path} defines no {' or '.join(missing)} function")

    @functools.wraps(rule.fn.fun)
    def fn(*args):
        return module.forward(*args)[0]

    student = jax.custom_vjp(fn, nondiff_argnums=getattr(rule.fn, "nondiff_argnums", ()))
    student.defvjp(module.forward, module.backward)
    return rule, dataclasses.replace(rule, fn=student)


def grade(path: str | pathlib.Path, dtype: str = "float64") -> tuple[str, bool]:
    """The graded report of the exercise file at ``path`` and whether every check passed."""
    rule, student = load(path)
    report = checker.check(student, dtype=dtype)
    failures = report.failures()
    raised = [f for f in failures if f.where == "evaluation"]
    lines = [f"grading your backward for {rule.name} ({path}), {dtype}, {len(set(f.sample for f in report.findings))} samples"]
    graded = [c for c in checker.CHECKS if c != "adjoint" or rule.linear_in]
    passed = 0
    for c in graded:
        mine = [f for f in report.findings if f.check == c]
        if not mine:
            ok, detail = False, "not run: the backward raised"
        else:
            ok = all(f.passed for f in mine)
            worst = max(f.max_rel_error for f in mine)
            bad = len({f.sample for f in mine if not f.passed})
            detail = f"worst relative error {worst:.1e}" if ok else f"fails on {bad} of {len({f.sample for f in mine})} samples"
        passed += ok
        lines.append(f"  {c:<13} {'ok' if ok else 'FAIL':<5} {detail}")
    if "adjoint" not in graded:
        lines.append(f"  {'adjoint':<13} -     {rule.name} is linear in no argument: no dot-product test")
    lines.append(f"score: {passed}/{len(graded)} checks passed")
    if any("NotImplementedError" in f.note for f in raised):
        lines.append("your backward is not written yet (it raises NotImplementedError)")
    elif raised:
        lines.append(f"your backward raised: {raised[0].note.removeprefix('raised ')}")
    lines += [f"diagnosis: {line}" for line in report.diagnoses()]
    if failures:
        lines.append(f"first failure: {failures[0].describe()}")
        lines.append("reread: " + "; ".join(f"seed {s} ({registry.SEED_FILES[s]}) {section}" for s, section in rule.seeds)
                     + f"; and `manualgrad explain {rule.name}` once you have tried again")
    else:
        lines.append("all checks passed: compare with the rule's own derivation, `manualgrad explain " + rule.name + "`")
    return "\n".join(lines), not failures
