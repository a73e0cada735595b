"""Window geometry: the convolution and pooling rules' strides, dilations and padding
(:class:`Geometry`), and NumPy's valid/same/full windows of shifts for the 1-D signal rules
(:class:`ModeWindow`).

Everything here is static Python arithmetic done at trace time, so a bad configuration is a
clear error naming the rule before anything reaches XLA.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

from jax import lax

from manualgrad.validation import RuleInputError

Padding = str | int | Sequence[tuple[int, int]]


class Geometry(NamedTuple):
    """A sliding window over ``n`` spatial axes, every field a tuple of ``n`` ints."""

    window: tuple[int, ...]  # kernel or pooling window size
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]  # (lo, hi) per spatial axis
    input: tuple[int, ...]  # spatial size of the input
    output: tuple[int, ...]  # spatial size of the output

    @property
    def effective_window(self) -> tuple[int, ...]:
        """The window's extent once dilated: ``(k − 1) d + 1``."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.window, self.dilation))

    @property
    def leftover(self) -> tuple[int, ...]:
        """Input rows after the last window position that no window reaches (stride > 1)."""
        return tuple(
            i + lo + hi - e - (o - 1) * s
            for i, (lo, hi), e, o, s in zip(self.input, self.pads, self.effective_window, self.output, self.strides)
        )


def positive_ints(rule: str, name: str, value: Any, n: int) -> tuple[int, ...]:
    """An int or a sequence of ``n`` ints, each ≥ 1."""
    values = (
        (value,) * n if isinstance(value, numbers.Integral) else tuple(value) if isinstance(value, Sequence) else None
    )
    if values is None or len(values) != n or not all(isinstance(v, numbers.Integral) and v >= 1 for v in values):
        kind = "an int" if n == 1 else f"an int or {n} ints"
        raise RuleInputError(f"{rule}: {name} must be {kind}, each at least 1, got {value!r}")
    return tuple(int(v) for v in values)


def geometry(
    rule: str,
    input_size: Sequence[int],
    window: Sequence[int],
    stride: Any,
    padding: Padding,
    dilation: Any = 1,
    shapes: str = "",
) -> Geometry:
    """Normalises ``stride``/``padding``/``dilation`` for ``n = len(input_size)`` spatial axes.

    ``padding`` is ``"VALID"``, ``"SAME"`` (XLA's rule: output ``⌈in / stride⌉``, the extra
    row at the end), a non-negative int for every side, or explicit ``(lo, hi)`` pairs.
    ``shapes`` is appended to error messages (e.g. ``"(x: (1, 8, 8, 3), w: (3, 3, 3, 4))"``).
    """
    n = len(input_size)
    strides = positive_ints(rule, "stride", stride, n)
    dilation = positive_ints(rule, "dilation", dilation, n)
    effective = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    if isinstance(padding, str):
        if padding.upper() not in ("VALID", "SAME"):
            raise RuleInputError(
                f"{rule}: padding must be 'VALID', 'SAME', an int or {n} (lo, hi) pairs, got {padding!r}"
            )
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(tuple(input_size), effective, strides, padding.upper()))
    elif isinstance(padding, numbers.Integral):
        pads = ((int(padding), int(padding)),) * n
    else:
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        except (TypeError, ValueError):
            pads = ()
        if len(pads) != n:
            raise RuleInputError(
                f"{rule}: padding must be 'VALID', 'SAME', an int or {n} (lo, hi) pairs, got {padding!r}"
            )
    if any(p < 0 for pair in pads for p in pair):
        raise RuleInputError(f"{rule}: padding must not be negative, got {padding!r}")
    padded = tuple(i + lo + hi for i, (lo, hi) in zip(input_size, pads))
    if any(p < e for p, e in zip(padded, effective)):
        dilated = f" (dilated to {effective})" if effective != tuple(window) else ""
        raise RuleInputError(
            f"{rule}: the window {tuple(window)}{dilated} is larger than the padded input {padded} {shapes}".rstrip()
        )
    output = tuple((p - e) // s + 1 for p, e, s in zip(padded, effective, strides))
    return Geometry(tuple(window), strides, dilation, pads, tuple(input_size), output)


MODES = ("valid", "same", "full")


class ModeWindow(NamedTuple):
    """Where a mode's window of shifts lies, and the zero paddings that realise it.

    For ``x ∈ R^N`` and a ``K``-tap filter, output ``i`` (``0 ≤ i < length``) is the shift
    ``k = i + offset`` of the correlation ``(x ⋆ w)_k = Σ_j x_{k+j} w_j``. Every pass is a
    VALID correlation of a zero-padded (``lax.pad``; a negative amount would crop) signal:

      x_pads: ``x̃ = x`` padded by ``(−o, L + o + K − 1 − N)``, so ``x̃_t = x_{t+o}``
              (length ``L + K − 1``); forward ``y = valid(x̃ ⋆ w)``, gradient ``valid(x̃ ⋆ dy)``.
      g_pads: ``ğ = dy`` padded by ``(K − 1 + o, N − L − o)``, so ``ğ_t = dy_{t−(K−1)−o}``
              (length ``N + K − 1``); backward ``dx = valid(ğ ⋆ flip w)``.
    """

    length: int
    offset: int
    x_pads: tuple[int, int]
    g_pads: tuple[int, int]


def mode_window(rule: str, n: int, k: int, mode: str) -> ModeWindow:
    """numpy's window for ``mode`` (``n = len(x)``, ``k = len(w)``) and its paddings.

    'full' keeps the ``N + K − 1`` shifts ``−(K−1) … N−1`` (full index ``f`` is shift
    ``f − (K−1)``); 'valid' keeps the ``|N − K| + 1`` starting at full index ``min(N, K) − 1``;
    'same' keeps ``max(N, K)`` starting at ``(min(N, K) − 1) // 2`` — except for
    ``numpy.correlate`` with ``K > N``, which swaps its arguments and reverses the result, so
    its window starts at ``N − 1 − (N − 1) // 2``.
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise RuleInputError(f"{rule}: mode must be 'valid', 'same' or 'full', got {mode!r}")
    length = {"valid": abs(n - k) + 1, "same": max(n, k), "full": n + k - 1}[mode]
    if mode == "full":
        start = 0
    elif mode == "valid":
        start = min(n, k) - 1
    elif rule == "correlate1d" and k > n:
        start = n - 1 - (n - 1) // 2
    else:
        start = (min(n, k) - 1) // 2
    o = start - (k - 1)
    return ModeWindow(length, o, (-o, length + o + k - 1 - n), (k - 1 + o, n - length - o))
