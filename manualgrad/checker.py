"""The cross-checker: does a hand-written backward agree with autodiff and with finite differences?

For every sample of every rule (or for any function the user builds from rules) it runs:

* ``forward``       the rule's output against its plain-``jnp`` reference;
* ``vjp``           the hand VJP against ``jax.vjp`` of the reference, under a random cotangent;
* ``finite_diff``   the hand VJP against central finite differences, always in float64: the
                    exact Jacobian for arguments of at most 64 entries, else ``uᵀ J v`` along
                    random directions (like ``torch.autograd.gradcheck``'s fast mode);
* ``jit``           the VJP again under ``jax.jit``;
* ``vmap``          the VJP again under ``jax.vmap`` over a batch of two different samples;
* ``grad_of_grad``  reverse-over-reverse: the gradient of ``⟨VJP(u), v⟩``. A ``custom_vjp``
                    function has no forward mode (``jax.jvp``/``jax.jacfwd`` raise), so the
                    second order is taken in reverse mode only.

Errors are relative, entry by entry: ``|a − n| / max(|a|, |n|)``, 0 where both are 0. An
entry fails when that exceeds the dtype's tolerance (:data:`TOLERANCES`) *and* its absolute
error exceeds round-off (:data:`ATOL`, ten ulps of 1; :data:`FD_ATOL` for finite
differences, whose own absolute error is about ``1e-11 · |f|``): the sample inputs are of
order one, so an entry that should be 0 and comes out as 1e-17 is not a failure. Columns
whose one-sided differences disagree (a kink, such as ReLU at 0) are left out of the
finite-difference check and counted in the finding's note.

All checks run with ``jax_numpy_rank_promotion="raise"`` so that a backward rule that
broadcasts silently fails loudly.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from manualgrad import registry
from manualgrad.registry import Rule, Sample
from manualgrad.samples import generator

CHECKS = ("forward", "vjp", "finite_diff", "jit", "vmap", "grad_of_grad")
TOLERANCES = {
    "float64": {"forward": 1e-12, "vjp": 1e-12, "finite_diff": 1e-6, "jit": 1e-12, "vmap": 1e-12, "grad_of_grad": 1e-12},
    "float32": {"forward": 1e-5, "vjp": 1e-5, "finite_diff": 1e-6, "jit": 1e-5, "vmap": 1e-5, "grad_of_grad": 1e-5},
}
FD_STEP = 1e-5
ATOL = {"float64": 10 * float(np.finfo(np.float64).eps), "float32": 10 * float(np.finfo(np.float32).eps)}
FD_ATOL = 1e-8
KINK_JUMP = 1e-3
EXACT_JACOBIAN_MAX = 64
FAST_DIRECTIONS = 3


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

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    def describe(self) -> str:
        head = f"{self.rule}, argument {self.argument}, sample {self.sample!r}, {self.check} ({self.dtype})"
        if self.passed:
            return f"{head}: ok, worst relative error {self.max_rel_error:.1e}"
        if self.where == "evaluation":
            return f"{head}: {self.note}"
        return (
            f"{head}: {self.mismatches} of {self.size} entries differ beyond {self.tolerance:.0e}; "
            f"worst at {self.where}: expected {self.expected:.6g}, received {self.received:.6g} "
            f"(relative error {self.max_rel_error:.2e})" + (f"; {self.note}" if self.note else "")
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
                cells.append(f"{'':>13}" if f is None else f"{f.max_rel_error:>9.1e} {'ok' if f.passed else 'FAIL':>3}")
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
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"check: dtype must be one of {sorted(TOLERANCES)}, got {dtype!r}")
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"check: unknown checks {sorted(unknown)}; choose from {CHECKS}")
    selected = _select(target, reference, args, argnums)
    start = time.perf_counter()
    findings: list[Finding] = []
    with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
        for rule in selected:
            rule_key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(rule.name.encode()))
            sample_key, check_key = jax.random.split(rule_key)
            for i, sample in enumerate(rule.sample_inputs(sample_key, jnp.dtype(dtype))):
                try:
                    findings += _check_sample(rule, sample, dtype, checks, jax.random.fold_in(check_key, i))
                except Exception as error:  # a broken rule is a finding, not a crash of the checker
                    findings.append(_error_finding(rule.name, sample.label, dtype, error))
    return Report(dtype, findings, time.perf_counter() - start)


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


def _user_rule(fn, reference, args, argnums) -> Rule:
    def samples(key, dtype):
        del key
        cast = jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, args)
        return [Sample(cast, "given")]

    if argnums is None:
        argnums = tuple(i for i, a in enumerate(args) if _is_float_tree(a))
    name = getattr(fn, "__name__", "function")
    return Rule(name, fn, reference, samples, tuple(argnums), ())


def _is_float(a) -> bool:
    return hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)


def _is_float_tree(a) -> bool:
    leaves = jax.tree_util.tree_leaves(a)
    return bool(leaves) and all(_is_float(jnp.asarray(x)) for x in leaves)


def _argname(rule: Rule, i: int) -> str:
    names = rule.argnames
    return names[i] if i < len(names) else f"args[{i}]"


def _check_sample(rule: Rule, sample: Sample, dtype: str, checks, key) -> list[Finding]:
    """Every requested check on one sample.

    Only the ``vjp`` check's hand VJP runs eagerly; the rest is compiled as one program per
    sample, because eager dispatch compiles every small op on its own and is far slower here.
    """
    args = sample.args
    diff = [i for i in rule.differentiable if _is_float_tree(args[i])]
    names = [_argname(rule, i) for i in diff]
    hand, ref = _closure(rule.fn, args, diff), _closure(rule.reference, args, diff)
    primals = [args[i] for i in diff]
    ku, kv, kb = jax.random.split(key, 3)
    u = _random_like(ku, jax.eval_shape(hand, *primals))
    v = [_random_like(k, p) for k, p in zip(jax.random.split(kv, len(primals)), primals)]
    batched = [_stack_perturbed(k, p) for k, p in zip(jax.random.split(kb, len(primals)), primals)]
    batched_u = _stack_perturbed(ku, u)

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
    compiled = jax.jit(lambda *a: {c: programs[c](*a) for c in wanted})
    values = compiled(primals, u, batched, batched_u)
    if "vjp" in checks:
        values["vjp"] = (pull(hand)(primals, u), values["jit"][1])
    tol = TOLERANCES[dtype]
    results: list[Finding] = []
    for check in CHECKS:
        if check not in checks or check == "finite_diff":
            continue
        received, expected = values[check]
        pairs = [("output", received, expected)] if check == "forward" else zip(names, received, expected)
        results += [
            _compare(rule.name, check, dtype, sample.label, n, r, e, tol[check], ATOL[dtype]) for n, r, e in pairs
        ]
    if "finite_diff" in checks:
        results += _finite_differences(rule, sample, diff, names, key, tol["finite_diff"], dtype)
    return results


def _error_finding(rule: str, label: str, dtype: str, error: Exception) -> Finding:
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return Finding(rule, "vjp", dtype, label, "(all)", np.inf, np.inf, TOLERANCES[dtype]["vjp"], 1, 1,
                   "evaluation", note=f"raised {message}")


def _closure(fn, args, diff):
    def f(*primals):
        full = list(args)
        for i, p in zip(diff, primals):
            full[i] = p
        return fn(*full)

    return f


def _finite_differences(rule, sample, diff, names, key, tol, dtype) -> list[Finding]:
    """Central differences in float64, per differentiable argument."""
    args = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if _is_float(a) else a, sample.args)
    out = []
    for k, (i, name) in zip(jax.random.split(key, len(diff)), zip(diff, names)):
        flat, unravel = ravel_pytree(args[i])
        f0 = _closure(rule.fn, args, [i])

        def f(v, f0=f0, unravel=unravel):
            return ravel_pytree(f0(unravel(v)))[0]

        def pullback(c, f=f, flat=flat):
            return jax.vjp(f, flat)[1](c)[0]

        if flat.size <= EXACT_JACOBIAN_MAX:
            out.append(_exact_jacobian(rule.name, sample.label, dtype, name, args[i], f, pullback, flat, tol))
        else:
            out.append(_random_directions(rule.name, sample.label, dtype, name, f, pullback, flat, k, tol))
    return out


def _exact_jacobian(rule, label, dtype, name, arg, f, pullback, flat, tol) -> Finding:
    n = flat.size
    step = FD_STEP * jnp.eye(n, dtype=flat.dtype)
    points = jnp.concatenate([flat[None] + step, flat[None] - step, flat[None]])
    values = np.asarray(jax.jit(jax.vmap(f))(points))
    plus, minus, f0 = values[:n], values[n : 2 * n], values[2 * n :]
    central = ((plus - minus) / (2 * FD_STEP)).T
    jump = np.max(np.abs((plus - f0) - (f0 - minus)) / FD_STEP, axis=1, initial=0.0)
    kinks = jump > KINK_JUMP * np.maximum(1.0, np.max(np.abs(central), axis=0, initial=0.0))
    hand = np.asarray(jax.jit(jax.vmap(pullback))(jnp.eye(f0.size, dtype=flat.dtype)))
    keep = ~kinks
    note = f"{int(kinks.sum())} input entries at a kink left out" if kinks.any() else ""

    def locate(index):
        o, j = np.unravel_index(index, (hand.shape[0], int(keep.sum())))
        return f"d output[{o}] / d {_locate(arg, int(np.flatnonzero(keep)[j]), name)}"

    return _compare(
        rule, "finite_diff", dtype, label, name, hand[:, keep], central[:, keep], tol, FD_ATOL, note, locate
    )


def _random_directions(rule, label, dtype, name, f, pullback, flat, key, tol) -> Finding:
    f, pullback = jax.jit(f), jax.jit(pullback)
    f0 = np.asarray(f(flat))
    received, expected, kinks = [], [], 0
    rng = generator(key)
    for _ in range(FAST_DIRECTIONS):
        v = jnp.asarray(rng.standard_normal(flat.shape), flat.dtype)
        u = rng.standard_normal(f0.shape)
        plus, minus = np.asarray(f(flat + FD_STEP * v)), np.asarray(f(flat - FD_STEP * v))
        if abs(np.vdot(u, (plus - f0) - (f0 - minus))) / FD_STEP > KINK_JUMP * max(1.0, np.abs(u).sum()):
            kinks += 1
            continue
        expected.append(np.vdot(u, (plus - minus) / (2 * FD_STEP)))
        received.append(np.vdot(np.asarray(pullback(jnp.asarray(u))), np.asarray(v)))
    note = f"uᵀJv along {FAST_DIRECTIONS} random directions" + (f", {kinks} crossing a kink left out" if kinks else "")
    return _compare(rule, "finite_diff", dtype, label, name, np.array(received), np.array(expected), tol,
                    FD_ATOL, note, lambda index: f"direction {index}")


def _compare(rule, check, dtype, label, argument, received, expected, tol, atol, note="", locate=None) -> Finding:
    """Entry-by-entry relative error; ``locate(flat index)`` names the worst entry.

    An entry counts as a mismatch when its relative error exceeds ``tol`` and its absolute
    error exceeds ``atol`` (round-off of values of order one: entries that should be 0 but
    come out as 1e-17 are not failures). The reported relative error is the largest over the
    entries larger than ``atol``; NaN anywhere is a mismatch.
    """
    a = np.asarray(ravel_pytree(received)[0], dtype=np.float64)
    n = np.asarray(ravel_pytree(expected)[0], dtype=np.float64)
    if a.shape != n.shape:
        return Finding(rule, check, dtype, label, argument, np.inf, np.inf, tol, max(a.size, n.size), n.size,
                       "shape", note=f"received {a.size} entries, expected {n.size}")
    if a.size == 0:
        return Finding(rule, check, dtype, label, argument, 0.0, 0.0, tol, 0, 0, note=note)
    abs_err = np.abs(a - n)
    scale = np.maximum(np.abs(a), np.abs(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(scale > atol, abs_err / scale, 0.0)
    rel = np.where(np.isnan(a) | np.isnan(n), np.inf, rel)
    mismatch = (rel > tol) & ~(abs_err <= atol)
    worst = int(np.argmax(np.where(mismatch, np.inf, rel))) if mismatch.any() else int(np.argmax(rel))
    where = locate(worst) if locate else _locate(expected, worst, argument)
    return Finding(rule, check, dtype, label, argument, float(np.nanmax(abs_err)), float(rel[worst]), tol,
                   int(mismatch.sum()), int(n.size), where, float(n[worst]), float(a[worst]), note)


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


def _random_like(key, tree):
    """Standard normal draws shaped like ``tree``'s leaves (drawn on the host: no compile)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = generator(key)
    return treedef.unflatten([jnp.asarray(rng.standard_normal(jnp.shape(x)), jnp.result_type(x)) for x in leaves])


def _stack_perturbed(key, tree):
    """A batch of two: ``tree`` and ``tree`` plus noise, stacked on a new leading axis."""
    noise = _random_like(key, tree)
    return jax.tree_util.tree_map(lambda x, n: jnp.asarray(np.stack([x, x + 0.5 * n])), tree, noise)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
