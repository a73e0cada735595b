"""One recorded call of a ``custom_vjp`` call site judged by the audit (:func:`check_call`).

Each call is judged against the best ground truth on hand, and the report says which
(:class:`Judged`, the ``judged against`` column):

* ``reference (golden)``: the user's reference for the function (``audit(..., references=...)``),
  by the golden criterion (:mod:`~manualgrad.check.golden`) in the call's own dtype. The call's
  output and VJP (its fwd and bwd) and the reference's, both run in that dtype, are each compared
  with the *golden*, the reference on the arguments upcast to float64 in 64-bit mode, under the
  same random cotangent: ``err_fn = max |call − golden|``, ``err_ref = max |ref − golden|``. A
  float64 call computing in float32 inside is judged by float32's criterion, and a reference
  computing below float64 inside has its rounding allowed for, each said in the finding's note
  (:func:`_against_reference`);
* ``autodiff``: JAX's autodiff of the custom_vjp's primal function, entry by entry at the ``vjp``
  tolerance of the call's dtype, every entry judged relative to the larger of itself and the
  argument's largest entry (inside a real model the values are not of order one, and round-off of
  a sum is relative to its terms, not to a result that cancels);
* ``finite differences``: where JAX cannot differentiate the primal, in float64
  (:mod:`~manualgrad.check.finite_differences`);
* ``coarse finite differences``: the same in float32 or lower, in the call's own dtype, with a step
  and a tolerance from the function's measured round-off (:mod:`~manualgrad.check.coarse`); also
  for any call in a dtype the ``vjp`` tolerances do not cover (bfloat16, float16), where too coarse
  to pass anything they are not applicable.

Only the golden runs in 64-bit mode: the call itself runs in the caller's setting, whatever its
dtype (a kernel's int32 index arithmetic breaks where JAX's 64-bit mode is switched on around it).
A failing comparison is diagnosed (:mod:`~manualgrad.check.diagnose`): with the rule's own mistakes
for a registered manualgrad rule, the generic ones (transposed, a constant factor) else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import registry
from manualgrad.check import coarse, diagnose, golden, sources
from manualgrad.check.autodiff import Traced
from manualgrad.check.comparison import compare, compare_golden
from manualgrad.check.finite_differences import finite_differences
from manualgrad.check.own_dtype import resolution
from manualgrad.check.report import Finding
from manualgrad.check.tolerances import ATOL, TOLERANCES, fast_compile_options
from manualgrad.check.trees import closure, host, is_float, random_like
from manualgrad.registry import Rule, Sample
from manualgrad.text import first_line

FLOAT32_INSIDE = (
    "its float64 values agree with the golden only to float32's round-off (it computes in float32 inside): "
    "judged by float32's criterion, against the reference in float32"
)


REFERENCE_ROUNDS = "the reference does not resolve float64"


class Judged(str, enum.Enum):
    """What a call site was judged against, as the report's ``judged against`` column says it."""

    REFERENCE = "reference (golden)"
    AUTODIFF = "autodiff"
    FINITE_DIFFERENCES = "finite differences"
    COARSE = "coarse finite differences"
    NOTHING = "-"


class CallSite(Protocol):
    """What the audit knows of a call site (:class:`manualgrad.check.audit.CallSite`)."""

    name: str
    defined: str
    called: str
    argnames: tuple[str, ...]

    @property
    def label(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded call of a site: its closed-over constants, its arguments, where it ran."""

    eqn: Any
    consts: list[Any]
    args: list[Any]
    position: int  # among every recorded call, in forward order
    where: str  # e.g. "scan iteration 3"


def bind(eqn, values: list[Any]) -> list[Any]:
    """The eqn evaluated as ``jax.core.eval_jaxpr`` evaluates it: ``get_bind_params`` returns the
    parameters (jax 0.10) or ``(sub-functions, parameters)`` (earlier releases)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext()):
        out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _one(outputs: list[Any]) -> Any:
    """A call's outputs as its function returns them: one array alone, several as a list."""
    return outputs[0] if len(outputs) == 1 else outputs


def _pull(fn: Callable[..., Any], diff: list[int], consts, args, u) -> tuple[Any, Any]:
    """``fn``'s outputs and VJP under ``u`` for the arguments ``diff``, the others fixed."""
    out, pull = jax.vjp(closure(lambda *a: fn(consts, list(a)), args, diff), *[args[i] for i in diff])
    return out, pull(u)


class Pullbacks:
    """A call site's programs, each compiled once for all its calls (with the checker's compiler
    options): the call, its own VJP by its fwd and bwd (``hand``), JAX's of its primal function
    (``autodiff``), and the reference's in the call's dtype and as the golden (``golden``)."""

    def __init__(self, eqn, diff: list[int], primal: Callable[..., list[Any]], reference=None) -> None:
        options = fast_compile_options()
        self.eqn, self.diff, self._primal, self._reference = eqn, diff, primal, reference
        self.forward = jax.jit(self.call, compiler_options=options)
        self.hand = jax.jit(functools.partial(_pull, self.call, diff), compiler_options=options)
        self.autodiff = jax.jit(functools.partial(_pull, self.primal, diff), compiler_options=options)
        self.referenced = jax.jit(functools.partial(_pull, self.reference, diff), compiler_options=options)

    def call(self, consts: list[Any], args: list[Any]) -> Any:
        return _one(bind(self.eqn, [*consts, *args]))

    def primal(self, consts: list[Any], args: list[Any]) -> Any:
        return _one(self._primal(self.eqn, [*consts, *args]))

    def reference(self, consts: list[Any], args: list[Any]) -> Any:
        return self._reference(*args)

    def golden(self, args: list[Any], u: Any) -> tuple[Any, Any]:
        """The reference's output and VJP on ``args`` and ``u`` upcast to float64, in 64-bit mode."""
        with jax.enable_x64(True):
            wide = golden.upcast(args)
            return self.referenced([], wide, self._widened(wide, u))

    def rounding(self, args: list[Any], u: Any, names: list[str], key) -> list[float]:
        """The golden's own rounding, the output's then each argument's cotangent's: 0 where it
        resolves float64 (:func:`~manualgrad.check.own_dtype.resolution`)."""
        with jax.enable_x64(True):
            wide = golden.upcast(args)
            gold = Traced.of(closure(self._reference, wide, self.diff))
            found = resolution(gold, [wide[i] for i in self.diff], self._widened(wide, u), names, key)
        return [found["output"], *(found[n] for n in names)]

    def _widened(self, wide: list[Any], u: Any) -> Any:
        """``u`` in the dtypes of the golden's outputs: float64, or float32 where the reference pins
        its result to it (``preferred_element_type``) whatever it is given."""
        shapes = jax.eval_shape(self._reference, *wide)
        return jax.tree_util.tree_map(lambda c, o: host(c, o.dtype) if is_float(c) else c, u, shapes)


def _cotangent(key, outputs: Any) -> Any:
    """Standard normal draws for the floating outputs, ``float0`` zeros for the others."""
    leaves, treedef = jax.tree_util.tree_flatten(outputs)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [random_like(k, o) if is_float(o) else np.zeros(np.shape(o), jax.dtypes.float0) for k, o in zip(keys, leaves)]
    )


def _call_dtype(args: list[Any], diff: list[int]) -> str:
    """The least precise floating dtype among the differentiated arguments."""
    dtypes = {str(jnp.result_type(args[i])) for i in diff}
    return min(dtypes, key=lambda d: jnp.finfo(d).bits)


def check_call(
    site: CallSite, call: Call, pullbacks: dict[int, Pullbacks], key, primal, reference=None
) -> tuple[Judged, list[Finding]]:
    """What one call was judged against and its findings: one per floating argument (and, against a
    reference, one for the output); one per argument, not run, where the checks raise."""
    args = [jnp.asarray(a) for a in call.args]
    diff = [i for i, a in enumerate(args) if is_float(a)]
    if not diff:
        return Judged.NOTHING, []
    label = (f"called at {site.called}" if site.called else "call") + (f" ({call.where})" if call.where else "")
    dtype = _call_dtype(args, diff)
    names = [site.argnames[i] for i in diff]
    judged = Judged.REFERENCE if reference is not None else Judged.AUTODIFF

    def failed(note: str) -> tuple[Judged, list[Finding]]:
        tol = TOLERANCES.get(dtype, TOLERANCES["float32"])["vjp"]
        return judged, [
            Finding.not_run(site.label, "vjp", dtype, label, note, argument=n, tolerance=tol) for n in names
        ]

    pull = pullbacks.setdefault(id(call.eqn), Pullbacks(call.eqn, diff, primal, reference))
    try:
        u = _cotangent(key, jax.eval_shape(pull.call, call.consts, args))
        out, received = pull.hand(call.consts, args, u)
    except Exception as error:  # a backward that raises is a failure of this call, not a crash of the audit
        return failed(f"the backward raised {type(error).__name__}: {first_line(error)}")
    if reference is not None:
        try:
            return judged, _against_reference(site.label, label, args, diff, names, dtype, pull, u, out, received, key)
        except Exception as error:  # the user's reference: its error said on this call
            return failed(f"the reference raised {type(error).__name__}: {first_line(error)}")
    try:  # no tolerance for autodiff in this dtype: the coarse differences measure their own
        expected = pull.autodiff(call.consts, args, u)[1] if dtype in TOLERANCES else None
    except Exception:  # JAX cannot differentiate the primal: finite differences
        expected = None
    if expected is None and dtype == "float64":
        return Judged.FINITE_DIFFERENCES, _finite_differences(site, pull, call, diff, names, label, key)
    if expected is None:
        forward = functools.partial(pull.forward, call.consts)
        hand = functools.partial(_cotangents, pull.hand, call.consts)
        draw = functools.partial(_cotangent, outputs=out)
        return Judged.COARSE, coarse.check(site.label, label, forward, hand, args, diff, names, dtype, key, draw)
    rule = _rule(site, call, lambda *a: pull.primal(call.consts, list(a)), diff)
    return judged, _against_autodiff(site.label, label, args, diff, names, dtype, rule, u, received, expected)


def _cotangents(hand: Callable[..., tuple[Any, Any]], consts, args, u) -> Any:
    return hand(consts, args, u)[1]


def _against_autodiff(rule_label, label, args, diff, names, dtype, rule, u, received, expected) -> list[Finding]:
    """Entry-by-entry comparisons at the dtype's ``vjp`` tolerance, each failure diagnosed."""
    tol = TOLERANCES[dtype]["vjp"]
    findings = []
    for i, name, r, e in zip(diff, names, received, expected):
        atol = max(ATOL[dtype], tol * float(np.max(np.abs(np.asarray(e, np.float64)), initial=0.0)))
        f = compare(rule_label, "vjp", dtype, label, name, r, e, tol, atol)
        if not f.passed:
            f = dataclasses.replace(f, diagnosis=_diagnosis(rule, args, i, r, u, dtype))
        findings.append(f)
    return findings


def _against_reference(rule, label, args, diff, names, dtype, pull, u, out, received, key) -> list[Finding]:
    """The output and each argument's cotangent by the golden criterion: the call and the reference
    in the call's dtype, each against the golden, under the same cotangent ``u``.

    A float64 call that computes in float32 inside (a kernel casting what it loads) can agree with
    the golden only to float32's round-off: where it fails in float64 but its output meets float32's
    criterion, every comparison is judged by float32's, against the reference on the arguments
    rounded to float32 (the call's values, float32's cast to float64, lose nothing cast back), and
    the note says so. A reference that computes below float64 inside is no exact golden: each
    allowance is widened by its rounding, measured, and the note says so."""
    outputs = jax.tree_util.tree_leaves(out)
    leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(pull.reference, [], args))
    if [np.shape(x) for x in leaves] != [np.shape(x) for x in outputs]:
        shapes = ", ".join(str(tuple(np.shape(x))) for x in leaves)
        raise ValueError(f"the reference returns shapes {shapes}, the call {', '.join(str(x.shape) for x in outputs)}")
    u_ref = tree.unflatten(jax.tree_util.tree_leaves(u))
    rounding = pull.rounding(args, u_ref, names, key)
    gold = (*pull.golden(args, u_ref), rounding, _rounding_note(rounding))
    values = pull.referenced([], args, u_ref)
    findings = _golden_findings(rule, label, args, names, (outputs, received), values, gold)
    if dtype != "float64" or not any(f.failed for f in findings):
        return findings
    low = functools.partial(jax.tree_util.tree_map, lambda x: host(x, np.float32) if is_float(x) else x)
    values = pull.referenced([], low(args), low(u_ref))
    lowered = _golden_findings(rule, label, args, names, low((outputs, received)), values, gold, FLOAT32_INSIDE)
    return findings if lowered[0].failed else lowered


def _rounding_note(rounding: list[float]) -> str:
    if not any(rounding):
        return ""
    return (
        f"{REFERENCE_ROUNDS} (it computes below float64 inside): its float64 values move by "
        f"steps of its own rounding, up to {max(rounding):.1e}; each allowance widened by 3 times that"
    )


def _golden_findings(rule, label, args, names, call_values, ref_values, gold, note: str = "") -> list[Finding]:
    """``(output, cotangents)`` of the call and of the reference against the golden's
    ``(output, cotangents, rounding, note)``, one finding each, a failing cotangent diagnosed."""
    (outputs, received), (ref_out, ref_cot), (gold_out, gold_cot, rounding, said) = call_values, ref_values, gold
    rows = [("forward", "(output)", outputs, ref_out, gold_out)]
    rows += [("vjp", n, r, e, g) for n, r, e, g in zip(names, received, ref_cot, gold_cot)]
    note = "; ".join(filter(None, [note, said]))
    findings = []
    for (check, name, r, e, g), error in zip(rows, rounding):
        f = compare_golden(rule, check, label, name, r, e, g, golden_error=error, note=note)
        cotangent = check == "vjp"
        if f.failed and cotangent and f.dtype in TOLERANCES:
            f = dataclasses.replace(f, diagnosis=_golden_diagnosis(r, g, args, f.dtype))
        findings.append(f)
    return findings


def _golden_diagnosis(received, gold, args, dtype: str) -> str:
    try:
        return diagnose.diagnose_array(received, gold, tuple(args), dtype)
    except Exception:  # nothing to diagnose by: the failure stands undiagnosed
        return ""


def _rule(site: CallSite, call: Call, primal: Callable[..., Any], diff: list[int]) -> Rule:
    """The registered rule the call site is, where it is one called with all its arguments (its
    own mistakes diagnose it); else a rule of the call whose reference is its ``primal``."""
    for rule in registry.rules():
        code = rule.fn.fun.__code__
        if (
            site.defined == f"{sources.shown(code.co_filename)}:{code.co_firstlineno}"
            and not call.consts
            and not rule.fn.nondiff_argnums
            and len(rule.argnames) == len(call.args)
        ):
            return rule
    return Rule(site.name, primal, primal, lambda key, dtype: (), tuple(diff), ())


def _diagnosis(rule: Rule, args: list[Any], i: int, received, u, dtype: str) -> str:
    try:
        return diagnose.diagnose(rule, tuple(args), i, received, u, dtype)
    except Exception:  # a primal JAX cannot jit: the failure stands undiagnosed
        return ""


def _finite_differences(site: CallSite, pull: Pullbacks, call: Call, diff, names, label, key) -> list[Finding]:
    """The VJP of the call (of every argument) against finite differences of the call itself, in float64.

    As against autodiff, an entry is judged relative to the larger of itself and the argument's
    largest derivative (the hand's, never below what the differences allow entry by entry): a
    derivative that should be 0 and differs by 1e-9 where the others are of order one is within
    the tolerance (an ODE solver's adjoint is exact to the solver's tolerance, not to round-off)."""

    def fn(*a):
        return pull.call(call.consts, list(a))

    rule = Rule(site.name, fn, fn, lambda key, dtype: (), tuple(diff), ())
    tol = TOLERANCES["float64"]["finite_diff"]
    differences = finite_differences(rule, Sample(tuple(call.args), label), diff, names, key)
    values, hand = jax.jit(differences.evaluate, compiler_options=fast_compile_options())(*differences.inputs)
    hand = np.asarray(hand)
    findings = differences.findings(site.label, label, "float64", tol, np.asarray(values), hand)
    for k, (f, part) in enumerate(zip(findings, differences.parts)):
        scale = float(np.max(np.abs(hand[part.cotangent_rows, part.columns]), initial=0.0))
        if f.failed and f.where != "shape" and np.isfinite(scale) and f.max_abs_error <= tol * scale:
            note = f"every entry within {tol:.0e} of the argument's largest derivative, {scale:.3g}"
            relative = f.max_abs_error / scale
            notes = "; ".join(filter(None, [f.note, note]))
            findings[k] = dataclasses.replace(
                f, mismatches=0, max_rel_error=relative, error_over_allowed=relative / tol, note=notes
            )
    return findings
