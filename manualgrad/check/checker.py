"""The cross-checker: does a hand-written backward agree with autodiff and with finite differences?

For every sample of every rule (or for any function the user builds from rules) it runs:

* ``forward``       the rule's output against its plain-``jnp`` reference;
* ``vjp``           the hand VJP against ``jax.vjp`` of the reference, under a random cotangent
                    (compiled, as every check: it is the ``jit`` check's value, judged per
                    argument and diagnosed when it fails);
* ``finite_diff``   the hand VJP against finite differences (steps ±h and ±2h, Richardson's
                    extrapolation), always in float64: the exact Jacobian for arguments of at
                    most 64 entries, else ``uᵀ J v`` along random unit directions (like
                    ``torch.autograd.gradcheck``'s fast mode);
* ``adjoint``       seed 002's dot-product test, for every group of arguments the rule is
                    linear in (``Rule.linear_in``), :mod:`~manualgrad.check.adjoint`;
* ``jit``           the VJP again under ``jax.jit``;
* ``vmap``          the VJP again under ``jax.vmap`` over a batch of two different samples;
* ``grad_of_grad``  reverse-over-reverse: the gradient of ``⟨VJP(u), v⟩``. A ``custom_vjp``
                    function has no forward mode (``jax.jvp``/``jax.jacfwd`` of a rule raise);
                    forward over reverse (``jax.hessian``, ``jax.jvp`` of ``jax.grad``) works,
                    its outer pass differentiating the hand backward, as this check does.

Errors are judged as :mod:`~manualgrad.check.tolerances` says, finite differences as
:mod:`~manualgrad.check.finite_differences` says; the findings are gathered in a
:class:`~manualgrad.check.report.Report`, and a failing ``vjp`` check is diagnosed
(:mod:`~manualgrad.check.diagnose`).

All checks run with ``jax_numpy_rank_promotion="raise"`` so that a backward rule that
broadcasts silently fails loudly. A user's own function and reference (``check(fn,
reference=..., args=...)``) run under the caller's setting; the backward passes of the hand
rules inside the function still run under ``"raise"``. A reference that raises fails every
check of its sample, with a note that names the reference.

The run time is compile time (the report splits it, :mod:`~manualgrad.check.timing`): every
sample's checks are fused into one program (built with
:data:`~manualgrad.check.tolerances.FAST_COMPILE` on CPU), in which the backward is traced as few
times as the checks allow (once: :class:`Traced`), and samples are checked :data:`WORKERS` at a
time, so that one sample's compile overlaps another's tracing. The hand VJP is not also run
eagerly: each eager operation on a new shape is a program of its own, a large share of the
check's time for values equal to the compiled ones to round-off. Samples are not batched into one
program per rule: XLA's compile time grows with the program, and one program per rule built as
much as the per-sample ones together, one thread at a time. ``manualgrad check`` also keeps what
it built in JAX's persistent compilation cache (:mod:`~manualgrad.check.cache`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.check import adjoint, diagnose, sharded
from manualgrad.check.autodiff import Traced, side
from manualgrad.check.comparison import compare
from manualgrad.check.errors import BackwardError, CheckError, ReferenceFailed
from manualgrad.check.finite_differences import SampleDifferences, finite_differences
from manualgrad.check.own_dtype import check_in_own_dtype
from manualgrad.check.report import NOT_RUN, Finding, Report
from manualgrad.check.targets import select
from manualgrad.check.timing import CompileClock
from manualgrad.check.tolerances import ATOL, CHECKS, TOLERANCES, fast_compile_options
from manualgrad.check.trees import (
    closure,
    is_float_tree,
    random_like,
    stack_perturbed,
)
from manualgrad.registry import Rule, Sample
from manualgrad.text import first_line

__all__ = ["CHECKS", "NOT_RUN", "TOLERANCES", "WORKERS", "BackwardError", "Finding", "Report", "check"]

# Why a function checked with a reference has no adjoint test: the test needs the arguments it is linear in.
NOT_LINEAR = (
    "the dot-product test needs arguments the function is linear in, and a function checked with a reference "
    "declares none (registered rules do, as Rule.linear_in)"
)
# Said where a function checked with a dtype given did not run: the 64-bit mode may be why.
IN_64_BIT_MODE = (
    "dtype={dtype!r} checks the function in JAX's 64-bit mode; one that cannot run in it (int32 index "
    "arithmetic, as in Pallas kernels) is checked in its own dtype and your 64-bit setting with dtype=None"
)
# Two threads per core: XLA compiles without holding the GIL, and a small program's compile
# leaves a core idle that another sample's tracing can use.
WORKERS = min(8, 2 * (os.cpu_count() or 1))


def check(
    target: str | Rule | Callable[..., Any] | Sequence[str | Rule] | None = None,
    *,
    reference: Callable[..., Any] | None = None,
    args: Sequence[Any] | None = None,
    argnums: Sequence[int] | None = None,
    dtype: str | None = None,
    checks: Sequence[str] = CHECKS,
    seed: int = 0,
) -> Report:
    """Cross-checks hand rules; returns a :class:`Report` (``report.passed``, ``report.table()``).

    ``target`` is ``None`` (every registered rule), a rule name, a :class:`Rule`, a list of
    those, or any function built from rules or written as a kernel, given with its ``reference``
    and ``args`` (and optionally ``argnums``, the arguments to differentiate; default every
    floating one). Such a function and its reference run under the caller's
    ``jax_numpy_rank_promotion``.

    ``dtype``: ``"float64"`` or ``"float32"`` casts the samples (a function's ``args``) to it and
    checks in JAX's 64-bit mode. ``None``, the default, is ``"float64"`` for registered rules;
    for a function it checks the function in its arguments' own dtypes (float64, float32,
    bfloat16, float16) and in the caller's 64-bit setting, judged against a float64 golden by
    FlashAttention's criterion (:mod:`~manualgrad.check.own_dtype`, :mod:`~manualgrad.check.golden`).
    A check that cannot apply to a function (the ``adjoint`` test, which needs arguments it is
    declared linear in; see :mod:`~manualgrad.check.own_dtype` for the others) is reported as not
    applicable, neither passed nor failed.

    Samples are checked in :data:`WORKERS` threads, which do not see JAX configuration
    contexts entered by the caller (``jax.default_device`` and the like): set those with
    ``jax.config.update``, or set ``WORKERS = 1`` to check in the calling thread. A function in
    its own dtype is checked in the calling thread.
    """
    if dtype is not None and dtype not in TOLERANCES:
        raise CheckError(f"check: dtype must be one of {sorted(TOLERANCES)} or None, got {dtype!r}")
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise CheckError(f"check: unknown checks {sorted(unknown)}; choose from {CHECKS}")
    selected = select(target, reference, args, argnums)
    user = callable(target) and not isinstance(target, (str, Rule))
    start = time.perf_counter()
    notes: list[str] = []
    with CompileClock() as clock:
        if user and dtype is None:
            with clock.working(), jax.numpy_rank_promotion("raise"):
                dtype, findings, notes = check_in_own_dtype(selected[0], tuple(args), checks, jax.random.PRNGKey(seed))
        else:
            dtype = dtype or "float64"
            findings = [f for result in _check_all(selected, dtype, checks, seed, clock) for f in result]
            if user:
                findings = _second_order_not_applicable(findings)
                notes = [IN_64_BIT_MODE.format(dtype=dtype)] if any(f.where == NOT_RUN for f in findings) else []
    if user and "adjoint" in checks:
        findings.append(Finding.not_applicable(selected[0].name, "adjoint", dtype, "given", NOT_LINEAR))
    seconds = time.perf_counter() - start
    return Report(dtype, findings, seconds, clock.compile_seconds(seconds), notes)


def _second_order_not_applicable(findings: list[Finding]) -> list[Finding]:
    """A function's ``grad_of_grad`` that could not run where its VJP ran: JAX cannot differentiate
    its backward (a ``pallas_call``, a ``while_loop`` in it), and the check is not applicable; a
    backward that raises fails its VJP checks too, and stays a failure."""
    ran = {f.sample for f in findings if f.check == "jit" and f.where != NOT_RUN}
    return [
        Finding.not_applicable(
            f.rule, f.check, f.dtype, f.sample, f"JAX cannot differentiate {f.rule}'s backward ({f.note})"
        )
        if f.check == "grad_of_grad" and f.where == NOT_RUN and f.sample in ran
        else f
        for f in findings
    ]


def jobs(selected: list[Rule], dtype: str, seed: int) -> list[tuple[Rule, Sample, jax.Array]]:
    """Every sample of the ``selected`` rules with its key for the checks' random draws: a
    rule's keys depend on its name and ``seed`` only, not on what else is checked."""
    found = []
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        for rule in selected:
            rule_key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(rule.name.encode()))
            sample_key, check_key = jax.random.split(rule_key)
            for i, sample in enumerate(rule.sample_inputs(sample_key, jnp.dtype(dtype))):
                found.append((rule, sample, jax.random.fold_in(check_key, i)))
    return found


def _check_all(selected: list[Rule], dtype: str, checks, seed: int, clock: CompileClock) -> list[list[Finding]]:
    with clock.working():
        todo = jobs(selected, dtype, seed)
    options = fast_compile_options()

    def run(job) -> list[Finding]:
        with clock.working():
            return check_job(*job, dtype, checks, options)

    if WORKERS == 1:
        return [run(job) for job in todo]
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(run, todo))


def check_job(rule: Rule, sample: Sample, key, dtype: str, checks, options) -> list[Finding]:
    """:func:`_check_sample` under the checker's JAX configuration, which is per thread.

    When the sample's program cannot be built (something raised), each check is run alone, so
    that the checks which can run still count and each one that cannot is a failure on this
    sample: a backward that raises never leaves the forward, or any check, unjudged.
    """
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        if sharded.on_mesh(rule):  # a collective: every check on the devices' mesh, or none where it is lacking
            why = sharded.not_applicable_reason()
            if why is not None:
                return [Finding.not_applicable(rule.name, c, dtype, sample.label, why) for c in CHECKS if c in checks]
            rule = sharded.device_rule(rule)
        try:
            return _check_sample(rule, sample, dtype, checks, key, options)
        except ReferenceFailed as error:  # nothing to compare with: every check failed, the reference named
            return [
                Finding.not_run(rule.name, c, dtype, sample.label, str(error), tolerance=TOLERANCES[dtype][c])
                for c in CHECKS
                if c in checks
            ]
        except Exception:  # which check raised is found out one check at a time
            return [
                f for check in CHECKS if check in checks for f in _check_alone(rule, sample, dtype, check, key, options)
            ]


def _check_alone(rule: Rule, sample: Sample, dtype: str, check: str, key, options) -> list[Finding]:
    try:
        return _check_sample(rule, sample, dtype, (check,), key, options)
    except Exception as error:  # a broken rule is a finding, not a crash of the checker
        return _error_findings(rule, sample, dtype, check, error, key)


def _argname(rule: Rule, i: int) -> str:
    names = rule.argnames
    return names[i] if i < len(names) else f"args[{i}]"


@dataclasses.dataclass(frozen=True)
class _Draws:
    """One sample's differentiated arguments, closures over them, and every check's random draws."""

    diff: list[int]
    names: list[str]
    hand: Callable[..., Any]
    ref: Callable[..., Any]
    traced: tuple[Traced, Traced]  # the hand rule's and the reference's
    primals: list[Any]
    u: Any  # the output cotangent
    v: list[Any]  # grad_of_grad's direction
    batched: list[Any]
    batched_u: Any
    groups: list[tuple[int, ...]]
    adjoint: list[tuple[list[Any], Any]]
    differences: SampleDifferences | None  # None: no finite_diff check, or nothing to differentiate


def _draw(rule: Rule, sample: Sample, checks, key) -> _Draws:
    args = sample.args
    diff = [i for i in rule.differentiable if is_float_tree(args[i])]
    names = [_argname(rule, i) for i in diff]
    hand, ref = closure(rule.fn, args, diff), closure(rule.reference, args, diff)
    traced = Traced.of(hand), Traced.of(ref)
    primals = [args[i] for i in diff]
    ku, kv, kb, ka = jax.random.split(key, 4)
    u = random_like(ku, jax.eval_shape(traced[0].forward, *primals))
    groups = adjoint.linear_groups(rule, diff) if "adjoint" in checks else []
    return _Draws(
        diff,
        names,
        hand,
        ref,
        traced,
        primals,
        u,
        v=[random_like(k, p) for k, p in zip(jax.random.split(kv, len(primals)), primals)],
        batched=[stack_perturbed(k, p) for k, p in zip(jax.random.split(kb, len(primals)), primals)],
        batched_u=stack_perturbed(ku, u),
        groups=groups,
        adjoint=[adjoint.draws(k, args, group, u) for k, group in zip(jax.random.split(ka, len(groups)), groups)],
        differences=finite_differences(rule, sample, diff, names, key, (traced[0].forward, traced[0].pull))
        if "finite_diff" in checks and diff
        else None,
    )


def _run(rule: Rule, sample: Sample, d: _Draws, checks, options):
    """Every check's values: one compiled program with the XLA ``options``."""
    wanted = [c for c in ("forward", "jit", "vmap", "grad_of_grad") if c in checks or (c == "jit" and "vjp" in checks)]
    fd_inputs = d.differences.inputs if d.differences else None

    def program(inputs, fd_inputs, adjoint_inputs):
        positions = [[d.diff.index(i) for i in group] for group in d.groups]
        hand = d.traced[0]
        pairs = [
            adjoint.pair(hand.forward, hand.pull, d.primals, k, *drawn) for k, drawn in zip(positions, adjoint_inputs)
        ]
        differences = d.differences.evaluate(*fd_inputs) if d.differences else None
        sides = [side(fn, d.v, wanted, *inputs) for fn in d.traced]
        return {c: (sides[0][c], sides[1][c]) for c in wanted}, differences, pairs

    values, fd_values, adjoint_values = jax.jit(program, compiler_options=options)(
        (d.primals, d.u, d.batched, d.batched_u), fd_inputs, d.adjoint
    )
    if "vjp" in checks:
        values["vjp"] = values["jit"]
    return values, fd_values, adjoint_values


def _autodiff_findings(rule: Rule, sample: Sample, dtype: str, checks, d: _Draws, values) -> list[Finding]:
    """The forward and the VJP checks against the reference; a failing ``vjp`` one diagnosed."""
    tol = TOLERANCES[dtype]
    results: list[Finding] = []
    for check in CHECKS:
        if check not in checks or check in ("finite_diff", "adjoint"):
            continue
        received, expected = values[check]
        pairs = [("output", received, expected)] if check == "forward" else zip(d.names, received, expected)
        results += [
            compare(rule.name, check, dtype, sample.label, n, r, e, tol[check], ATOL[dtype]) for n, r, e in pairs
        ]
    received_vjp = dict(zip(d.names, values["vjp"][0])) if "vjp" in values else {}
    return [
        _diagnosed(f, rule, sample.args, d.diff[d.names.index(f.argument)], received_vjp[f.argument], d.u, dtype)
        if f.check == "vjp" and not f.passed
        else f
        for f in results
    ]


def _check_sample(rule: Rule, sample: Sample, dtype: str, checks, key, options) -> list[Finding]:
    """Every requested check on one sample.

    Every check, the finite-difference evaluations included, is compiled as one program per
    sample, with the XLA ``options``.
    Compiling dominates the run time, and every separate program, or eager op on a new
    shape, is one more compile.
    """
    d = _draw(rule, sample, checks, key)
    values, fd_values, adjoint_values = _run(rule, sample, d, checks, options)
    tol = TOLERANCES[dtype]
    return [
        *_autodiff_findings(rule, sample, dtype, checks, d, values),
        *(
            d.differences.findings(rule.name, sample.label, dtype, tol["finite_diff"], *map(np.asarray, fd_values))
            if d.differences
            else ()
        ),
        *(
            adjoint.finding(
                rule.name,
                dtype,
                sample.label,
                ", ".join(_argname(rule, i) for i in group),
                tol["adjoint"],
                drawn,
                out,
                back,
            )
            for group, drawn, (out, back) in zip(d.groups, d.adjoint, adjoint_values)
        ),
    ]


def _diagnosed(finding: Finding, rule: Rule, args, argument: int, received, g, dtype: str) -> Finding:
    return dataclasses.replace(finding, diagnosis=diagnose.diagnose(rule, args, argument, received, g, dtype))


def _error_findings(rule: Rule, sample: Sample, dtype: str, check: str, error: Exception, key) -> list[Finding]:
    """``check`` not run on ``sample`` because of ``error``: a failure. Its note is the error's
    sentence for a :class:`BackwardError`, else ``raised TYPE: first line``. For the ``vjp``
    check of a backward that returned a cotangent of the wrong shape (``custom_vjp`` refuses
    it), one finding per such argument, diagnosed from the raw backward."""
    first = first_line(error)
    note = first if isinstance(error, BackwardError) else f"raised {type(error).__name__}: {first}"
    finding = Finding.not_run(rule.name, check, dtype, sample.label, note, tolerance=TOLERANCES[dtype][check])
    if check != "vjp":
        return [finding]
    try:
        g = random_like(key, jax.eval_shape(lambda: rule.fn(*sample.args)))  # static arguments stay Python values
        raw = diagnose.diagnose_raw(rule, sample.args, g, dtype)
    except Exception:  # the forward itself fails, or the diagnosis does: the error stands alone
        return [finding]
    return [
        dataclasses.replace(
            finding,
            argument=_argname(rule, i),
            diagnosis=shape.diagnosis,
            note=f"backward returned a cotangent of shape {shape.received} for {_argname(rule, i)}, "
            f"of shape {shape.expected}",
        )
        for i, shape in raw.items()
    ] or [finding]
