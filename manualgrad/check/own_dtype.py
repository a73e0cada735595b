"""A user's function checked in its arguments' own dtype against a float64 golden:
``check(fn, reference=ref, args=..., dtype=None)``.

A backward written today is most often a kernel, in float32 or bfloat16, computing in float32
inside whatever it is given, its index arithmetic in int32: it can neither run in float64 nor
reach float64's accuracy. So it runs as given: in its arguments' own dtypes and under the
caller's 64-bit setting, never switched around it. The reference runs on the same arguments,
and the *golden* is the reference on the arguments upcast to float64, in 64-bit mode. The output
and every argument's cotangent (under one random output cotangent, drawn in float64 and cast to
the output's dtype; the golden gets the cast values, exactly) are judged by
:mod:`~manualgrad.check.golden`'s criterion, ``err_fn ≤ k · err_ref + floor · scale``; so are
the ``jit``, ``vmap`` and ``grad_of_grad`` values (``vjp`` and ``jit`` are the same compiled
values, as in :mod:`~manualgrad.check.checker`).

A reference that cannot be a golden, because it computes below float64 inside (a
``preferred_element_type=jnp.float32``), is found out (:func:`resolution`): at a float64 golden,
a perturbation of the arguments far below float32's resolution moves every value smoothly; at
one that rounds to float32 inside, the values move by steps of that rounding. It is said in the
report, and the golden is used all the same with each allowance widened by the rounding measured
(:func:`~manualgrad.check.golden.judge`'s ``golden_error``): never a silent pass.

``finite_diff`` runs in the function's own dtype too: in float32 as the coarse differences of
:mod:`~manualgrad.check.coarse`, which measure the function's round-off and choose their step and
tolerance from it (they check the hand VJP against the function's own forward, the reference not
involved). The checks that cannot apply are reported as such
(:meth:`~manualgrad.check.report.Finding.not_applicable`): ``finite_diff`` in bfloat16 and float16
(no step resolves a derivative there), ``adjoint``
(:mod:`~manualgrad.check.checker` says so for every function checked with a reference), and
``grad_of_grad`` where JAX cannot differentiate the backward (a ``pallas_call`` in it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from manualgrad.check import coarse, diagnose
from manualgrad.check.autodiff import Traced, side
from manualgrad.check.comparison import compare_golden, least_precise
from manualgrad.check.errors import BackwardError, ReferenceFailed
from manualgrad.check.finite_differences import finite_differences
from manualgrad.check.golden import upcast
from manualgrad.check.report import NOT_APPLICABLE, Finding
from manualgrad.check.targets import function_name
from manualgrad.check.tolerances import TOLERANCES, fast_compile_options
from manualgrad.check.trees import closure, host, is_float_tree, random_like, stack_perturbed
from manualgrad.registry import Rule, Sample
from manualgrad.text import first_line

LABEL = "given"  # the one sample: the arguments as given
# The perturbation that tests the golden's resolution, relative to each argument's largest entry:
# far below float32's resolution (ε = 1.2e-7), far above float64's (2.2e-16), and small enough
# that a smooth function's second difference (its curvature times the square) stays at round-off.
PERTURBATION = 1e-8
# A golden resolves float64 where its second differences stay below this share of its first
# ones: a float64 reference's are about 1e-8 of them (round-off 1e-16 over steps of 1e-8), one
# rounding to float32 inside has steps of its own rounding, of the order of the first differences.
RESOLVED = 1e-3
WANTED = ("forward", "jit", "vmap", "grad_of_grad")


@dataclasses.dataclass(frozen=True)
class Sides:
    """The draws and the three sides' values (a value, or the exception its check raised)."""

    names: list[str]
    u: Any
    fn: dict[str, Any]
    ref: dict[str, Any]
    gold: dict[str, Any]
    golden_error: dict[str, float]  # per output or argument name: the golden's own rounding (0: resolved)


def check_in_own_dtype(
    rule: Rule, args: Sequence[Any], checks: Sequence[str], key: jax.Array
) -> tuple[str, list[Finding], list[str]]:
    """The findings of ``rule`` (a user's function and reference, :func:`~manualgrad.check.targets.user_rule`)
    at ``args`` in their own dtypes, with the dtypes' name and the report's notes."""
    args = tuple(args)
    diff = [i for i in rule.differentiable if is_float_tree(args[i])]  # integer labels are not differentiated
    names = [rule.argnames[i] if i < len(rule.argnames) else f"args[{i}]" for i in diff]
    primals = [args[i] for i in diff]
    dtype = least_precise(primals)
    judged = [c for c in ("forward", "vjp", "jit", "vmap", "grad_of_grad") if c in checks]
    try:
        sides = _sides(rule, args, diff, names, checks, key)
    except Exception as error:  # neither the function nor the reference has an output to draw a cotangent for
        return dtype, [_failed(rule, c, dtype, error, rule.name) for c in judged], []
    notes = [_golden_note(rule, dtype, sides.golden_error)]
    findings = [f for check in judged for f in _judged(rule, args, diff, check, sides)]
    if "finite_diff" in checks:
        findings += _finite_differences(rule, args, diff, names, dtype, key)
    return dtype, findings, notes


def _sides(rule: Rule, args, diff, names, checks, key) -> Sides:
    wanted = [c for c in WANTED if c in checks or (c == "jit" and "vjp" in checks)]
    primals = [args[i] for i in diff]
    ku, kv, kb, kp = jax.random.split(key, 4)
    hand, ref = closure(rule.fn, args, diff), closure(rule.reference, args, diff)
    try:
        out = jax.eval_shape(hand, *primals)
    except Exception:  # the function's checks report it; the reference's output is shaped as the function's must be
        out = jax.eval_shape(ref, *primals)
    u = random_like(ku, out)  # drawn in float64 on the host, cast to the output's dtype
    v = [random_like(k, p) for k, p in zip(jax.random.split(kv, len(primals)), primals)]
    batched = [stack_perturbed(k, p) for k, p in zip(jax.random.split(kb, len(primals)), primals)]
    inputs = (primals, u, batched, stack_perturbed(ku, u))
    fn_values = _values(Traced.of(hand), v, wanted, inputs)
    ref_values = _values(Traced.of(ref), v, wanted, inputs)
    with jax.enable_x64(True):
        up_args, up_inputs, up_v = upcast(args), upcast(inputs), upcast(v)
        gold = Traced.of(closure(rule.reference, up_args, diff))
        up_inputs = _cotangents_cast(gold, up_inputs)
        gold_values = _values(gold, up_v, wanted, up_inputs)
        try:
            rounding = resolution(gold, up_inputs[0], up_inputs[1], names, kp)
        except Exception:  # the golden's own failure is reported by its checks
            rounding = {}
    return Sides(names, u, fn_values, ref_values, gold_values, rounding)


def _cotangents_cast(gold: Traced, inputs):
    """``inputs`` with the output cotangents in the golden's output dtypes: float64, unless the
    reference returns another dtype from float64 arguments (one that computes in float32 inside
    may), whose VJP takes no other (:func:`resolution` then finds it out)."""
    primals, u, batched, batched_u = inputs
    try:
        out = jax.eval_shape(gold.forward, *primals)
    except Exception:  # the golden's own failure is reported by its checks
        return inputs

    def cast(tree, stacked):
        return jax.tree_util.tree_map(lambda a, s: a if a.dtype == s.dtype else host(a, s.dtype), tree, stacked)

    return primals, cast(u, out), batched, cast(batched_u, out)


def _values(fn: Traced, v, wanted, inputs) -> dict[str, Any]:
    """Every check's values from one compiled program; where it cannot be built, each check
    alone, and the exception of each that raised in its place."""
    options = fast_compile_options()

    def program(only):
        return jax.jit(lambda i, v: side(fn, v, only, *i), compiler_options=options)

    try:
        return jax.device_get(program(tuple(wanted))(inputs, v))
    except Exception:  # which check raised is found out one check at a time
        out: dict[str, Any] = {}
        for check in wanted:
            try:
                out[check] = jax.device_get(program((check,))(inputs, v)[check])
            except Exception as error:
                out[check] = error
        return out


def resolution(gold: Traced, primals, u, names: Sequence[str], key: jax.Array) -> dict[str, float]:
    """Per quantity (``"output"`` and each argument's cotangent): 0 where the golden resolves
    float64, else its rounding, the largest second difference of its values along two random
    perturbations of :data:`PERTURBATION` of the arguments (see the module's docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(primals)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
    points = [[np.asarray(x, np.float64) for x in leaves]]
    for _ in range(2):
        steps = []
        for x in points[0]:
            r = rng.standard_normal(x.shape)
            steps.append(
                PERTURBATION
                * max(float(np.max(np.abs(x), initial=0.0)), 1e-300)
                * r
                / max(np.max(np.abs(r), initial=0.0), 1e-300)
            )
        points += [[x + s for x, s in zip(points[0], steps)], [x - s for x, s in zip(points[0], steps)]]
    stacked = treedef.unflatten([jax.device_put(np.stack(column)) for column in zip(*points)])

    def values(p):
        return (gold.forward(*p), gold.pull(p, u))

    out, back = jax.device_get(jax.jit(jax.vmap(values))(stacked))
    quantities = {"output": out, **dict(zip(names, back))}
    return {name: _rounding(values) for name, values in quantities.items()}


def _rounding(tree) -> float:
    """0 where the values at ``x``, ``x ± d₁``, ``x ± d₂`` (stacked) move smoothly, else their largest
    second difference."""
    first = second = 0.0
    for leaf in jax.tree_util.tree_leaves(tree):
        g = np.asarray(leaf, np.float64)
        for plus, minus in ((1, 2), (3, 4)):
            first = max(first, float(np.max(np.abs(g[plus] - g[minus]), initial=0.0)) / 2)
            second = max(second, float(np.max(np.abs(g[plus] - 2 * g[0] + g[minus]), initial=0.0)))
    return 0.0 if second <= RESOLVED * first else second


def _golden_note(rule: Rule, dtype: str, rounding: dict[str, float]) -> str:
    name = function_name(rule.reference, "the reference")
    said = f"judged in its own dtype {dtype} against the golden, {name} on the arguments in float64 (golden.CRITERIA)"
    rough = {k: e for k, e in rounding.items() if e > 0}
    if not rough:
        return said
    worst = max(rough.values())
    return (
        f"{said}; but {name} does not resolve float64: under a perturbation of {PERTURBATION:g} of the arguments its "
        f"float64 values of {', '.join(rough)} move by steps of its own rounding (up to {worst:.1e}), as a reference "
        f"computing in float32 inside does; each allowance there is widened by 3 times that rounding"
    )


def _failed(rule: Rule, check: str, dtype: str, error: Exception, whose: str) -> Finding:
    if isinstance(error, (ReferenceFailed, BackwardError)):
        note = first_line(error)
    else:
        note = f"{whose} raised {type(error).__name__}: {first_line(error)}"
    return Finding.not_run(rule.name, check, dtype, LABEL, note, tolerance=np.nan)


def _judged(rule: Rule, args, diff, check: str, s: Sides) -> list[Finding]:
    """One check's findings: the output's or every argument's, judged against the golden."""
    key = "jit" if check == "vjp" else check
    dtype = least_precise(s.u if check == "forward" else [args[i] for i in diff])
    fn, ref, gold = s.fn.get(key), s.ref.get(key), s.gold.get(key)
    for values, whose in (
        (s.fn, rule.name),
        (s.ref, "the reference"),
        (s.gold, "the golden (the reference in float64)"),
    ):
        value = values.get(key)
        if not isinstance(value, Exception):
            continue
        if check == "grad_of_grad" and not isinstance(values.get("jit"), Exception):  # its first order ran
            why = f"JAX cannot differentiate {whose}'s backward ({type(value).__name__}: {first_line(value)})"
            return [Finding.not_applicable(rule.name, check, dtype, LABEL, why)]
        return [_failed(rule, check, dtype, value, whose)]
    quantities = [("output", fn, ref, gold)] if check == "forward" else list(zip(s.names, fn, ref, gold))
    found = []
    for name, received, expected, golden in quantities:
        error = s.golden_error.get(name, 0.0)
        note = f"the golden's own rounding {error:.1e} allowed for" if error else ""
        f = compare_golden(rule.name, check, LABEL, name, received, expected, golden, error, note)
        if check == "vjp" and f.failed and f.dtype in TOLERANCES:
            f = dataclasses.replace(
                f, diagnosis=_diagnosis(rule, args, diff[s.names.index(name)], received, s.u, f.dtype)
            )
        found.append(f)
    return found


def _diagnosis(rule: Rule, args, argument: int, received, u, dtype: str) -> str:
    """:func:`~manualgrad.check.diagnose.diagnose` against the golden, at round-off of ``dtype``."""
    try:
        with jax.enable_x64(True):
            return diagnose.diagnose(rule, upcast(args), argument, received, upcast(u), dtype)
    except Exception:  # the diagnosis is a help, never a reason for the check to fail
        return ""


def _finite_differences(rule: Rule, args, diff, names, dtype: str, key) -> list[Finding]:
    """In float64, the checker's finite differences (:mod:`~manualgrad.check.finite_differences`);
    in float32, coarse differences in the function's own dtype, their step and tolerance from its
    measured round-off (:mod:`~manualgrad.check.coarse`); in bfloat16 and float16 not applicable."""
    if dtype in ("bfloat16", "float16"):
        why = (
            f"finite differences cannot resolve a derivative in {dtype}, whose round-off "
            f"({float(np.finfo(jax.numpy.dtype(dtype)).eps):.0e}) swamps any step small enough; the cotangents "
            "are judged against the float64 golden instead"
        )
        return [Finding.not_applicable(rule.name, "finite_diff", dtype, LABEL, why)]
    try:
        if dtype != "float64":
            return _coarse(rule, args, diff, names, dtype, key)
        differences = finite_differences(rule, Sample(args, LABEL), diff, names, key)
        values = jax.jit(differences.evaluate, compiler_options=fast_compile_options())(*differences.inputs)
    except Exception as error:  # the function's forward or backward raised: a failure of the check
        return [_failed(rule, "finite_diff", dtype, error, rule.name)]
    tol = TOLERANCES["float64"]["finite_diff"]
    return differences.findings(rule.name, LABEL, dtype, tol, *map(np.asarray, values))


def _coarse(rule: Rule, args, diff, names, dtype: str, key) -> list[Finding]:
    """:func:`~manualgrad.check.coarse.check` of the function as one of its arguments' floating
    leaves, one finding per leaf (``p['w1']``), in the caller's 64-bit setting."""
    paths, treedef = jax.tree_util.tree_flatten_with_path([args[i] for i in diff])
    leaves = [leaf for _, leaf in paths]
    labels = [f"{names[path[0].idx]}{jax.tree_util.keystr(path[1:])}" for path, _ in paths]
    fn = closure(rule.fn, args, diff)

    def whole(flat):
        return fn(*treedef.unflatten(flat))

    out = jax.eval_shape(whole, leaves)
    pull = jax.jit(lambda flat, u: jax.vjp(whole, flat)[1](u)[0])
    every = list(range(len(leaves)))
    found = coarse.check(
        rule.name, LABEL, jax.jit(whole), pull, leaves, every, labels, dtype, key, lambda k: random_like(k, out)
    )
    instead = ": its cotangent is judged against the float64 golden instead"  # the reference is given here
    return [
        dataclasses.replace(f, note=f.note.split(": ")[0] + instead) if f.status == NOT_APPLICABLE else f for f in found
    ]
