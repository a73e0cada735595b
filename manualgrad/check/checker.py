"""The cross-checker: does a hand-written backward agree with autodiff and with finite differences?

For every sample of every rule (or for any function the user builds from rules) it runs:

* ``forward``       the rule's output against its plain-``jnp`` reference;
* ``vjp``           the hand VJP against ``jax.vjp`` of the reference, under a random cotangent;
* ``finite_diff``   the hand VJP against finite differences (steps ±h and ±2h, Richardson's
                    extrapolation), always in float64: the exact Jacobian for arguments of at
                    most 64 entries, else ``uᵀ J v`` along random unit directions (like
                    ``torch.autograd.gradcheck``'s fast mode);
* ``adjoint``       seed 002's dot-product test, for every group of arguments the rule is
                    linear in (``Rule.linear_in``): with random ``u`` (those arguments, the
                    others fixed at the sample) and random ``y``, the hand backward ``C†``
                    must satisfy ``⟨C(u), y⟩ = Σ_i ⟨u_i, C†_i(y)⟩`` (:func:`adjoint_mismatch`).
                    No autodiff and no reference is involved;
* ``jit``           the VJP again under ``jax.jit``;
* ``vmap``          the VJP again under ``jax.vmap`` over a batch of two different samples;
* ``grad_of_grad``  reverse-over-reverse: the gradient of ``⟨VJP(u), v⟩``. A ``custom_vjp``
                    function has no forward mode (``jax.jvp``/``jax.jacfwd`` of a rule raise);
                    forward over reverse (``jax.hessian``, ``jax.jvp`` of ``jax.grad``) works,
                    its outer pass differentiating the hand backward, as this check does.

Errors are relative, entry by entry: ``|a − n| / max(|a|, |n|)``, 0 where both are 0. An
entry fails when that exceeds the dtype's tolerance (:data:`TOLERANCES`) *and* its absolute
error exceeds round-off (:data:`ATOL`, ten ulps of 1; for finite differences their own
round-off, 80 ulps of the values differenced per step ``h``, at most :data:`FD_ATOL`): the
sample inputs are of order one, so an entry that should be 0 and comes out as 1e-17 is not a
failure. Input entries and directions along which the differences straddle a kink (ReLU at 0,
a max-pooling tie: the one-sided differences disagree at the scale of the step, or the
extrapolation does not converge, :func:`_richardson`) are left out of the finite-difference
check and counted in the finding's note; a kink that is not detected moves the estimate by
less than the tolerance.

All checks run with ``jax_numpy_rank_promotion="raise"`` so that a backward rule that
broadcasts silently fails loudly. A user's own function and reference (``check(fn,
reference=..., args=...)``) run under the caller's setting; the backward passes of the hand
rules inside the function still run under ``"raise"``. A reference that raises fails every
check of its sample, with a note that names the reference.

The run time is compile time: every sample's checks but the eager one are fused into one
program (built with :data:`FAST_COMPILE` on CPU), and samples are checked :data:`WORKERS` at
a time, so that one sample's compile overlaps another's tracing and eager dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from manualgrad import registry
from manualgrad.registry import Rule, Sample
from manualgrad.rules.samples import generator

CHECKS = ("forward", "vjp", "finite_diff", "adjoint", "jit", "vmap", "grad_of_grad")
# The adjoint mismatch is normalised by the Cauchy–Schwarz bound of its terms (see
# adjoint_mismatch), so its round-off is a small multiple of the dtype's epsilon whatever the
# cancellation: 1e-13 is 450 ulps of float64; 1e-6 is 8 ulps of float32.
TOLERANCES = {
    "float64": {"forward": 1e-12, "vjp": 1e-12, "finite_diff": 1e-6, "adjoint": 1e-13, "jit": 1e-12, "vmap": 1e-12,
                "grad_of_grad": 1e-12},
    "float32": {"forward": 1e-5, "vjp": 1e-5, "finite_diff": 1e-6, "adjoint": 1e-6, "jit": 1e-5, "vmap": 1e-5,
                "grad_of_grad": 1e-5},
}
ATOL = {"float64": 10 * float(np.finfo(np.float64).eps), "float32": 10 * float(np.finfo(np.float32).eps)}
FD_ATOL = 1e-8
# Finite differences step by ±h and ±2h, h the distance moved (directions are unit vectors).
FD_STEP = 1e-5
FD_STEPS = (1, -1, 2, -2)
# The round-off ρ of the kink statistic κ (_richardson), per unit of the magnitude of the values
# differenced: each value f(x + s·h·d) carries a few ulps of it (say 4), and κ combines them
# with weights summing to at most 5/h (|T_2h − T_h|): ρ = 20 ulps / h, 4.4e-10 for values of
# order one. The estimate's own round-off is at most 1.5 · 4 ulps / h, under a third of ρ.
KAPPA_ROUNDING = 20 * float(np.finfo(np.float64).eps) / FD_STEP
# A kink left in moves the Richardson estimate by at most 5/3 κ. With kinks declared above
# κ = KINK_SHARE · tol · |estimate| + ρ and an absolute floor of ρ / KINK_SHARE, one left in
# (with the round-off) costs at most 5/3 · 1/4 of tol · |estimate| plus (5/3 + 1/3) ρ, half the
# floor: less than what fails an entry, while the floor stays under FD_ATOL (magnitudes below 5.6).
KINK_SHARE = 0.25
EXACT_JACOBIAN_MAX = 64
FAST_DIRECTIONS = 3
# XLA:CPU builds the sample programs about five times faster without LLVM's optimisation
# passes and with its older loop emitters. Only code generation changes: the computation,
# and so every check, is the same; results may differ from a default build by round-off.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# Two threads per core: XLA compiles without holding the GIL, and a small program's compile
# leaves a core idle that another sample's tracing or eager dispatch can use.
WORKERS = min(8, 2 * (os.cpu_count() or 1))
# Finding.where of a check that could not run on a sample (it raised): a failure of that check.
NOT_RUN = "not run"


class BackwardError(Exception):
    """A hand backward broke its contract with ``custom_vjp`` in a way one plain sentence can say
    (it returned ``None``, used NumPy on a traced array, ...): reported as that sentence."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One comparison: a rule, a check, a sample and an argument (or the output)."""

    rule: str
    check: str
    dtype: str
    sample: str
    argument: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    mismatches: int
    size: int
    where: str = ""
    expected: float = 0.0
    received: float = 0.0
    note: str = ""
    diagnosis: str = ""  # for a failing vjp check: the usual mistake that explains it (manualgrad.check.diagnose)
    # Entry-by-entry comparisons (_compare): the worst entry's error over the error allowed it,
    # min(relative / tolerance, absolute / atol); above 1 exactly where an entry fails. NaN elsewhere.
    error_over_allowed: float = np.nan

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    def describe(self) -> str:
        head = f"{self.rule}, argument {self.argument}, sample {self.sample!r}, {self.check} ({self.dtype})"
        if self.passed:
            return f"{head}: ok, worst relative error {self.max_rel_error:.1e}"
        if self.where == NOT_RUN:
            return f"{head}: not run: {self.note}" + (f"; {self.diagnosis}" if self.diagnosis else "")
        if self.check == "adjoint":
            return (f"{head}: ⟨C(u), y⟩ = {self.expected:.6g} but Σ ⟨u, C†(y)⟩ = {self.received:.6g}, "
                    f"mismatch {self.max_rel_error:.2e} > {self.tolerance:.0e}")
        return (
            f"{head}: {self.mismatches} of {self.size} entries differ beyond {self.tolerance:.0e}; "
            f"worst at {self.where}: expected {self.expected:.6g}, received {self.received:.6g} "
            f"(relative error {self.max_rel_error:.2e})" + (f"; {self.note}" if self.note else "")
            + (f"; {self.diagnosis}" if self.diagnosis else "")
        )


@dataclasses.dataclass
class Report:
    """Every :class:`Finding` of one :func:`check` call."""

    dtype: str
    findings: list[Finding]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if not f.passed]

    def diagnoses(self) -> list[str]:
        """One line per (rule, argument) with a diagnosed failure, e.g. ``dense, argument w: your
        gradient equals the right one transposed``; samples are named where they disagree."""
        by_argument: dict[tuple[str, str], dict[str, list[str]]] = {}
        for f in self.failures():
            if f.diagnosis:
                by_argument.setdefault((f.rule, f.argument), {}).setdefault(f.diagnosis, []).append(f.sample)
        lines = []
        for (rule, argument), texts in by_argument.items():
            for text, samples in texts.items():
                where = f" (samples {', '.join(map(repr, samples))})" if len(texts) > 1 else ""
                lines.append(f"{rule}, argument {argument}: {text}{where}")
        return lines

    def worst(self) -> dict[tuple[str, str], Finding]:
        """The worst finding per (rule, check): a failing one first, then the largest error."""
        out: dict[tuple[str, str], Finding] = {}
        for f in self.findings:
            key = (f.rule, f.check)
            old = out.get(key)
            if old is None or (not f.passed, f.max_rel_error) > (not old.passed, old.max_rel_error):
                out[key] = f
        return out

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per rule and check."""
        return [
            {
                "rule": f.rule,
                "check": f.check,
                "dtype": self.dtype,
                "passed": all(g.passed for g in self.findings if (g.rule, g.check) == key),
                "max_rel_error": f.max_rel_error,
                "max_abs_error": f.max_abs_error,
                "tolerance": f.tolerance,
                "worst_sample": f.sample,
                "worst_argument": f.argument,
                "detail": f.describe(),
            }
            for key, f in self.worst().items()
        ]

    def table(self) -> str:
        worst = self.worst()
        names = list(dict.fromkeys(f.rule for f in self.findings))
        checks = [c for c in CHECKS if any(k[1] == c for k in worst)]
        width = max(len("rule"), *(len(n) for n in names)) if names else 4
        lines = [f"{'rule':<{width}}  " + "  ".join(f"{c:>13}" for c in checks)]
        for name in names:
            cells = []
            for c in checks:
                f = worst.get((name, c))
                cells.append(f"{'-':>13}" if f is None else f"{f.max_rel_error:>9.1e} {'ok' if f.passed else 'FAIL':>3}")
            lines.append(f"{name:<{width}}  " + "  ".join(cells))
        return "\n".join(lines)


def check(
    target: str | Rule | Callable[..., Any] | Sequence[str | Rule] | None = None,
    *,
    reference: Callable[..., Any] | None = None,
    args: Sequence[Any] | None = None,
    argnums: Sequence[int] | None = None,
    dtype: str = "float64",
    checks: Sequence[str] = CHECKS,
    seed: int = 0,
) -> Report:
    """Cross-checks hand rules; returns a :class:`Report` (``report.passed``, ``report.table()``).

    ``target`` is ``None`` (every registered rule), a rule name, a :class:`Rule`, a list of
    those, or any function built from rules, given with its ``reference`` and ``args``
    (and optionally ``argnums``, the arguments to differentiate; default every floating one).
    Such a function and its reference run under the caller's ``jax_numpy_rank_promotion``.

    Samples are checked in :data:`WORKERS` threads, which do not see JAX configuration
    contexts entered by the caller (``jax.default_device`` and the like): set those with
    ``jax.config.update``, or set ``WORKERS = 1`` to check in the calling thread.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"check: dtype must be one of {sorted(TOLERANCES)}, got {dtype!r}")
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"check: unknown checks {sorted(unknown)}; choose from {CHECKS}")
    selected = _select(target, reference, args, argnums)
    start = time.perf_counter()
    jobs = []
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        for rule in selected:
            rule_key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(rule.name.encode()))
            sample_key, check_key = jax.random.split(rule_key)
            for i, sample in enumerate(rule.sample_inputs(sample_key, jnp.dtype(dtype))):
                jobs.append((rule, sample, jax.random.fold_in(check_key, i)))
    options = _compiler_options()
    if WORKERS == 1:
        results = [_check_job(*job, dtype, checks, options) for job in jobs]
    else:
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda job: _check_job(*job, dtype, checks, options), jobs))
    return Report(dtype, [f for result in results for f in result], time.perf_counter() - start)


def _check_job(rule: Rule, sample: Sample, key, dtype: str, checks, options) -> list[Finding]:
    """:func:`_check_sample` under the checker's JAX configuration, which is per thread.

    When the sample's program cannot be built (something raised), each check is run alone, so
    that the checks which can run still count and each one that cannot is a failure on this
    sample: a backward that raises never leaves the forward, or any check, unjudged.
    """
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        try:
            return _check_sample(rule, sample, dtype, checks, key, options)
        except _ReferenceFailed as error:  # nothing to compare with: every check failed, the reference named
            return [Finding(rule.name, c, dtype, sample.label, "(all)", np.inf, np.inf, TOLERANCES[dtype][c], 1, 1,
                            NOT_RUN, note=str(error)) for c in CHECKS if c in checks]
        except Exception:  # which check raised is found out one check at a time
            return [f for check in CHECKS if check in checks for f in _check_alone(rule, sample, dtype, check, key, options)]


def _check_alone(rule: Rule, sample: Sample, dtype: str, check: str, key, options) -> list[Finding]:
    try:
        return _check_sample(rule, sample, dtype, (check,), key, options)
    except Exception as error:  # a broken rule is a finding, not a crash of the checker
        return _error_findings(rule, sample, dtype, check, error, key)


@functools.cache
def _compiler_options() -> dict[str, Any] | None:
    """:data:`FAST_COMPILE` on the CPU backend where this jaxlib knows those options, else ``None``."""
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(jnp.sin, compiler_options=FAST_COMPILE).lower(0.0).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return FAST_COMPILE


def _select(target, reference, args, argnums) -> list[Rule]:
    if target is None:
        return list(registry.rules())
    if isinstance(target, str):
        return [registry.get(target)]
    if isinstance(target, Rule):
        return [target]
    if callable(target):
        if reference is None or args is None:
            raise TypeError("check: a function needs its reference= and args= to be checked")
        return [_user_rule(target, reference, tuple(args), argnums)]
    return [t if isinstance(t, Rule) else registry.get(t) for t in target]


class _ReferenceFailed(Exception):
    """A user's reference raised while being checked against; the message names it and the error."""


def _user_rule(fn, reference, args, argnums) -> Rule:
    """A user's function and reference as a :class:`Rule`, both run under the caller's
    ``jax_numpy_rank_promotion``: the checker's ``"raise"`` is for the hand rules, whose
    backward passes are traced outside them. A reference that raises raises
    :class:`_ReferenceFailed`."""
    promotion = jax.config.jax_numpy_rank_promotion

    def users(f):
        @functools.wraps(f)
        def run(*a):
            with jax.numpy_rank_promotion(promotion):
                return f(*a)

        return run

    @functools.wraps(reference)
    def named_reference(*a):
        try:
            return reference(*a)
        except Exception as error:
            name = getattr(reference, "__name__", "<lambda>")
            who = "the reference" if name == "<lambda>" else f"the reference {name}"
            text = str(error).splitlines()[0] if str(error) else ""
            raise _ReferenceFailed(f"{who} raised {type(error).__name__}: {text}") from error

    def samples(key, dtype):
        del key
        cast = jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, args)
        return [Sample(cast, "given")]

    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float_tree(a))
    name = getattr(fn, "__name__", "function")
    return Rule(name, users(fn), users(named_reference), samples, tuple(argnums), ())


def _is_float(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _is_float_tree(a) -> bool:
    leaves = jax.tree_util.tree_leaves(a)
    return bool(leaves) and all(_is_float(jnp.asarray(x)) for x in leaves)


def _argname(rule: Rule, i: int) -> str:
    names = rule.argnames
    return names[i] if i < len(names) else f"args[{i}]"


def _check_sample(rule: Rule, sample: Sample, dtype: str, checks, key, options) -> list[Finding]:
    """Every requested check on one sample.

    Only the ``vjp`` check's hand VJP runs eagerly; everything else, the finite-difference
    evaluations included, is compiled as one program per sample, with the XLA ``options``.
    Compiling dominates the run time, and every separate program, or eager op on a new
    shape, is one more compile.
    """
    args = sample.args
    diff = [i for i in rule.differentiable if _is_float_tree(args[i])]
    names = [_argname(rule, i) for i in diff]
    hand, ref = _closure(rule.fn, args, diff), _closure(rule.reference, args, diff)
    primals = [args[i] for i in diff]
    ku, kv, kb, ka = jax.random.split(key, 4)
    u = _random_like(ku, jax.eval_shape(hand, *primals))
    v = [_random_like(k, p) for k, p in zip(jax.random.split(kv, len(primals)), primals)]
    batched = [_stack_perturbed(k, p) for k, p in zip(jax.random.split(kb, len(primals)), primals)]
    batched_u = _stack_perturbed(ku, u)
    groups = _linear_groups(rule, args, diff) if "adjoint" in checks else []
    adjoint_inputs = [_adjoint_draws(k, args, group, u) for k, group in zip(jax.random.split(ka, len(groups)), groups)]

    def pull(fn):
        return lambda p, c: jax.vjp(fn, *p)[1](c)

    def second(fn, p):
        return jax.grad(lambda p: _vdot(pull(fn)(p, u), v))(p)

    programs = {
        "forward": lambda p, c, pb, cb: (hand(*p), ref(*p)),
        "jit": lambda p, c, pb, cb: (pull(hand)(p, c), pull(ref)(p, c)),
        "vmap": lambda p, c, pb, cb: (jax.vmap(pull(hand))(pb, cb), jax.vmap(pull(ref))(pb, cb)),
        "grad_of_grad": lambda p, c, pb, cb: (second(hand, p), second(ref, p)),
    }
    wanted = [c for c in programs if c in checks or (c == "jit" and "vjp" in checks)]
    differences = _finite_differences(rule, sample, diff, names, key) if "finite_diff" in checks else []

    def program(inputs, fd_inputs, adjoint_inputs):
        adjoint = [_adjoint_pair(rule.fn, args, group, *draws) for group, draws in zip(groups, adjoint_inputs)]
        return {c: programs[c](*inputs) for c in wanted}, [d.evaluate(*x) for d, x in zip(differences, fd_inputs)], adjoint

    values, fd_values, adjoint_values = jax.jit(program, compiler_options=options)(
        (primals, u, batched, batched_u), [d.inputs for d in differences], adjoint_inputs
    )
    if "vjp" in checks:
        values["vjp"] = (pull(hand)(primals, u), values["jit"][1])
    tol = TOLERANCES[dtype]
    results: list[Finding] = []
    received_vjp = dict(zip(names, values["vjp"][0])) if "vjp" in values else {}
    for check in CHECKS:
        if check not in checks or check in ("finite_diff", "adjoint"):
            continue
        received, expected = values[check]
        pairs = [("output", received, expected)] if check == "forward" else zip(names, received, expected)
        results += [
            _compare(rule.name, check, dtype, sample.label, n, r, e, tol[check], ATOL[dtype]) for n, r, e in pairs
        ]
    results = [_diagnosed(f, rule, args, diff[names.index(f.argument)], received_vjp[f.argument], u, dtype)
               if f.check == "vjp" and not f.passed else f for f in results]
    results += [
        d.finding(rule.name, sample.label, dtype, tol["finite_diff"], np.asarray(f), np.asarray(h))
        for d, (f, h) in zip(differences, fd_values)
    ]
    for group, draws, (out, back) in zip(groups, adjoint_inputs, adjoint_values):
        forward_side, backward_side, mismatch = adjoint_mismatch(draws[0], draws[1], out, back)
        argument = ", ".join(_argname(rule, i) for i in group)
        results.append(Finding(rule.name, "adjoint", dtype, sample.label, argument, abs(forward_side - backward_side),
                               mismatch, tol["adjoint"], int(not mismatch <= tol["adjoint"]), 1,
                               "⟨C(u), y⟩ against Σ ⟨u, C†(y)⟩", forward_side, backward_side))
    return results


def _diagnosed(finding: Finding, rule: Rule, args, argument: int, received, g, dtype: str) -> Finding:
    from manualgrad.check import diagnose

    return dataclasses.replace(finding, diagnosis=diagnose.diagnose(rule, args, argument, received, g, dtype))


def _linear_groups(rule: Rule, args, diff) -> list[tuple[int, ...]]:
    """The rule's groups of linear arguments that are floating in this sample (integer labels are not)."""
    return [group for group in rule.linear_in if all(i in diff for i in group)]


def _adjoint_draws(key, args, group, output):
    """Random ``u`` (one per argument of the group) and ``y`` (shaped like ``output``), on the host."""
    ku, ky = jax.random.split(key)
    u = [_random_like(k, args[i]) for k, i in zip(jax.random.split(ku, len(group)), group)]
    return u, _random_like(ky, output)


def _adjoint_pair(fn, args, group, u, y):
    """Traced: ``C(u)`` with the other arguments fixed at the sample, and the hand backward ``C†(y)``."""
    out, pullback = jax.vjp(_closure(fn, args, group), *u)
    return out, pullback(y)


def adjoint_mismatch(u, y, out, back) -> tuple[float, float, float]:
    """Seed 002's dot-product test: ``(⟨C(u), y⟩, Σ_i ⟨u_i, C†_i(y)⟩, relative mismatch)``.

    The inner products are taken on the host in float64, so only the rule's own round-off
    remains. The mismatch is normalised by the Cauchy–Schwarz bound of the terms,
    ``‖C(u)‖ ‖y‖ + Σ_i ‖u_i‖ ‖C†_i(y)‖``: the inner products of random vectors cancel, and
    dividing by their values instead would turn round-off into an arbitrarily large ratio at
    an unlucky draw. A wrong ``C†`` gives a mismatch of order ``1/√size``, far above it.
    """
    leaves = lambda t: [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    lhs = sum(np.vdot(a, b) for a, b in zip(leaves(out), leaves(y)))
    rhs = sum(np.vdot(a, b) for a, b in zip(leaves(u), leaves(back)))
    norm = lambda t: np.sqrt(sum(np.vdot(a, a) for a in leaves(t)))  # noqa: E731
    scale = norm(out) * norm(y) + sum(norm(a) * norm(b) for a, b in zip(u, back))
    mismatch = abs(lhs - rhs) / scale if scale > 0 else 0.0
    return float(lhs), float(rhs), float(mismatch if np.isfinite(lhs - rhs) else np.inf)


def _error_findings(rule: Rule, sample: Sample, dtype: str, check: str, error: Exception, key) -> list[Finding]:
    """``check`` not run on ``sample`` because of ``error``: a failure. Its note is the error's
    sentence for a :class:`BackwardError`, else ``raised TYPE: first line``. For the ``vjp``
    check of a backward that returned a cotangent of the wrong shape (``custom_vjp`` refuses
    it), one finding per such argument, diagnosed from the raw backward."""
    from manualgrad.check import diagnose

    first = str(error).splitlines()[0] if str(error) else ""
    note = first if isinstance(error, BackwardError) else f"raised {type(error).__name__}: {first}"
    finding = Finding(rule.name, check, dtype, sample.label, "(all)", np.inf, np.inf, TOLERANCES[dtype][check], 1, 1,
                      NOT_RUN, note=note)
    if check != "vjp":
        return [finding]
    try:
        g = _random_like(key, jax.eval_shape(lambda: rule.fn(*sample.args)))  # static arguments stay Python values
        raw = diagnose.diagnose_raw(rule, sample.args, g, dtype)
    except Exception:  # the forward itself fails, or the diagnosis does: the error stands alone
        return [finding]
    return [dataclasses.replace(finding, argument=_argname(rule, i), diagnosis=shape.diagnosis,
                                note=f"backward returned a cotangent of shape {shape.received} for {_argname(rule, i)}, "
                                     f"of shape {shape.expected}")
            for i, shape in raw.items()] or [finding]


def _closure(fn, args, diff):
    def f(*primals):
        full = list(args)
        for i, p in zip(diff, primals):
            full[i] = p
        return fn(*full)

    return f


@dataclasses.dataclass(frozen=True)
class _Differences:
    """Finite differences in float64 for one argument, evaluated inside the sample's program.

    ``fn`` maps the argument to the rule's output, every other argument fixed. The exact
    Jacobian (``directions`` and ``cotangents`` ``None``: unit vectors) or ``uᵀ J v`` along
    :data:`FAST_DIRECTIONS` random unit directions ``v`` (rows of ``directions``) and
    cotangents ``u`` (rows of ``cotangents``). Each derivative is the Richardson estimate of
    :func:`_richardson`; an input entry or a direction along which the differences straddle a
    kink is left out and counted.
    """

    name: str
    fn: Callable[[Any], Any]
    arg: Any
    directions: np.ndarray | None
    cotangents: np.ndarray | None

    @property
    def inputs(self) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        return self.arg, self.directions, self.cotangents

    def evaluate(self, arg, directions, cotangents):
        """Traced: ``f`` at ``x + s·h·d`` for every ``s`` in :data:`FD_STEPS` and every direction
        ``d``, then at ``x``; and the hand VJP of every cotangent, one row each."""
        flat, unravel = ravel_pytree(arg)

        def f(x):
            return ravel_pytree(self.fn(unravel(x)))[0]

        out, pullback = jax.vjp(f, flat)
        if directions is None:
            directions, cotangents = jnp.eye(flat.size, dtype=flat.dtype), jnp.eye(out.size, dtype=out.dtype)
        points = [flat[None] + s * FD_STEP * directions for s in FD_STEPS]
        return jax.vmap(f)(jnp.concatenate([*points, flat[None]])), jax.vmap(lambda c: pullback(c)[0])(cotangents)

    def finding(self, rule: str, label: str, dtype: str, tol: float, values: np.ndarray, hand: np.ndarray) -> Finding:
        """Compares ``hand`` with the differences of ``values``, as returned by :meth:`evaluate`."""
        k = (len(values) - 1) // len(FD_STEPS)
        steps, f0 = values[:-1].reshape(len(FD_STEPS), k, values.shape[-1]), values[-1]
        if self.directions is None:
            return self._exact_jacobian(rule, label, dtype, tol, steps, f0, hand)
        return self._random_directions(rule, label, dtype, tol, steps, f0, hand)

    def _exact_jacobian(self, rule, label, dtype, tol, steps, f0, hand) -> Finding:
        magnitude = np.maximum(np.max(np.abs(steps), axis=0), np.abs(f0))
        estimate, straddles, atol = _richardson(steps, f0, magnitude, tol)
        kinks = np.any(straddles, axis=1)
        keep = ~kinks
        note = f"{int(kinks.sum())} input entries at a kink left out" if kinks.any() else ""

        def locate(index):
            o, j = np.unravel_index(index, (hand.shape[0], int(keep.sum())))
            return f"d output[{o}] / d {_locate(self.arg, int(np.flatnonzero(keep)[j]), self.name)}"

        return _compare(rule, "finite_diff", dtype, label, self.name, hand[:, keep], estimate.T[:, keep], tol,
                        np.ravel(atol.T[:, keep]), note, locate)

    def _random_directions(self, rule, label, dtype, tol, steps, f0, hand) -> Finding:
        u = self.cotangents
        magnitude = np.abs(u) @ np.maximum(np.max(np.abs(steps), axis=(0, 1)), np.abs(f0))
        estimate, kinks, atol = _richardson(np.einsum("skm,km->sk", steps, u), u @ f0, magnitude, tol)
        keep = np.flatnonzero(~kinks)
        note = f"uᵀJv along {FAST_DIRECTIONS} random directions"
        note += f", {int(kinks.sum())} crossing a kink left out" if kinks.any() else ""
        received = np.einsum("km,km->k", hand, self.directions)
        return _compare(rule, "finite_diff", dtype, label, self.name, received[keep], estimate[keep], tol, atol[keep],
                        note, lambda index: f"direction {int(keep[index])}")


def _richardson(steps, f0, magnitude, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Derivatives ``g'(0)`` of functions ``g`` sampled at ``s·h`` (``steps``, one ``s`` of
    :data:`FD_STEPS` per row) and at 0 (``f0``); whether each straddles a kink; and the
    absolute error each may have, from the ``magnitude`` of its values.

    With the central differences ``D_h = (g(h) − g(−h)) / 2h`` and ``D_2h``, the estimate is
    Richardson's ``(4 D_h − D_2h) / 3 = g'(0) + O(h⁴)``. Along a smooth ``g`` the
    extrapolation converges and the one-sided differences agree to second order:

        κ = max(|D_h − D_2h|, |T_2h − T_h|) = |g⁽³⁾| h² / 2 + O(h³),  about 5e-11 · |g⁽³⁾|,

    where ``T_h = (g(h) − g(0)) / h − (g(0) − g(−h)) / h`` (``h g''`` for a smooth ``g``) and
    ``T_2h = (g(2h) − 2g(0) + g(−2h)) / 4h``. A kink at ``a`` where the slope jumps by ``Δ``
    makes ``κ ≥ |Δ| / 8`` if ``|a| ≤ h`` (the first term vanishes at ``a = 0``, the second at
    ``a = 2h/3``), and for any ``|a| < 2h`` moves the estimate by at most ``5/3 κ``. So a
    kink is declared where ``κ > KINK_SHARE · tol · |estimate| + ρ``, ``ρ`` its round-off
    (:data:`KAPPA_ROUNDING` times the magnitude), and the absolute error allowed is
    ``ρ / KINK_SHARE``, at most :data:`FD_ATOL`: a kink left in costs less than what fails.
    """
    p1, m1, p2, m2 = steps
    d1, d2 = (p1 - m1) / (2 * FD_STEP), (p2 - m2) / (4 * FD_STEP)
    t1, t2 = (p1 - 2 * f0 + m1) / FD_STEP, (p2 - 2 * f0 + m2) / (4 * FD_STEP)
    estimate = (4 * d1 - d2) / 3
    kappa = np.maximum(np.abs(d1 - d2), np.abs(t2 - t1))
    rounding = KAPPA_ROUNDING * magnitude
    return estimate, kappa > KINK_SHARE * tol * np.abs(estimate) + rounding, np.minimum(FD_ATOL, rounding / KINK_SHARE)


def _finite_differences(rule, sample, diff, names, key) -> list[_Differences]:
    """The finite-difference checks of a sample, one per differentiable argument, in float64."""
    args = jax.tree_util.tree_map(lambda a: _host(a, np.float64) if _is_float(a) else a, sample.args)
    out = []
    for k, (i, name) in zip(jax.random.split(key, len(diff)), zip(diff, names)):
        fn = _closure(rule.fn, args, [i])
        n = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(args[i]))
        if n <= EXACT_JACOBIAN_MAX:
            out.append(_Differences(name, fn, args[i], None, None))
            continue
        m = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(jax.eval_shape(fn, args[i])))
        rng = generator(k)
        draws = [(rng.standard_normal(n), rng.standard_normal(m)) for _ in range(FAST_DIRECTIONS)]
        directions = np.stack([d / np.linalg.norm(d) for d, _ in draws])
        out.append(_Differences(name, fn, args[i], directions, np.stack([c for _, c in draws])))
    return out


def _compare(rule, check, dtype, label, argument, received, expected, tol, atol, note="", locate=None) -> Finding:
    """Entry-by-entry relative error; ``locate(flat index)`` names the worst entry.

    An entry counts as a mismatch when its relative error exceeds ``tol`` and its absolute
    error exceeds ``atol`` (round-off of values of order one: entries that should be 0 but
    come out as 1e-17 are not failures). The reported relative error is the largest over the
    entries larger than ``atol``; NaN anywhere is a mismatch.
    """
    a, n = _flat(received), _flat(expected)
    if a.shape != n.shape:
        return Finding(rule, check, dtype, label, argument, np.inf, np.inf, tol, max(a.size, n.size), n.size,
                       "shape", note=f"received {a.size} entries, expected {n.size}", error_over_allowed=np.inf)
    if a.size == 0:
        return Finding(rule, check, dtype, label, argument, 0.0, 0.0, tol, 0, 0, note=note, error_over_allowed=0.0)
    abs_err = np.abs(a - n)
    scale = np.maximum(np.abs(a), np.abs(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > atol, abs_err / scale, 0.0)
    rel = np.where(np.isnan(a) | np.isnan(n), np.inf, rel)
    mismatch = (rel > tol) & ~(abs_err <= atol)
    with np.errstate(divide="ignore", invalid="ignore"):  # atol may be 0; an exact entry is 0 over allowed
        over = np.where(abs_err == 0, 0.0, np.minimum(rel / tol, abs_err / atol))  # > 1 exactly at a mismatch
    over = np.where(np.isnan(abs_err), np.inf, over)
    worst = int(np.argmax(np.where(mismatch, np.inf, rel))) if mismatch.any() else int(np.argmax(rel))
    where = locate(worst) if locate else _locate(expected, worst, argument)
    return Finding(rule, check, dtype, label, argument, float(np.nanmax(abs_err)), float(rel[worst]), tol,
                   int(mismatch.sum()), int(n.size), where, float(n[worst]), float(a[worst]), note,
                   error_over_allowed=float(np.max(over)))


def _flat(tree) -> np.ndarray:
    """A pytree's leaves raveled and concatenated in float64, on the host (no compile)."""
    leaves = [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _locate(tree, flat_index: int, prefix: str) -> str:
    """Names entry ``flat_index`` of a raveled pytree, e.g. ``params[0]['w'][2, 1]``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        size = int(np.size(leaf))
        if flat_index < size:
            index = np.unravel_index(flat_index, np.shape(leaf))
            entry = f"[{', '.join(str(int(j)) for j in index)}]" if index else ""
            return f"{prefix}{jax.tree_util.keystr(path)}{entry}"
        flat_index -= size
    return prefix


def _host(x, dtype) -> jax.Array:
    """``x`` as a device array of ``dtype``, converted on the host: an eager cast or ``jnp.asarray``
    of a NumPy array compiles a small program for every new shape."""
    return jax.device_put(np.asarray(x, dtype))


def _random_like(key, tree):
    """Standard normal draws shaped like ``tree``'s leaves (drawn on the host: no compile)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = generator(key)
    return treedef.unflatten([_host(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)) for x in leaves])


def _stack_perturbed(key, tree):
    """A batch of two: ``tree`` and ``tree`` plus noise, stacked on a new leading axis."""
    noise = _random_like(key, tree)

    def stack(x, n):
        x = np.asarray(x)
        return _host(np.stack([x, x + 0.5 * np.asarray(n)]), x.dtype)

    return jax.tree_util.tree_map(stack, tree, noise)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
