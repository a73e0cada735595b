"""The values the autodiff checks compare, for one side (the function under test, the reference
or the golden): the function and its VJP traced once, and the ``forward``, ``jit``, ``vmap`` and
``grad_of_grad`` values from that trace."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from manualgrad.check.trees import traced


@dataclasses.dataclass(frozen=True)
class Traced:
    """A function (the hand rule, the reference or the golden, of the differentiated arguments) and its VJP
    ``(primals, cotangent) ↦ cotangents``, each under one ``jax.jit``: inside a sample's program
    every check that calls them at the same shapes reuses one trace, and the checks under
    ``vmap`` and reverse mode transform that trace instead of tracing the Python again
    (:func:`~manualgrad.check.trees.traced`; inlined, a cold ``manualgrad check`` is faster than
    with nested programs: ``manualgrad bench --check-rules`` times it)."""

    forward: Callable[..., Any]
    pull: Callable[..., Any]

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> Traced:
        return cls(*traced(fn))


def side(fn: Traced, v: Sequence[Any], wanted, p, c, pb, cb) -> dict[str, Any]:
    """One side's (the hand rule's, the reference's or the golden's) values of the autodiff checks ``wanted``.

    The ``jit`` VJP and ``grad_of_grad`` come from one trace of the backward: the VJP of
    ``p ↦ VJP(p, c)``, whose value is the VJP and whose pullback of ``v`` is the gradient of
    ``⟨VJP(p, c), v⟩``, reverse over reverse; ``vmap`` batches the same trace (``pb``, ``cb``:
    the batched primals and cotangents).
    """
    out = {}
    if "forward" in wanted:
        out["forward"] = fn.forward(*p)
    if "vmap" in wanted:
        out["vmap"] = jax.vmap(fn.pull)(pb, cb)
    if "grad_of_grad" in wanted:
        out["jit"], second = jax.vjp(lambda q: fn.pull(q, c), p)
        (out["grad_of_grad"],) = second(tuple(v))
    elif "jit" in wanted:
        out["jit"] = fn.pull(p, c)
    return out
