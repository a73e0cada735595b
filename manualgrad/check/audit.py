"""The audit: every ``custom_vjp`` inside any function, checked where it is called.

:func:`audit` traces ``fn`` with ``jax.make_jaxpr`` and evaluates the jaxpr with an interpreter
(:class:`_Interpreter`) that enters ``jit``, nested ``jit``, ``closed_call``, ``checkpoint``,
``custom_jvp_call``, ``scan``, ``while`` and ``cond`` wherever a ``custom_vjp`` call lies inside
them, and records the values each ``custom_vjp`` call receives: manualgrad's rules and the user's
own alike. Under ``vmap`` a call site receives the whole batch (JAX batches the rule); inside
``scan`` and ``while`` every iteration is recorded and :data:`CALLS_PER_SITE` of them, evenly
spread from the first to the last, are checked; of a ``cond`` only the branch taken runs, and a
call site in a branch never taken is listed as not reached (nothing to check it at).

At each recorded call, with the call's own arguments ``a`` and a random output cotangent ``u``,
the call's VJP ``uᵀ ∂f(a)`` by its fwd and bwd is judged (:mod:`~manualgrad.check.audit_calls`)
against the user's reference for the function where ``references`` gives one (the golden
criterion, in the call's own dtype); else against JAX's autodiff of the custom_vjp's primal
function ``f`` (the eqn's ``call_jaxpr``, custom_vjp calls nested in it evaluated by their own
primal); where JAX cannot differentiate ``f``, against finite differences: in float64 as the
checker's, in float32 or lower coarse ones in the call's dtype. The report says for each call
site what it was judged against. Any call whose checks raise fails on that call (a check that
could not run has failed).

The report names each call site by the custom_vjp function's name and where it is defined
(``file:line``, from the jaxpr's debug info or the backward's code) and where it is called; the
first failing call in backward order (the last one to run forward) is where the gradient first
goes wrong.

JAX's primitive names differ between releases (``custom_vjp_call`` / ``custom_vjp_call_jaxpr``,
``pjit`` / ``jit``, ``remat2`` / ``checkpoint``): they are matched by substring, and a higher-order
primitive the interpreter does not know (``shard_map``, say) is run as it is, and each call site
inside it fails, not run: it ran unseen.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax.extend.core import Literal
except ImportError:  # a jax without jax.extend.core.Literal: the older public name
    from jax.core import Literal

from manualgrad.check import sources
from manualgrad.check.audit_calls import FLOAT32_INSIDE, REFERENCE_ROUNDS, Call, Judged, Pullbacks, bind, check_call
from manualgrad.check.errors import CheckError
from manualgrad.check.report import NOT_APPLICABLE, NOT_RUN, Finding, Report
from manualgrad.check.tolerances import fast_compile_options
from manualgrad.text import table

__all__ = ["CALLS_PER_SITE", "AuditReport", "CallSite", "audit"]

# Calls checked per call site (a site inside a loop runs once per iteration): the first, the last
# and evenly between. A site's two VJPs are compiled once; each call checked runs them once.
CALLS_PER_SITE = 3
_CALLS = ("jit", "call", "remat", "checkpoint")  # call-like primitives: the sub-jaxpr takes the eqn's inputs


@dataclasses.dataclass
class CallSite:
    """One ``custom_vjp`` call in the traced function and what the audit found there."""

    name: str
    defined: str  # file:line of the custom_vjp function
    called: str  # file:line of the call, "" where JAX kept no user frame
    argnames: tuple[str, ...]
    calls: int = 0  # times it ran
    checked: int = 0  # of those, the calls checked (CALLS_PER_SITE at most)
    last: int = -1  # its last call's position in the forward order of every call (-1: none ran)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    reached: str = ""  # why it never ran, for a site that did not ("" once it ran)
    judged: str = Judged.NOTHING.value  # what its calls were judged against (audit_calls.Judged)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.defined})"

    @property
    def passed(self) -> bool:
        """No finding failed (one not applicable is no failure)."""
        return not any(f.failed for f in self.findings)

    def row(self) -> tuple[str, ...]:
        """``(function, defined at, called at, calls, judged against, argument, worst relative error,
        worst error over the error allowed it, verdict, diagnosis)``."""
        if not self.calls and not self.findings:
            return self.name, self.defined, self.called, "0", "-", "-", "-", "-", "not reached", self.reached
        if not self.findings:
            return (
                self.name,
                self.defined,
                self.called,
                str(self.calls),
                "-",
                "-",
                "-",
                "-",
                "-",
                "no floating argument",
            )
        worst = max(self.findings, key=_rank)
        verdict = "not run" if worst.where == NOT_RUN else "FAIL" if worst.failed else _VERDICTS[worst.status]
        explanation = worst.diagnosis or (worst.note if not worst.passed else "")
        if worst.golden and worst.where != NOT_RUN:
            errors = f"err_fn {worst.max_abs_error:.1e}, err_ref {worst.err_ref:.1e}, ratio {worst.ratio:.2g}"
            said = {
                FLOAT32_INSIDE: f"{worst.dtype}'s criterion (computes in {worst.dtype} inside)",
                REFERENCE_ROUNDS: "the reference rounds below float64 (allowed for)",
            }
            flags = [text for key, text in said.items() if key in worst.note]
            explanation = "; ".join(filter(None, [errors, *flags, worst.diagnosis]))
        return (
            self.name,
            self.defined,
            self.called,
            str(self.calls),
            self.judged,
            worst.argument,
            f"{worst.max_rel_error:.1e}",
            f"{worst.error_over_allowed:.2g}",
            verdict,
            explanation,
        )


_VERDICTS = {"passed": "ok", NOT_APPLICABLE: NOT_APPLICABLE}


def _rank(f: Finding) -> tuple[bool, bool, float, float]:
    """A call site's worst finding is the largest: a failure, then one passed rather than one not
    applicable, then the largest error over the error allowed it."""
    return f.failed, f.passed, np.nan_to_num(f.error_over_allowed, nan=-np.inf), np.nan_to_num(f.max_rel_error)


@dataclasses.dataclass
class AuditReport(Report):
    """A :class:`~manualgrad.check.report.Report` of an audit (``passed``, ``failures()``, each
    finding's ``describe()``), with its call sites in backward order."""

    function: str = ""
    sites: list[CallSite] = dataclasses.field(default_factory=list)

    def first_failure(self) -> CallSite | None:
        """The call site where the gradient first goes wrong: the first failing one in backward order."""
        return next((s for s in self.sites if not s.passed), None)

    def text(self) -> str:
        """The table of call sites in backward order and the verdict."""
        checked = sum(s.checked for s in self.sites)
        head = (
            f"audit of {self.function}: {len(self.sites)} custom_vjp call sites, {checked} calls checked, "
            f"{self.seconds:.1f} s (backward order)"
        )
        header = (
            *("function", "defined at", "called at", "calls", "judged against", "argument"),
            *("worst", "/allowed", "verdict", "diagnosis"),
        )
        lines = [head, *table([header, *(s.row() for s in self.sites)], indent="  ")]
        first, inapplicable = self.first_failure(), self.not_applicable()
        if first is None and not inapplicable:
            lines.append("every custom_vjp call site agrees with what it was judged against")
        elif first is None:
            lines.append("no custom_vjp call site disagrees with what it was judged against")
        else:
            where = f", called at {first.called}" if first.called else ""
            lines.append(f"the gradient first goes wrong at {first.name} (defined at {first.defined}{where}):")
            lines += [f"  {f.describe()}" for f in first.findings if f.failed][:3]
        unreached = [s for s in self.sites if not s.calls and not s.findings]
        if unreached:
            lines.append(f"{len(unreached)} call site(s) never ran on these arguments and were not checked")
        if inapplicable:
            lines.append(
                f"{len(inapplicable)} of {len(self.findings)} comparisons not applicable (neither passed nor failed): "
                + "; ".join(dict.fromkeys(f"{f.rule.split(' ')[0]}: {f.note}" for f in inapplicable))
            )
        return "\n".join(line.rstrip() for line in lines)


def audit(
    fn: Callable[..., Any],
    *args: Any,
    seed: int = 0,
    calls_per_site: int = CALLS_PER_SITE,
    references: Mapping[Callable[..., Any] | str, Callable[..., Any]] | None = None,
) -> AuditReport:
    """Checks every ``custom_vjp`` call inside ``fn(*args)`` at the values it receives there.

    For each call with arguments ``a`` and a random output cotangent ``u``, the call's own VJP
    ``uᵀ ∂f(a)`` (its fwd and bwd) is compared with ``jax.vjp`` of the custom_vjp's primal ``f``
    at ``a`` (finite differences where JAX cannot differentiate ``f``: coarse ones, in the call's
    own dtype, below float64). ``references`` maps a custom_vjp function (or its name as the report
    prints it) to a plain reference taking the same arguments, e.g. a Pallas kernel to its
    ``*_reference``: its calls are judged by the golden criterion in their own dtype
    (:mod:`~manualgrad.check.golden`). Returns an :class:`AuditReport`: ``passed``, ``failures()``,
    ``first_failure()``, ``text()``.
    """
    if calls_per_site < 1:
        raise CheckError(f"audit: calls_per_site must be at least 1, got {calls_per_site}")
    start = time.perf_counter()
    name = getattr(fn, "__name__", type(fn).__name__)
    closed = jax.make_jaxpr(fn)(*args)
    sites = _sites(closed.jaxpr)
    given = _references(references or {}, closed.jaxpr, sites, name)
    recorder = _Recorder()
    _Interpreter(recorder.on_call, recorder.on_unentered).run(
        closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args)
    )
    for eqn_id, position in recorder.last.items():
        sites[eqn_id].last = position
    key = jax.random.PRNGKey(seed)
    pullbacks: dict[int, Pullbacks] = {}
    for eqn_id, calls in recorder.calls.items():
        site = sites[eqn_id]
        site.calls = len(calls)
        chosen = _spread(calls, calls_per_site)
        site.checked = len(chosen)
        for call in chosen:
            key, sub = jax.random.split(key)
            judged, findings = check_call(site, call, pullbacks, sub, _primal, given.get(eqn_id))
            site.judged, site.findings = judged.value, site.findings + findings
        site.reached = ""
    ordered = sorted(sites.values(), key=lambda s: -s.last)
    dtypes = sorted({f.dtype for s in ordered for f in s.findings})
    return AuditReport(
        dtype=", ".join(dtypes) or "-",
        findings=[f for s in ordered for f in s.findings],
        seconds=time.perf_counter() - start,
        function=name,
        sites=ordered,
    )


def _references(
    references: Mapping[Any, Callable[..., Any]], jaxpr, sites: dict[int, CallSite], function: str
) -> dict[int, Callable[..., Any]]:
    """The reference of each call site (by its eqn's id) that ``references`` keys by its custom_vjp
    function or its name; a key that is neither, or that no call site has, is refused."""
    given: dict[int, Callable[..., Any]] = {}
    for key, reference in references.items():
        shown = key if isinstance(key, str) else getattr(key, "__name__", repr(key))
        if isinstance(key, str):
            matched = [eqn_id for eqn_id, site in sites.items() if site.name == key]
        elif callable(getattr(key, "bwd", None)):
            matched = [id(eqn) for eqn, _ in _site_eqns(jaxpr) if sources.backward(eqn) is key.bwd]
        else:
            raise CheckError(f"audit: references are keyed by a custom_vjp function or its name, got {shown}")
        if not callable(reference):
            raise CheckError(f"audit: the reference given for {shown} is a {type(reference).__name__}, not a function")
        if not matched:
            called = ", ".join(dict.fromkeys(s.name for s in sites.values())) or "none"
            raise CheckError(
                f"audit: {function} never calls {shown}, given a reference (the custom_vjp functions it calls: "
                f"{called})"
            )
        given.update(dict.fromkeys(matched, reference))
    return given


def _sites(jaxpr) -> dict[int, CallSite]:
    """Every call site of ``jaxpr`` by its eqn's id, each said not reached until a call is recorded;
    one inside a primitive the interpreter does not enter fails, not run."""
    sites = {
        id(eqn): _site(eqn, called, "in a branch or loop that did not run on these arguments")
        for eqn, called in _site_eqns(jaxpr)
    }
    for eqn_id, reason in _unentered(jaxpr):  # it ran, but unseen: a check that could not run, failed
        site = sites[eqn_id]
        site.reached = reason
        site.findings.append(Finding.not_run(site.label, "vjp", "-", "(not entered)", reason, tolerance=0.0))
    return sites


class _Recorder:
    """Keeps every custom_vjp call's inputs, then runs the call as JAX would."""

    def __init__(self) -> None:
        self.calls: dict[int, list[Call]] = {}
        self.count = 0
        self.forward: dict[int, Callable[..., list[Any]]] = {}  # by eqn id: the call, compiled
        self.last: dict[int, int] = {}  # by eqn id: its last call's position, seen or not

    def on_unentered(self, eqn) -> None:
        """A primitive run whole: the positions of the calls inside it, unseen."""
        for sub in _sub_jaxprs(eqn.params):
            for inner, _ in _site_eqns(sub):
                self.last[id(inner)] = self.count
                self.count += 1

    def on_call(self, interpreter: _Interpreter, eqn, values: list[Any]) -> list[Any]:
        n = eqn.params.get("num_consts", 0)
        call = Call(eqn, values[:n], values[n:], self.count, ", ".join(interpreter.where))
        self.calls.setdefault(id(eqn), []).append(call)
        self.last[id(eqn)] = self.count
        self.count += 1
        if id(eqn) not in self.forward:
            self.forward[id(eqn)] = jax.jit(functools.partial(bind, eqn), compiler_options=fast_compile_options())
        return self.forward[id(eqn)](values)


class _Interpreter:
    """Evaluates a jaxpr eqn by eqn, calling ``on_custom(self, eqn, inputs)`` for each custom_vjp
    call, and entering a higher-order primitive only where a custom_vjp call lies inside it."""

    def __init__(
        self,
        on_custom: Callable[[_Interpreter, Any, list[Any]], list[Any]],
        on_unentered: Callable[[Any], None] = lambda eqn: None,
    ) -> None:
        self.on_custom, self.on_unentered = on_custom, on_unentered
        self.where: list[str] = []
        self._encloses: dict[int, bool] = {}  # by eqn id: whether a custom_vjp call lies inside

    def run(self, jaxpr, consts, args) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for eqn in jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for v, x in zip(eqn.outvars, outs):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, values: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        if _is_custom_vjp(eqn):
            return self.on_custom(self, eqn, values)
        if id(eqn) not in self._encloses:
            self._encloses[id(eqn)] = _encloses(eqn)
        if not self._encloses[id(eqn)]:
            return bind(eqn, values)
        if name == "scan":
            return self.scan(eqn, values)
        if name == "while":
            return self.while_(eqn, values)
        if name == "cond":
            return self.cond(eqn, values)
        sub = _call_jaxpr(eqn)
        if sub is None:
            self.on_unentered(eqn)
            return bind(eqn, values)
        return self.run(*sub, values)

    def scan(self, eqn, values: list[Any]) -> list[Any]:
        p = eqn.params
        body, nc, ncarry, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = values[:nc], values[nc : nc + ncarry], values[nc + ncarry :]
        ys: list[list[Any]] = [[] for _ in range(length)]
        for i in reversed(range(length)) if p.get("reverse", False) else range(length):
            self.where.append(f"scan iteration {i}")
            out = self.run(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)])
            self.where.pop()
            carry, ys[i] = out[:ncarry], out[ncarry:]
        stacked = [
            jnp.stack([y[j] for y in ys]) if length else jnp.zeros(v.aval.shape, v.aval.dtype)
            for j, v in enumerate(eqn.outvars[ncarry:])
        ]
        return [*carry, *stacked]

    def while_(self, eqn, values: list[Any]) -> list[Any]:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, carry = values[:cn], values[cn : cn + bn], values[cn + bn :]
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        i = 0
        while bool(self.run(cond.jaxpr, cond.consts, [*cond_consts, *carry])[0]):
            self.where.append(f"while iteration {i}")
            carry = self.run(body.jaxpr, body.consts, [*body_consts, *carry])
            self.where.pop()
            i += 1
        return carry

    def cond(self, eqn, values: list[Any]) -> list[Any]:
        branches = eqn.params["branches"]
        index = int(np.clip(int(values[0]), 0, len(branches) - 1))
        self.where.append(f"cond branch {index}")
        out = self.run(branches[index].jaxpr, branches[index].consts, values[1:])
        self.where.pop()
        return out


def _is_custom_vjp(eqn) -> bool:
    return "custom_vjp" in eqn.primitive.name


def _closed(jaxpr) -> tuple[Any, list[Any]]:
    """``(jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr."""
    return (jaxpr.jaxpr, list(jaxpr.consts)) if hasattr(jaxpr, "consts") else (jaxpr, [])


def _call_jaxpr(eqn) -> tuple[Any, list[Any]] | None:
    """The sub-jaxpr of a call-like primitive (``jit``, ``closed_call``, ``checkpoint``,
    ``custom_jvp_call``, ...), which takes the eqn's inputs and gives its outputs; else ``None``."""
    if not any(part in eqn.primitive.name for part in _CALLS):
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            jaxpr, consts = _closed(eqn.params[key])
            if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
                return jaxpr, consts
    return None


def _primal_jaxpr(eqn) -> tuple[Any, list[Any]]:
    """A custom_vjp call's primal function, as ``(jaxpr, consts)``: it takes the call's inputs."""
    return _closed(eqn.params["call_jaxpr"] if "call_jaxpr" in eqn.params else eqn.params["fun_jaxpr"])


def _sub_jaxprs(params: dict[str, Any]) -> Iterator[Any]:
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns") or hasattr(item, "consts") and hasattr(item, "jaxpr"):
                yield _closed(item)[0]


def _site_eqns(jaxpr, outer: str = "") -> Iterator[tuple[Any, str]]:
    """Every custom_vjp eqn of ``jaxpr`` and of its sub-jaxprs, with where the user's code calls it
    (else where it calls the primitive around it, ``outer``); not those inside a custom_vjp's primal
    (they take no part in the function's gradient)."""
    for eqn in jaxpr.eqns:
        called = sources.called(eqn) or outer
        if _is_custom_vjp(eqn):
            yield eqn, called
        else:
            for sub in _sub_jaxprs(eqn.params):
                yield from _site_eqns(sub, called)


def _encloses(eqn) -> bool:
    """Whether a custom_vjp call lies inside the higher-order primitive ``eqn``."""
    return any(True for sub in _sub_jaxprs(eqn.params) for _ in _site_eqns(sub))


def _unentered(jaxpr) -> Iterator[tuple[int, str]]:
    """``(id of a custom_vjp eqn, why)`` for each inside a higher-order primitive the interpreter runs as it is."""
    for eqn in jaxpr.eqns:
        if _is_custom_vjp(eqn):
            continue
        known = eqn.primitive.name in ("scan", "while", "cond") or _call_jaxpr(eqn) is not None
        if known:
            for sub in _sub_jaxprs(eqn.params):
                yield from _unentered(sub)
        else:
            for inner, _ in (pair for sub in _sub_jaxprs(eqn.params) for pair in _site_eqns(sub)):
                yield id(inner), f"inside {eqn.primitive.name}, which the audit does not enter"


def _site(eqn, called: str, reached: str) -> CallSite:
    jaxpr, _ = _primal_jaxpr(eqn)
    name, (file, line) = sources.definition(eqn, jaxpr)
    n = len(eqn.invars) - eqn.params.get("num_consts", 0)
    return CallSite(name, f"{sources.shown(file)}:{line}", called, sources.argnames(file, line, n), reached=reached)


def _spread(calls: list[Call], k: int) -> list[Call]:
    """``k`` of ``calls`` evenly spread, the first and the last among them."""
    if len(calls) <= k:
        return calls
    return [calls[i] for i in sorted({round(j * (len(calls) - 1) / (k - 1)) for j in range(k)})] if k > 1 else calls[:1]


def _primal(eqn, values: list[Any]) -> list[Any]:
    """The custom_vjp call's primal function at ``values``, custom_vjp calls inside it evaluated by
    their own primal, so that JAX differentiates plain code only."""
    jaxpr, consts = _primal_jaxpr(eqn)
    return _Interpreter(lambda interpreter, inner, inputs: _primal(inner, inputs)).run(jaxpr, consts, values)
