"""Side-by-side tables for ``comparisons/``: one gradient computed several ways.

Each row is one quantity (``∂L/∂w_4``, ``∇_W``, …) as the seed's hand formula gives it, as
manualgrad's custom_vjp rules give it, as seed 002's Algorithm 1/2 (:mod:`manualgrad.nn.backprop`)
gives it, and as ``jax.grad`` of the plain-``jnp`` reference gives it. A column a row has no
entry for shows ``—``. The last column is the largest entry-wise difference from the hand
formula, relative to the hand formula's largest entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from manualgrad import text
from manualgrad.check.tolerances import relative_error

COLUMNS = ("hand formula (seed)", "custom_vjp rules", "Algorithm 1/2", "jax.grad", "max difference")


@dataclasses.dataclass(frozen=True)
class Row:
    """One quantity, computed up to four ways; ``hand`` is what the others are measured against."""

    quantity: str
    hand: object
    custom_vjp: object = None
    algorithm: object = None
    jax_grad: object = None

    def others(self) -> list[np.ndarray]:
        return [np.asarray(v) for v in (self.custom_vjp, self.algorithm, self.jax_grad) if v is not None]

    def difference(self) -> float:
        """``max |other − hand| / max(|hand|, tiny)`` over every other column
        (:func:`~manualgrad.check.tolerances.relative_error`)."""
        return max((relative_error(o, self.hand) for o in self.others()), default=0.0)


def _cell(value: object) -> str:
    if value is None:
        return "—"
    a = np.asarray(value)
    if a.size == 1:
        return f"{float(a.reshape(())):+.15f}"
    return f"‖·‖={float(np.linalg.norm(a)):.12f} {a.shape}"


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table with :data:`COLUMNS`."""
    cells = [
        [r.quantity, *(_cell(v) for v in (r.hand, r.custom_vjp, r.algorithm, r.jax_grad)), f"{r.difference():.1e}"]
        for r in rows
    ]
    return "\n".join(text.table([["quantity", *COLUMNS], *cells], separator=" │ ", rule=("─", "─┼─")))


def report(title: str, rows: Sequence[Row], tolerance: float = 1e-12) -> float:
    """Prints ``title`` and the table; raises ``AssertionError`` if a row differs by more than ``tolerance``.

    Returns the largest relative difference of any row.
    """
    print(f"\n{title}\n")
    print(table(rows))
    worst = max((r.difference() for r in rows), default=0.0)
    print(f"\nmax difference: {worst:.2e} (relative, float64)")
    bad = [r.quantity for r in rows if not r.difference() <= tolerance]
    assert not bad, f"{title}: {', '.join(bad)} disagree by more than {tolerance:g}"
    return worst
