"""The golden criterion: a function in its own dtype judged against a float64 reference.

Kernel authors judge a fused or low-precision kernel by the criterion of FlashAttention's tests
(Dao, Fu, Ermon, Rudra and Ré, *FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness*, and its repository's ``tests/test_flash_attn.py``): compute the plain reference in
a higher precision, the *golden*; compute the kernel and the same reference in the kernel's
dtype; and require the kernel's error against the golden to be at most a small multiple ``k`` of
the reference's own error against it, plus a floor:

    err_fn = max |fn − golden|,  err_ref = max |ref − golden|,  pass when err_fn ≤ k · err_ref + floor · scale,

``scale`` the largest magnitude of the golden (:func:`judge`). The reference's error measures
how accurate the dtype lets the computation be at these values; a kernel that is right is about
as accurate (its sums run in another order, its statistics in another form), and one whose
backward is wrong by a fraction ``δ`` of its values is ``δ · scale`` off, far above the
reference's round-off once ``δ`` exceeds a few ulps of the dtype.

The numbers (:data:`CRITERIA`), and the evidence for them: JAX's Pallas GPU kernels
``layer_norm``, ``rms_norm`` and ``attention.mha`` in interpret mode, in float32, over ten seeds,
against their own references (``tests/check/test_kernels.py``; ``mha`` also against a plain
float64 reference), and copies of them whose backward carries one planted mistake:

* ``k = 2``, as FlashAttention's tests. On the correct kernels the ratio ``err_fn / err_ref``
  spread from 0.36 to 3.7 with a median of 1: the two are round-off of the same size, and
  neither is systematically ahead. It exceeded 2 in one comparison in twenty (one in six against
  ``mha``'s own reference, which rounds to float32 inside), each time with the reference's own
  error under one ulp of the scale, where the floor takes over. The planted mistakes (a
  cotangent scaled by 1.01, a term dropped, a block zeroed, the softmax scale left out of
  ``dK``) gave ratios from 3.8e4 to 3.2e7: any ``k`` from 2 to 1e4 separates them.
* ``floor`` carries the comparison where the reference happens to be exact at these values
  (``err_ref`` near 0: a linear map of exactly representable inputs, a reference that rounds
  the same way) while the kernel sums in another order. FlashAttention's later tests add twice
  the rounding of the golden's values, ``2 · |(x + 0.3) − 0.3 − x|``: up to two ulps of
  ``max |x|``. The floor here is that, ``2 · ε`` of the dtype times ``scale``; the correct
  kernels, and a bfloat16 network of rules, needed at most about half an ulp beyond
  ``2 · err_ref``. In bfloat16 two ulps are 1.6 % of the scale: a mistake smaller than that is
  below what bfloat16 resolves, and the reference's own error there is usually larger still.
* float64 has no higher precision on hand: the golden of float64 arguments *is* the reference
  (``err_ref = 0``), and the floor is the checker's float64 tolerance, ``1e-12`` of the scale
  (:data:`~manualgrad.check.tolerances.TOLERANCES`), about 4500 ulps: the difference of two
  correct float64 orders of summation over a few thousand terms.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from manualgrad.check.errors import CheckError
from manualgrad.check.tolerances import TOLERANCES
from manualgrad.check.trees import host, is_float


@dataclasses.dataclass(frozen=True)
class Criterion:
    """FlashAttention's test criterion for one dtype: ``err_fn ≤ k · err_ref + floor · scale``."""

    k: float  # the function may be at most k times as far from the golden as the reference is
    floor: float  # plus this absolute floor, in units of the golden's scale (see judge)


def _ulps(dtype: str, n: float) -> float:
    return n * float(np.finfo(jax.numpy.dtype(dtype)).eps)


CRITERIA: dict[str, Criterion] = {
    "float64": Criterion(k=2.0, floor=TOLERANCES["float64"]["vjp"]),
    "float32": Criterion(k=2.0, floor=_ulps("float32", 2)),
    "bfloat16": Criterion(k=2.0, floor=_ulps("bfloat16", 2)),
    "float16": Criterion(k=2.0, floor=_ulps("float16", 2)),
}


def dtype_name(dtype: Any) -> str:
    """``dtype`` (a string, NumPy or JAX dtype) by the name :data:`CRITERIA` uses; a dtype it does
    not judge is refused with a :class:`~manualgrad.check.errors.CheckError`."""
    name = jax.numpy.dtype(dtype).name
    if name not in CRITERIA:
        raise CheckError(f"check: no golden criterion for dtype {name}; choose from {sorted(CRITERIA)}")
    return name


def upcast(tree: Any) -> Any:
    """``tree`` with its floating leaves in float64 (converted on the host), the others unchanged.

    Needs JAX's 64-bit mode (``jax.enable_x64(True)``), without which a float64 array silently
    becomes float32: refused then with a :class:`~manualgrad.check.errors.CheckError`."""
    if not jax.config.jax_enable_x64:
        raise CheckError("check: the golden needs float64, so JAX's 64-bit mode: call upcast inside jax.enable_x64")
    return jax.tree_util.tree_map(lambda x: host(x, np.float64) if is_float(x) else x, tree)


def _floating(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree) if is_float(x)]


def max_error(received: Any, golden: Any) -> float:
    """``max |received − golden|`` over a pytree's floating leaves, in float64 on the host; ``inf``
    where either holds a NaN (a NaN is never within a tolerance)."""
    worst = 0.0
    for a, b in zip(_floating(received), _floating(golden), strict=True):
        if a.shape != b.shape:
            return np.inf
        diff = np.abs(a - b)
        if np.isnan(diff).any():
            return np.inf
        worst = max(worst, float(np.max(diff, initial=0.0)))
    return worst


def scale_of(golden: Any) -> float:
    """``max |golden|`` over a pytree's floating leaves: the scale :func:`judge`'s floor is in units of."""
    return max((float(np.max(np.abs(g), initial=0.0)) for g in _floating(golden)), default=0.0)


def judge(err_fn: float, err_ref: float, dtype: Any, scale: float, *, golden_error: float = 0.0) -> tuple[bool, float]:
    """``(passed, allowed)``: ``allowed = k · err_ref + floor · scale`` with ``dtype``'s
    :class:`Criterion`, and whether ``err_fn`` is within it (a NaN or infinite error never is).

    ``golden_error`` bounds the golden's own error, where it is not exact to float64 (a
    reference that computes in float32 inside): both measured errors are then off by up to
    that much, the function's ``err_fn ≤ true + e`` and the reference's ``true ≤ err_ref + e``,
    so the allowance grows by ``(k + 1) · e``."""
    criterion = CRITERIA[dtype_name(dtype)]
    allowed = criterion.k * err_ref + criterion.floor * scale + (criterion.k + 1) * golden_error
    return bool(np.isfinite(err_fn) and err_fn <= allowed), float(allowed)
