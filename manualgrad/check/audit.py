"""The audit: every ``custom_vjp`` inside any function, checked where it is called, no reference needed.

:func:`audit` traces ``fn`` with ``jax.make_jaxpr`` and evaluates the jaxpr with an interpreter
(:class:`_Interpreter`) that enters ``jit``, nested ``jit``, ``closed_call``, ``checkpoint``,
``custom_jvp_call``, ``scan``, ``while`` and ``cond`` wherever a ``custom_vjp`` call lies inside
them, and records the values each ``custom_vjp`` call receives: manualgrad's rules and the user's
own alike. Under ``vmap`` a call site receives the whole batch (JAX batches the rule); inside
``scan`` and ``while`` every iteration is recorded and :data:`CALLS_PER_SITE` of them, evenly
spread from the first to the last, are checked; of a ``cond`` only the branch taken runs, and a
call site in a branch never taken is listed as not reached (nothing to check it at).

At each recorded call, with the call's own arguments ``a`` and a random output cotangent ``u``:

    received  = the rule's VJP,  uᵀ ∂f(a)   by the call site's fwd and bwd (``jax.vjp`` of the call);
    expected  = JAX's autodiff of the custom_vjp's primal function ``f`` (the eqn's ``call_jaxpr``,
                custom_vjp calls nested in it evaluated by their own primal), at the same ``a``, ``u``.

Where JAX cannot differentiate the primal, float64 calls are checked against finite differences
instead (:mod:`~manualgrad.check.finite_differences`); a float32 call there, or any call whose
checks raise, is a failure on that call (a check that could not run has failed). Agreement is the
``vjp`` tolerance of the call's dtype (:mod:`~manualgrad.check.tolerances`), every entry judged
relative to the larger of itself and the argument's largest entry: inside a real model the values
are not of order one, and round-off of a sum is relative to its terms, not to a result that
cancels. A failing call is diagnosed (:mod:`~manualgrad.check.diagnose`): with the rule's own
mistakes for a registered manualgrad rule, the generic ones (transposed, a constant factor) else.

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

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from jax.extend.core import Literal
except ImportError:  # a jax without jax.extend.core.Literal: the older public name
    from jax.core import Literal

from manualgrad import registry
from manualgrad.check import diagnose, sources
from manualgrad.check.comparison import compare
from manualgrad.check.errors import CheckError
from manualgrad.check.finite_differences import finite_differences
from manualgrad.check.report import NOT_RUN, Finding, Report
from manualgrad.check.tolerances import ATOL, TOLERANCES, fast_compile_options
from manualgrad.check.trees import closure, is_float, random_like
from manualgrad.registry import Rule, Sample
from manualgrad.text import first_line, table

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

    @property
    def label(self) -> str:
        return f"{self.name} ({self.defined})"

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    def row(self) -> tuple[str, ...]:
        """``(function, defined at, called at, calls, argument, worst relative error, worst error over
        the error allowed it, verdict, diagnosis)``."""
        if not self.calls and not self.findings:
            return self.name, self.defined, self.called, "0", "-", "-", "-", "not reached", self.reached
        if not self.findings:
            return self.name, self.defined, self.called, str(self.calls), "-", "-", "-", "-", "no floating argument"
        worst = max(self.findings, key=lambda f: (not f.passed, f.max_rel_error))
        verdict = "ok" if self.passed else ("not run" if worst.where == NOT_RUN else "FAIL")
        explanation = worst.diagnosis or (worst.note if not worst.passed else "")
        return (
            self.name,
            self.defined,
            self.called,
            str(self.calls),
            worst.argument,
            f"{worst.max_rel_error:.1e}",
            f"{worst.error_over_allowed:.2g}",
            verdict,
            explanation,
        )


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
            *("function", "defined at", "called at", "calls", "argument"),
            *("worst", "/allowed", "verdict", "diagnosis"),
        )
        lines = [head, *table([header, *(s.row() for s in self.sites)], indent="  ")]
        first = self.first_failure()
        if first is None:
            lines.append("every custom_vjp call site agrees with JAX's autodiff of its primal function")
        else:
            where = f", called at {first.called}" if first.called else ""
            lines.append(f"the gradient first goes wrong at {first.name} (defined at {first.defined}{where}):")
            lines += [f"  {f.describe()}" for f in first.findings if not f.passed][:3]
        unreached = [s for s in self.sites if not s.calls and not s.findings]
        if unreached:
            lines.append(f"{len(unreached)} call site(s) never ran on these arguments and were not checked")
        return "\n".join(line.rstrip() for line in lines)


def audit(fn: Callable[..., Any], *args: Any, seed: int = 0, calls_per_site: int = CALLS_PER_SITE) -> AuditReport:
    """Checks every ``custom_vjp`` call inside ``fn(*args)`` at the values it receives there.

    For each call with arguments ``a`` and a random output cotangent ``u``, the call's own VJP
    ``uᵀ ∂f(a)`` (its fwd and bwd) is compared with ``jax.vjp`` of the custom_vjp's primal ``f``
    at ``a`` (finite differences where JAX cannot differentiate ``f``). Returns an
    :class:`AuditReport`: ``passed``, ``failures()``, ``first_failure()``, ``text()``.
    """
    if calls_per_site < 1:
        raise CheckError(f"audit: calls_per_site must be at least 1, got {calls_per_site}")
    start = time.perf_counter()
    closed = jax.make_jaxpr(fn)(*args)
    recorder = _Recorder()
    interpreter = _Interpreter(recorder.on_call, recorder.on_unentered)
    interpreter.run(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
    sites = _sites(closed.jaxpr)
    for eqn_id, position in recorder.last.items():
        sites[eqn_id].last = position
    key = jax.random.PRNGKey(seed)
    pullbacks: dict[int, _Pullbacks] = {}
    for eqn_id, calls in recorder.calls.items():
        site = sites[eqn_id]
        site.calls = len(calls)
        chosen = _spread(calls, calls_per_site)
        site.checked = len(chosen)
        for call in chosen:
            key, sub = jax.random.split(key)
            site.findings += _check_call(site, call, pullbacks, sub)
        site.reached = ""
    ordered = sorted(sites.values(), key=lambda s: -s.last)
    dtypes = sorted({f.dtype for s in ordered for f in s.findings})
    return AuditReport(
        dtype=", ".join(dtypes) or "-",
        findings=[f for s in ordered for f in s.findings],
        seconds=time.perf_counter() - start,
        function=getattr(fn, "__name__", type(fn).__name__),
        sites=ordered,
    )


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


@dataclasses.dataclass(frozen=True)
class _Call:
    eqn: Any
    consts: list[Any]
    args: list[Any]
    position: int  # among every recorded call, in forward order
    where: str  # e.g. "scan iteration 3"


class _Recorder:
    """Keeps every custom_vjp call's inputs, then runs the call as JAX would."""

    def __init__(self) -> None:
        self.calls: dict[int, list[_Call]] = {}
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
        call = _Call(eqn, values[:n], values[n:], self.count, ", ".join(interpreter.where))
        self.calls.setdefault(id(eqn), []).append(call)
        self.last[id(eqn)] = self.count
        self.count += 1
        if id(eqn) not in self.forward:
            self.forward[id(eqn)] = jax.jit(functools.partial(_bind, eqn), compiler_options=fast_compile_options())
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
            return _bind(eqn, values)
        if name == "scan":
            return self.scan(eqn, values)
        if name == "while":
            return self.while_(eqn, values)
        if name == "cond":
            return self.cond(eqn, values)
        sub = _call_jaxpr(eqn)
        if sub is None:
            self.on_unentered(eqn)
            return _bind(eqn, values)
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


def _bind(eqn, values: list[Any]) -> list[Any]:
    """The eqn evaluated as ``jax.core.eval_jaxpr`` evaluates it: ``get_bind_params`` returns the
    parameters (jax 0.10) or ``(sub-functions, parameters)`` (earlier releases)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with getattr(getattr(eqn, "ctx", None), "manager", contextlib.nullcontext()):
        out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


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


def _spread(calls: list[_Call], k: int) -> list[_Call]:
    """``k`` of ``calls`` evenly spread, the first and the last among them."""
    if len(calls) <= k:
        return calls
    return [calls[i] for i in sorted({round(j * (len(calls) - 1) / (k - 1)) for j in range(k)})] if k > 1 else calls[:1]


def _cotangent(key, outputs: Any) -> Any:
    """Standard normal draws for the floating outputs, ``float0`` zeros for the others."""
    leaves, treedef = jax.tree_util.tree_flatten(outputs)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [random_like(k, o) if is_float(o) else np.zeros(np.shape(o), jax.dtypes.float0) for k, o in zip(keys, leaves)]
    )


def _one(outputs: list[Any]) -> Any:
    """A call's outputs as its function returns them: one array alone, several as a list."""
    return outputs[0] if len(outputs) == 1 else outputs


def _call_dtype(args: list[Any], diff: list[int]) -> str:
    """The least precise floating dtype among the differentiated arguments."""
    dtypes = {str(jnp.result_type(args[i])) for i in diff}
    return min(dtypes, key=lambda d: jnp.finfo(d).bits)


class _Pullbacks:
    """A call site's two VJPs, each compiled once for all its calls (with the checker's compiler
    options): the call's own, by its fwd and bwd, and JAX's of its primal function."""

    def __init__(self, eqn, diff: list[int]) -> None:
        self.eqn, self.diff = eqn, diff
        options = fast_compile_options()
        self.hand = jax.jit(functools.partial(self._pull, self.call), compiler_options=options)
        self.reference = jax.jit(functools.partial(self._pull, self.primal), compiler_options=options)

    def call(self, consts: list[Any], args: list[Any]) -> Any:
        return _one(_bind(self.eqn, [*consts, *args]))

    def primal(self, consts: list[Any], args: list[Any]) -> Any:
        return _one(_primal(self.eqn, [*consts, *args]))

    def _pull(self, fn, consts, args, u):
        f = closure(lambda *a: fn(consts, list(a)), args, self.diff)
        return jax.vjp(f, *[args[i] for i in self.diff])[1](u)


def _check_call(site: CallSite, call: _Call, pullbacks: dict[int, _Pullbacks], key) -> list[Finding]:
    """The findings of one call: one per floating argument (one per argument, not run, where the checks raise)."""
    args = [jnp.asarray(a) for a in call.args]
    diff = [i for i, a in enumerate(args) if is_float(a)]
    if not diff:
        return []
    label = f"called at {site.called}" if site.called else "call"
    label += f" ({call.where})" if call.where else ""
    dtype = _call_dtype(args, diff)
    names = [site.argnames[i] for i in diff]

    def failed(note: str) -> list[Finding]:
        tol = TOLERANCES.get(dtype, TOLERANCES["float32"])["vjp"]
        return [Finding.not_run(site.label, "vjp", dtype, label, note, argument=name, tolerance=tol) for name in names]

    if dtype not in TOLERANCES:
        return failed(f"{dtype} arguments: the audit has tolerances for {', '.join(TOLERANCES)} only")
    pull = pullbacks.setdefault(id(call.eqn), _Pullbacks(call.eqn, diff))
    try:
        u = _cotangent(key, jax.eval_shape(pull.call, call.consts, args))
        received = pull.hand(call.consts, args, u)
    except Exception as error:  # a backward that raises is a failure of this call, not a crash of the audit
        return failed(f"the backward raised {type(error).__name__}: {first_line(error)}")
    try:
        expected = pull.reference(call.consts, args, u)
    except Exception as error:  # JAX cannot differentiate the primal: finite differences, where they can be trusted
        if dtype != "float64":
            return failed(
                f"JAX cannot differentiate its primal function ({type(error).__name__}) and finite "
                "differences need float64: audit it with float64 arguments (jax.enable_x64)"
            )
        return _finite_differences(site, lambda *a: pull.call(call.consts, list(a)), args, diff, names, label, key)
    rule = _rule(site, call, lambda *a: pull.primal(call.consts, list(a)), diff)
    tol = TOLERANCES[dtype]["vjp"]
    findings = []
    for i, name, r, e in zip(diff, names, received, expected):
        atol = max(ATOL[dtype], tol * float(np.max(np.abs(np.asarray(e, np.float64)), initial=0.0)))
        f = compare(site.label, "vjp", dtype, label, name, r, e, tol, atol)
        if not f.passed:
            f = dataclasses.replace(f, diagnosis=_diagnosis(rule, args, i, r, u, dtype))
        findings.append(f)
    return findings


def _primal(eqn, values: list[Any]) -> list[Any]:
    """The custom_vjp call's primal function at ``values``, custom_vjp calls inside it evaluated by
    their own primal, so that JAX differentiates plain code only."""
    jaxpr, consts = _primal_jaxpr(eqn)
    return _Interpreter(lambda interpreter, inner, inputs: _primal(inner, inputs)).run(jaxpr, consts, values)


def _rule(site: CallSite, call: _Call, primal: Callable[..., Any], diff: list[int]) -> Rule:
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


def _finite_differences(site: CallSite, fn: Callable[..., Any], args, diff, names, label, key) -> list[Finding]:
    """The VJP of the call ``fn`` (of every argument) against finite differences of ``fn`` itself, in float64."""
    rule = Rule(site.name, fn, fn, lambda key, dtype: (), tuple(diff), ())
    tol = TOLERANCES["float64"]["finite_diff"]
    differences = finite_differences(rule, Sample(tuple(args), label), diff, names, key)
    values, hand = jax.jit(differences.evaluate, compiler_options=fast_compile_options())(*differences.inputs)
    return differences.findings(site.label, label, "float64", tol, np.asarray(values), np.asarray(hand))
