"""The figures of ``manualgrad bench``: one record per figure, the goal it is judged against, and
the run shown as a text table or as JSON."""

from __future__ import annotations

import json
from typing import Any

from manualgrad import text

Record = dict[str, Any]

# The goal of each figure: (comparison, bound), for every model unless keyed by one ("model/figure").
GOALS: dict[str, tuple[str, float]] = {
    "step_ratio_manual_over_jax_grad": ("<=", 1.0),
    "memory_ratio_manual_over_jax_grad": ("<=", 1.0),
    "step_ratio_manual_over_numpy": ("<=", 1.0),
    "step_ratio_manual_over_torch": ("<=", 1.0),
    "mlp_large/flops_fraction_manual_of_matmul": (">=", 0.90),
    "gpt_long/residual_ratio_manual_over_jax_grad": ("<=", 0.5),  # attention keeps no T×S probabilities
    "gpt_2k/residual_ratio_manual_over_jax_grad": ("<=", 0.5),
    # jax.grad's program holds the T×S probabilities; a tiled attention holds one tile of them at a time
    "gpt_2k/memory_ratio_manual_over_jax_grad": ("<=", 0.5),
    "gpt_2k/attention_peak_ratio_manual_over_jax_grad": ("<=", 0.5),
    "check_seconds_float64": ("<", 30.0),
}
# The fields of a whole-run record that its line shows apart from the extras
_NOT_SHOWN = ("figure", "model", "value", "unit", "goal", "meets_goal")


def record(figure: str, value: float | None, unit: str, **extra: Any) -> Record:
    """One figure: ``figure``, ``model`` (None for whole-run figures), ``value``, ``unit``, and extras;
    a figure that could not be measured has value None and says why in ``skipped``."""
    return {"figure": figure, "model": None, "value": value, "unit": unit, **extra}


def judge(rec: Record) -> Record:
    """``rec`` with ``goal`` and ``meets_goal`` where :data:`GOALS` sets a goal for its figure."""
    goal = GOALS.get(f"{rec['model']}/{rec['figure']}") or GOALS.get(rec["figure"])
    if goal is None or rec["value"] is None:
        return rec
    op, bound = goal
    met = {"<=": rec["value"] <= bound, ">=": rec["value"] >= bound, "<": rec["value"] < bound}[op]
    return {**rec, "goal": _bound(op, bound), "meets_goal": bool(met)}


def _bound(op: str, bound: float) -> str:
    return f"{op} {bound:g}"


def _value(rec: Record) -> str:
    v = rec["value"]
    if v is None:
        return "skipped"
    unit = rec["unit"]
    if unit == "bytes":
        return f"{v / 2**20:.2f} MiB"
    if unit in ("FLOP/s", "FLOP"):
        return f"{v / 1e9:.4g} G{unit}"
    if unit in ("ratio", "fraction"):
        return f"{v:.3f}"
    if unit in ("count", "threads"):
        return f"{v:d}"
    if unit == "relative L2":
        return f"{v:.1e}"
    return f"{v:.2f} {unit}"


def _header(result: dict[str, Any]) -> list[str]:
    """The machine, the settings, and one line per model saying what it is."""
    m, s = result["machine"], result["settings"]
    options = " ".join(f"{k}={v}" for k, v in m["compiler_options"].items()) or "none"
    lines = [
        f"manualgrad bench on {m['cpu']} ({m['cores']} cores), backend {m['backend']} ({m['device']}), "
        f"jax {m['jax']}, numpy {m['numpy']}, torch {m['torch'] or 'not installed'}",
        f"{s['dtype']}, {s['optimizer']}, median of {s['repeats']} interleaved repetitions "
        f"(compile: {s['compile_repeats']}); matmul peak from {s['matmul_size']}x{s['matmul_size']}; "
        f"{s['seconds']:.0f} s in all; malloc: {m['host_memory']}; the step's XLA options: {options}",
        "",
    ]
    return lines + (text.table(list(result["models"].items())) if result["models"] else []) + [""]


def _goal(figure: str, goals: dict[str | None, str]) -> str:
    """A row's goal column: the goal of every model, then each goal that one model has of its own, after its name."""
    general = [_bound(*GOALS[figure])] if figure in GOALS else []
    return "; ".join(general + [f"{model} {goal}" for model, goal in goals.items() if f"{model}/{figure}" in GOALS])


def table(result: dict[str, Any]) -> str:
    """The records as a text table — one row per figure, one column per model — under the machine and settings.

    A value that misses its goal is marked ``✗``, one that meets it ``✓``; the whole-run figures
    follow the table, then the reasons for skipped figures.
    """
    models = list(result["models"])
    cells: dict[str, dict[str | None, str]] = {}
    goals: dict[str, dict[str | None, str]] = {}
    notes = []
    for rec in result["records"]:
        mark = "" if "meets_goal" not in rec else (" ✓" if rec["meets_goal"] else " ✗")
        cells.setdefault(rec["figure"], {})[rec["model"]] = _value(rec) + mark
        goals.setdefault(rec["figure"], {})[rec["model"]] = rec.get("goal", "")
        if "skipped" in rec:
            notes.append(f"{rec['model'] or '-'} {rec['figure']} skipped: {rec['skipped']}")
    rows = [("figure", *models, "goal")]
    rows += [
        (f, *(cells[f].get(name, "") for name in models), _goal(f, goals[f])) for f in cells if None not in cells[f]
    ]
    lines = _header(result) + text.table(rows)
    for f in cells:
        if None in cells[f]:
            rec = next(r for r in result["records"] if r["figure"] == f)
            extra = ", ".join(f"{k} {v}" for k, v in rec.items() if k not in _NOT_SHOWN)
            lines.append(
                f"{f}: {cells[f][None]}"
                + (f" (goal {goals[f][None]})" if goals[f][None] else "")
                + (f"; {extra}" if extra else "")
            )
    return "\n".join(lines + notes)


def to_json(result: dict[str, Any]) -> str:
    """The run as one JSON document: ``{"machine", "settings", "records", "models"}``."""
    return json.dumps(result, indent=1)
