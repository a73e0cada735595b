"""``manualgrad explain RULE``: a rule's derivation, its seeds, and a live check of it on small inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import registry, text
from manualgrad.check import checker, sharded
from manualgrad.check.tolerances import relative_error
from manualgrad.rules.samples import generator


def rule_list(width: int = 100) -> str:
    """One line per registered rule, at most ``width`` columns: its name, its family (the module
    that defines it), the ids of its seeds and their sections, cut short with ``…`` where the line
    would be longer (``manualgrad explain RULE`` cites them in full)."""
    rows = [
        (
            r.name,
            r.fn.__module__.rsplit(".", 1)[-1],
            f"seed {', '.join(s for s, _ in r.seeds)}: {'; '.join(section for _, section in r.seeds)}",
        )
        for r in registry.rules()
    ]
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in text.table(rows))


def _live(rule: registry.Rule) -> str:
    """The hand VJP beside ``jax.vjp`` of the reference on the rule's first float64 sample; a
    collective's on the mesh of :mod:`~manualgrad.check.sharded`, or why it cannot run here."""
    if sharded.on_mesh(rule):
        reason = sharded.not_applicable_reason()
        if reason is not None:
            return f"Live check: not applicable: {rule.name} is a collective and {reason}"
        rule = sharded.device_rule(rule)
    with jax.enable_x64(True):
        sample = rule.sample_inputs(jax.random.PRNGKey(0), jnp.float64)[0]
        args = sample.args
        diff = [i for i in rule.differentiable if jnp.issubdtype(jnp.result_type(args[i]), jnp.floating)]
        close = lambda fn: lambda *d: fn(*[d[diff.index(i)] if i in diff else a for i, a in enumerate(args)])  # noqa: E731
        primals = [args[i] for i in diff]
        out, hand_vjp = jax.vjp(close(rule.fn), *primals)
        _, reference_vjp = jax.vjp(close(rule.reference), *primals)
        cotangent = jnp.asarray(generator(jax.random.PRNGKey(1)).standard_normal(jnp.shape(out)), out.dtype)
        hand, reference = hand_vjp(cotangent), reference_vjp(cotangent)
    shapes = ", ".join(f"{name}: {tuple(jnp.shape(a))}" for name, a in zip(rule.argnames, args))
    lines = [
        f"Live check on sample '{sample.label}' ({shapes}), float64, "
        f"random cotangent G of shape {tuple(jnp.shape(out))}:"
    ]

    def show(a) -> str:
        text = np.array2string(np.asarray(a), precision=6, suppress_small=True, max_line_width=90)
        return text.replace("\n", "\n" + " " * 18)

    for i, h, r in zip(diff, hand, reference):
        name, h, r = rule.argnames[i], np.asarray(h), np.asarray(r)  # float64 on the host, outside enable_x64
        error = relative_error(h, r)
        if np.size(h) <= 12:
            lines += [f"  d{name}, hand rule:  {show(h)}", f"  d{name}, jax.grad:   {show(r)}"]
        lines.append(f"  d{name}: max relative difference {error:.1e}")
    return "\n".join(lines)


def _verdict(report: checker.Report) -> str:
    """Each failure, or the counts where a check could not apply, or ``all passed``."""
    if report.failures():
        return "\n".join("FAIL " + f.describe() for f in report.failures())
    return report.summary() if report.not_applicable() else "all passed"


def explain(name: str) -> str:
    """The text ``manualgrad explain NAME`` prints."""
    rule = registry.get(name)
    report = checker.check(rule, checks=("vjp", "finite_diff"), dtype="float64")
    return "\n\n".join(
        [
            f"{rule.name} — {rule.fn.__module__}",
            "Seeds:\n" + "\n".join(f"  {registry.cite(s, section)}" for s, section in rule.seeds),
            text.plain(rule.derivation),
            _live(rule),
            "Every sample, hand VJP against jax.grad of the reference and against finite differences "
            f"(worst relative error):\n{report.table()}\n" + _verdict(report),
        ]
    )
