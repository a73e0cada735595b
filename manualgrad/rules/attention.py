"""Softmax, log-softmax and scaled dot-product attention, their backward rules from saved outputs.

One row ``z`` of ``n`` logits gives ``p = softmax(z)``, ``p_i = e^{z_i} / Σ_j e^{z_j}``. Perturbing
``z`` by ``h`` (seed 003's external definition: the cotangent is what pairs with the change),

    D p(h) = p ⊙ h − p ⟨p, h⟩ = (diag(p) − p pᵀ) h,

a symmetric map, so ``dz = p ⊙ (G − ⟨G, p⟩)``: a function of the output ``p`` alone, which is
all the backward keeps (seed 002's Remark 8). Log-softmax ``y = z − log Σ e^z`` has
``D y(h) = h − 1 pᵀ h`` and ``dz = G − p Σ G``, ``p = e^y`` again from the output.

Attention applies the softmax to every row of scores ``S = Q Kᵀ/√H`` and mixes the values
``V`` with the probabilities. Its backward keeps neither ``S`` nor ``P`` (``T × S`` numbers per
head): it keeps the per-row log-sum-exp ``ℓ`` and recomputes ``P = exp(S − ℓ)``, FlashAttention's
backward; both passes run over tiles of queries and keys, an online softmax in the forward. The
usual mistakes (the softmax Jacobian's diagonal alone, the ``1/√H`` left out, the causal mask
forgotten in the backward, ``dQ`` and ``dK`` swapped) are attached to the rules as
:class:`~manualgrad.registry.Mistake` s built from the references.

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
Inside ``jax.shard_map`` a rule's cotangent of an argument replicated over the devices is summed over
them (seed 002 §4's ``ι*`` across devices), derived once in :mod:`manualgrad.rules.devices`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad import validation
from manualgrad.registry import VJP, Mistake, Rule, Sample, register
from manualgrad.rules import devices, mistakes
from manualgrad.rules.samples import keys, normal

_SOFTMAX_SEEDS = (
    ("003", "the external definition of the gradient, df = ⟨g, dx⟩"),
    ("002", "Remark 8: the backward from the saved output; §4 adjoints"),
)


def _validate_axis(rule: str, z, axis) -> None:
    validation.floating(rule, "z", z)
    validation.min_rank(rule, "z", z, 1, "(..., n) with the n logits along axis")
    ndim = jnp.ndim(z)
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise validation.RuleInputError(
            f"{rule}: axis must be a Python int in [{-ndim}, {ndim}) for z of shape {jnp.shape(z)}, got {axis!r}"
        )


# --------------------------------------------------------------------------- softmax


def softmax_reference(z: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.exp(log_softmax_reference(z, axis))


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def softmax(z: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax along ``axis``: ``p_i = e^{z_i} / Σ_j e^{z_j}``, backward from the saved output.

    ``z`` is any floating array; every line along ``axis`` (a Python int, default the last) is
    one row of logits. ``jax.nn.softmax(z, axis)``. The forward subtracts the row maximum, so
    no ``e^z`` overflows; a row of one entry is ``1``.

    Derivation (seed 003, the external definition of the gradient: ``df = ⟨g, dx⟩`` defines
    ``g``; seed 002, T. Hamm, Remark 8: keep only what the backward needs, here the output).
    Rows do not mix, so take one row ``z`` with ``s = Σ_j e^{z_j}`` and ``p = e^z / s``. Perturb
    ``z`` by ``h``: find ``Ds(h)``, then ``D p(h)`` as a matrix applied to ``h`` (the softmax
    Jacobian), and read ``dz`` off ``⟨G, D p(h)⟩ = ⟨dz, h⟩``.

    Result:

        Ds(h) = Σ_j e^{z_j} h_j = s ⟨p, h⟩
        D p(h) = e^z ⊙ h / s − e^z Ds(h) / s² = p ⊙ h − p ⟨p, h⟩ = (diag(p) − p pᵀ) h

    The Jacobian ``diag(p) − p pᵀ`` is symmetric, its own adjoint, so

        dz = (diag(p) − p pᵀ) G = p ⊙ (G − ⟨G, p⟩)

    with ``⟨G, p⟩`` summed along ``axis``. The diagonal ``p ⊙ G`` alone (an element-wise
    activation's form) is a usual mistake: the ``−p pᵀ`` term is every other entry's share of
    the normalising sum. Residual: the output ``p``.
    """
    return softmax_forward(z, axis)[0]


def softmax_forward(z: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    _validate_axis("softmax", z, axis)
    e = jnp.exp(z - jnp.max(z, axis=axis, keepdims=True))
    p = e / jnp.sum(e, axis=axis, keepdims=True)
    return p, p


def softmax_backward(p: jax.Array, axis: int, g: jax.Array) -> jax.Array:
    """``dz = p ⊙ (G − ⟨G, p⟩)`` along ``axis``."""
    return p * (g - jnp.sum(g * p, axis=axis, keepdims=True))


def _softmax_vjp(axis, p, g):
    return (softmax_backward(p, axis, g),)


softmax.defvjp(softmax_forward, _softmax_vjp)


def _logit_samples(key, dtype):
    """``(z, axis)`` samples shared by softmax and log_softmax: rows along the last, the first
    and a middle axis, one logit, and rows dominated by one large logit (30: the others'
    probabilities are below 1e-13, the backward's ``⟨G, p⟩`` is ``G`` at that entry to round-off)."""
    k = keys(key)
    large = normal(next(k), (3, 6), dtype).at[0, 2].set(30.0).at[2, 5].set(-30.0)
    return [
        Sample((normal(next(k), (4, 5), dtype, 2.0), -1), "batch 4, last axis"),
        Sample((normal(next(k), (1, 1), dtype), -1), "batch 1, one logit"),
        Sample((normal(next(k), (2, 3, 4), dtype, 2.0), 1), "a middle axis"),
        Sample((normal(next(k), (3, 4), dtype), 0), "axis 0"),
        Sample((normal(next(k), (6,), dtype), -1), "no batch axis"),
        Sample((large, -1), "a row with one large logit (30), one with a very small one (-30)"),
    ]


def _softmax_mistakes(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
    z, axis = args
    yield (
        "p ⊙ G, the softmax Jacobian's diagonal alone: its −p pᵀ part (the term −p ⟨G, p⟩) is missing",
        softmax_reference(z, axis) * g,
    )
    yield (
        "the right one for log_softmax (G − p Σ G) instead of softmax",
        mistakes.reference_vjp(log_softmax_reference, args, 0, g, vjp),
    )


register(
    Rule(
        name="softmax",
        fn=softmax,
        reference=softmax_reference,
        sample_inputs=_logit_samples,
        differentiable=(0,),
        seeds=_SOFTMAX_SEEDS,
        mistakes=(Mistake(0, _softmax_mistakes),),
    )
)

# --------------------------------------------------------------------------- log_softmax


def log_softmax_reference(z: jax.Array, axis: int = -1) -> jax.Array:
    # not log(softmax_reference(z)): a probability that underflows (e^{-104} in float32, a trained
    # model's confident row) gives -inf there and NaN in jax.grad of anything that weights it by 0
    top = lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    return z - top - jnp.log(jnp.sum(jnp.exp(z - top), axis=axis, keepdims=True))


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def log_softmax(z: jax.Array, axis: int = -1) -> jax.Array:
    """Log-softmax along ``axis``: ``y = z − log Σ_j e^{z_j}``, backward from the saved output.

    ``jax.nn.log_softmax(z, axis)``; finite wherever ``z`` is (the row maximum is subtracted
    first), where ``log(softmax(z))`` would give ``−∞`` below ``e^{−745}``. With ``m`` the row
    maximum, ``log Σ_j e^{z_j − m}`` is taken as ``log1p`` of the sum without one maximal
    entry, so a dominant entry's ``y ≈ −Σ_{j≠i} p_j`` keeps its digits (``log`` of a sum
    rounded to ``1 + 1e-13`` keeps three).

    Derivation (seed 003, the external definition of the gradient: ``df = ⟨g, dx⟩`` defines
    ``g``; seed 002, T. Hamm, Remark 8: keep only what the backward needs, here the output).
    Take one row, ``s = Σ_j e^{z_j}`` and ``p = e^z / s``. Perturb ``z`` by ``h``: find
    ``D log s(h)``, then ``D y(h)`` as a matrix applied to ``h``, and take its adjoint.

    Result:

        D log s(h) = Ds(h) / s = ⟨p, h⟩
        D y(h) = h − 1 ⟨p, h⟩ = (I − 1 pᵀ) h        (1 the row of ones)

    Its adjoint is ``I − p 1ᵀ``: ``⟨G, h − 1⟨p, h⟩⟩ = ⟨G − p ⟨1, G⟩, h⟩``, so

        dz = G − p Σ G

    with ``Σ G`` along ``axis``, and ``p = e^y`` computed from the saved output ``y`` — the
    only residual. ``dz`` sums to 0 along the row: shifting all logits changes nothing.
    """
    return log_softmax_forward(z, axis)[0]


def log_softmax_forward(z: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    _validate_axis("log_softmax", z, axis)
    shifted = z - jnp.max(z, axis=axis, keepdims=True)
    top = shifted == 0
    others = jnp.sum(jnp.where(top, 0, jnp.exp(shifted)), axis=axis, keepdims=True)
    ties = jnp.sum(top, axis=axis, keepdims=True, dtype=shifted.dtype) - 1
    y = shifted - jnp.log1p(others + ties)
    return y, y


def log_softmax_backward(y: jax.Array, axis: int, g: jax.Array) -> jax.Array:
    """``dz = G − p Σ G`` along ``axis``, ``p = e^y``; where ``p > ½``, as ``(G − Σ G) − (p − 1) Σ G``
    with ``p − 1 = expm1(y)``, which keeps the digits of a dominant entry's ``1 − p``."""
    p, total = jnp.exp(y), jnp.sum(g, axis=axis, keepdims=True)
    return jnp.where(p > 0.5, (g - total) - jnp.expm1(y) * total, g - p * total)


def _log_softmax_vjp(axis, y, g):
    return (log_softmax_backward(y, axis, g),)


log_softmax.defvjp(log_softmax_forward, _log_softmax_vjp)


def _log_softmax_mistakes(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
    yield "the cotangent G itself: the term −p Σ G (the path through log Σ e^z) is missing", g
    yield (
        "the right one for softmax (p ⊙ (G − ⟨G, p⟩)) instead of log_softmax",
        mistakes.reference_vjp(softmax_reference, args, 0, g, vjp),
    )


register(
    Rule(
        name="log_softmax",
        fn=log_softmax,
        reference=log_softmax_reference,
        sample_inputs=_logit_samples,
        differentiable=(0,),
        seeds=_SOFTMAX_SEEDS,
        mistakes=(Mistake(0, _log_softmax_mistakes),),
    )
)

# --------------------------------------------------------------------------- attention

_LAYOUT = "q (B, T, N, H) and k, v (B, S, N, H): batch, positions, heads, head size"


def _validate_attention(q, k, v, causal) -> None:
    arrays = {"q": q, "k": k, "v": v}
    for name, a in arrays.items():
        validation.floating("attention", name, a)
    given = f"(q: {jnp.shape(q)}, k: {jnp.shape(k)}, v: {jnp.shape(v)})"
    if any(jnp.ndim(a) != 4 for a in arrays.values()):
        raise validation.RuleInputError(f"attention: expected {_LAYOUT}, got {given}")
    for axis, what in ((0, "batch B"), (2, "heads N"), (3, "head size H")):
        sizes = {name: jnp.shape(a)[axis] for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{name} has {n}" for name, n in sizes.items())
            raise validation.RuleInputError(
                f"attention: q, k and v must agree in {what} (axis {axis}): {shown} {given}"
            )
    if jnp.shape(k)[1] != jnp.shape(v)[1]:
        raise validation.RuleInputError(f"attention: k and v must have the same key positions S (axis 1) {given}")
    if jnp.shape(k)[1] == 0 or jnp.shape(q)[3] == 0:
        raise validation.RuleInputError(
            f"attention: every query needs at least one key (S ≥ 1) and a head size H ≥ 1 {given}"
        )
    if not isinstance(causal, bool):
        raise validation.RuleInputError(
            f"attention: causal must be a Python bool (True: query t sees the keys s ≤ t), got {causal!r}"
        )
    validation.same_dtype("attention", q=q, k=k, v=v)


def _scores(q, k, causal: bool):
    """``S = Q Kᵀ/√H`` per batch entry and head, ``(B, N, T, S)``; with ``causal`` the keys
    ``s > t`` set to ``−∞`` (top-left aligned: query ``t`` sees keys ``0..t``)."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * float(1 / np.sqrt(jnp.shape(q)[-1]))  # weakly typed: keeps float32
    if not causal:
        return s
    visible = jnp.tril(jnp.ones(jnp.shape(s)[-2:], bool))[None, None]
    return jnp.where(visible, s, -jnp.inf)


def _log_sum_exp(s):
    """``ℓ_t = log Σ_s e^{S_ts}`` over the last axis, ``(B, N, T)``; ``−∞`` entries add nothing."""
    top = jnp.max(s, axis=-1, keepdims=True)
    return (top + jnp.log(jnp.sum(jnp.exp(s - top), axis=-1, keepdims=True)))[..., 0]


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
    return jnp.einsum("bnts,bsnh->btnh", softmax_reference(_scores(q, k, causal), -1), v)


@functools.partial(devices.custom_vjp, nondiff_argnums=(3,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False) -> jax.Array:
    """Scaled dot-product attention ``O = softmax(Q Kᵀ/√H) V`` per batch entry and head.

    ``jax.nn.dot_product_attention``'s layout: ``q`` of shape ``(B, T, N, H)`` (batch, query
    positions, heads, head size), ``k`` and ``v`` ``(B, S, N, H)``; the output is ``(B, T, N, H)``.
    With ``causal=True`` query ``t`` sees the keys ``s ≤ t`` only — top-left aligned, like
    PyTorch's ``is_causal`` and ``jax.nn``'s: for ``S < T`` the queries ``t ≥ S`` see every key,
    for ``S > T`` the last keys are seen by none, and no query is left without a key (key 0 is
    always visible). ``causal`` is a Python bool fixed at trace time, given by name
    (``attention(q, k, v, causal=True)``); ``jax.custom_vjp`` passes it on by position, so the
    signature cannot make it keyword-only.

    Derivation (seed 003, the external definition of the gradient: ``ΔL = ⟨G, ΔO⟩`` defines each
    cotangent; seed 002, T. Hamm, §4: one partial Fréchet derivative at a time, then its adjoint,
    and Remark 8: keep only what the backward needs). Batch entries and heads do not mix, so take
    one: ``Q`` of ``T × H``, ``K`` and ``V`` of ``S × H``, scores ``S = Q Kᵀ/√H``, probabilities
    ``P_t = softmax(S_t)`` row by row (a masked key has ``S_ts = −∞``, ``P_ts = 0``) and
    ``O = P V``, ``G = dO``. The softmax's Jacobian is ``diag(p) − p pᵀ`` (see ``softmax``), its
    own adjoint. Perturb ``V``, then ``P`` (hence ``S``), then ``Q`` and ``K``, and move each
    change to the other side of the inner product.

    Result:

        ΔO = P ΔV + ΔP V:   ⟨G, P ΔV⟩ = ⟨Pᵀ G, ΔV⟩                   ⇒  dV = Pᵀ G
                            ⟨G, ΔP V⟩ = ⟨G Vᵀ, ΔP⟩                   ⇒  dP = G Vᵀ
        ΔP_t = (diag(P_t) − P_t P_tᵀ) ΔS_t                            ⇒  dS_t = P_t ⊙ (dP_t − ⟨dP_t, P_t⟩)
        ⟨dP_t, P_t⟩ = Σ_s ⟨G_t, V_s⟩ P_ts = ⟨G_t, O_t⟩ = rowsum(G ⊙ O)_t
        ΔS = (ΔQ Kᵀ + Q ΔKᵀ)/√H:  ⟨dS, ΔQ Kᵀ⟩/√H = ⟨dS K/√H, ΔQ⟩       ⇒  dQ = dS K/√H
                                  ⟨dS, Q ΔKᵀ⟩/√H = ⟨dSᵀ Q/√H, ΔK⟩     ⇒  dK = dSᵀ Q/√H

    so ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``: the row sums over ``S`` keys become sums over ``H``
    head entries. A masked entry has ``P_ts = 0``, hence ``dS_ts = 0`` and no gradient reaches
    a future key. The backward needs ``P``, not its ``T × S`` storage per head: with the
    log-sum-exp ``ℓ_t = log Σ_s e^{S_ts}``, ``P_ts = exp(S_ts − ℓ_t)``. The residuals are
    ``q, k, v``, the output ``O`` and ``ℓ`` — ``O(B·N·T)`` numbers beyond the inputs — and the
    backward recomputes ``S`` and ``P`` from them.

    Both passes run in tiles that never hold a whole row of scores (T. Dao, D. Y. Fu, S. Ermon,
    A. Rudra and C. Ré, "FlashAttention: Fast and Memory-Efficient Exact Attention with
    IO-Awareness"; T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning"). Queries and keys are cut into tiles of :func:`tile_size`; each query tile visits
    the key tiles in turn, carrying per row a running maximum ``m``, sum ``l`` and accumulator ``a``
    from ``m = −∞``, ``l = 0``, ``a = 0``:

        m' = max(m, max_s S_ts),  l' = e^{m − m'} l + Σ_s e^{S_ts − m'},  a' = e^{m − m'} a + Σ_s e^{S_ts − m'} V_s

    The factors ``e^{m − m'}`` are exact, not an approximation: after the tiles seen so far,
    ``l = Σ_s e^{S_ts − m}`` and ``a = Σ_s e^{S_ts − m} V_s`` over their keys with ``m`` their
    maximum (induction: ``e^{S − m} e^{m − m'} = e^{S − m'}``), so a new maximum only moves the
    common shift of the row, to which softmax is invariant. After the last tile ``O_t = a / l`` and
    ``ℓ_t = m + log l = log Σ_s e^{S_ts}``, every exponent ``≤ 0`` on the way. The backward needs no
    rescaling: ``P_ts = exp(S_ts − ℓ_t)`` is the final probability itself, recomputed tile by tile
    from the saved ``ℓ``, and ``δ = rowsum(G ⊙ O)`` is known before any tile, so each tile adds its
    share of ``dV = Pᵀ G``, ``dQ = dS K/√H`` and ``dK = dSᵀ Q/√H`` — sums over keys and queries,
    which the tiles partition. Under ``causal`` a key tile ``j > i`` holds only keys after every
    query of query tile ``i``: there ``P = 0`` and every share is 0, so those tiles (about half) are
    never computed. The diagonal tiles and a last tile padded past ``T`` or ``S`` set their unseen
    keys to ``−∞`` (a padded query has ``G = 0``, adding nothing); key ``0`` is seen by every row,
    so ``m`` is finite after a row's first tile. Where ``T`` and ``S`` both fit one tile the rows
    are computed whole, in the caller's layout, as derived above: one tile has nothing above the
    diagonal to skip, and a loop and the move to heads-first would only add work.
    """
    return attention_forward(q, k, v, causal)[0]


# The tile edge for each backend (jax.default_backend()): a loop step holds one tile's scores,
# B·N·tile² numbers. On XLA:CPU a smaller tile means more loop steps, each with a fixed cost, and a
# larger one more masked entries computed on the causal diagonal and a score block that leaves the
# core's cache; an accelerator wants tiles that fill its matrix units. Other backends take the CPU's.
TILES = {"cpu": 128, "gpu": 128, "tpu": 128}


class _Tiles(NamedTuple):
    """The rows of a query tile and the edge of a key tile, the numbers of query and key tiles,
    the true ``T`` and ``S``, and ``causal``."""

    rows: int
    edge: int
    queries: int
    keys: int
    t: int
    s: int
    causal: bool

    def seen(self, i, j):
        """Whether query tile ``i`` sees some key of key tile ``j``: its last query is not before the tile."""
        return j * self.edge <= (i + 1) * self.rows - 1


def tile_size(backend: str | None = None) -> int:
    """The tile edge attention uses on ``backend`` (default ``jax.default_backend()``): ``TILES[backend]``."""
    return TILES.get(backend or jax.default_backend(), TILES["cpu"])


def _tiles(t: int, s: int, causal: bool) -> _Tiles:
    """The tiles of ``T`` queries and ``S`` keys. A ``T`` or ``S`` that fits one tile is one tile of
    that length, no padding."""
    edge = tile_size()
    rows, edge = min(t, edge), min(s, edge)
    return _Tiles(rows, edge, -(-t // rows), -(-s // edge), t, s, causal)


def _tiled(a, count: int, edge: int):
    """``(B, N, L, ...)`` as ``(count, B, N, edge, ...)``: tile ``i`` holds positions
    ``i·edge .. (i + 1)·edge``, zero rows appended past ``L``."""
    b, n, length = jnp.shape(a)[:3]
    a = jnp.pad(a, [(0, 0), (0, 0), (0, count * edge - length)] + [(0, 0)] * (jnp.ndim(a) - 3))
    return jnp.moveaxis(a.reshape(b, n, count, edge, *jnp.shape(a)[3:]), 2, 0)


def _untiled(a, length: int):
    """The inverse of :func:`_tiled`: ``(count, B, N, edge, ...)`` as ``(B, N, length, ...)``."""
    count, b, n, edge = jnp.shape(a)[:4]
    return jnp.moveaxis(a, 0, 2).reshape(b, n, count * edge, *jnp.shape(a)[4:])[:, :, :length]


def _tile_scores(tiles: _Tiles, qi, kj, i, j):
    """Scores ``(B, N, rows, edge)`` of query tile ``i`` against key tile ``j``; ``−∞`` for a key
    past ``S`` (the padding) and, under ``causal``, for a key after its query."""
    s = jnp.einsum("bnrh,bnch->bnrc", qi, kj) * float(1 / np.sqrt(jnp.shape(qi)[-1]))  # weakly typed
    if not tiles.causal and tiles.keys * tiles.edge == tiles.s:
        return s
    query = i * tiles.rows + lax.broadcasted_iota(jnp.int32, jnp.shape(s)[-2:], 0)
    key = j * tiles.edge + lax.broadcasted_iota(jnp.int32, jnp.shape(s)[-2:], 1)
    seen = (key < tiles.s) & (key <= query) if tiles.causal else key < tiles.s
    return jnp.where(seen, s, -jnp.inf)


def _loop(step, carry, xs, seen=None, skip=None):
    """``lax.scan`` of ``step(carry, (x, index))`` over ``xs`` stacked on axis 0; where
    ``seen(index)`` is false, ``skip(carry, (x, index))`` runs instead (``lax.cond``: the tile is
    never computed). One tile is the whole row: ``step`` runs once, with no loop."""
    count = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if count == 1:
        carry, y = step(carry, (jax.tree_util.tree_map(lambda a: a[0], xs), 0))
        return carry, jax.tree_util.tree_map(lambda a: a[None], y)

    def body(carry, x):
        return step(carry, x) if seen is None else lax.cond(seen(x[1]), step, skip, carry, x)

    return lax.scan(body, carry, (xs, jnp.arange(count)))


def _causal_only(tiles: _Tiles, seen):
    """``seen`` under ``causal``; ``None`` (every tile seen) without."""
    return seen if tiles.causal else None


def attention_forward(q, k, v, causal=False):
    _validate_attention(q, k, v, causal)
    tiles = _tiles(jnp.shape(q)[1], jnp.shape(k)[1], causal)
    if tiles.queries == tiles.keys == 1:  # one tile: the whole row, in the caller's layout
        s = _scores(q, k, causal)
        lse = _log_sum_exp(s)
        o = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), v)
        return o, (q, k, v, o, lse)
    qt = _tiled(jnp.swapaxes(q, 1, 2), tiles.queries, tiles.rows)
    kv = tuple(_tiled(jnp.swapaxes(a, 1, 2), tiles.keys, tiles.edge) for a in (k, v))

    def row(_, tile):
        qi, i = tile

        def update(state, tile):  # m' = max(m, max S), l' = e^{m − m'} l + Σ e^{S − m'}, the same for acc
            (kj, vj), j = tile
            m, total, acc = state
            s = _tile_scores(tiles, qi, kj, i, j)
            top = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - top[..., None])
            shrink = jnp.exp(m - top)  # e^{m − m'} ≤ 1; 0 while m is still −∞
            pv = jnp.einsum("bnrc,bnch->bnrh", p, vj)
            return (top, shrink * total + jnp.sum(p, axis=-1), shrink[..., None] * acc + pv), None

        m = jnp.full(jnp.shape(qi)[:3], -jnp.inf, qi.dtype)
        # the running max and sum start as constants: inside shard_map they vary as qi does (the scan's carry)
        state = devices.vary_like((m, jnp.zeros_like(m), jnp.zeros_like(qi)), qi)
        seen = _causal_only(tiles, lambda j: tiles.seen(i, j))
        (m, total, acc), _ = _loop(update, state, kv, seen, lambda c, _: (c, None))
        return None, (acc / total[..., None], m + jnp.log(total))

    _, (o, lse) = _loop(row, None, qt)
    o = jnp.swapaxes(_untiled(o, tiles.t), 1, 2)
    return o, (q, k, v, o, _untiled(lse, tiles.t))


def attention_backward(q, k, v, o, lse, causal, g):
    """Key tile by key tile, the query tiles that see it in turn, ``P = exp(S − ℓ)`` recomputed from
    the saved ``ℓ``: ``dV = Pᵀ G``, ``dS = P ⊙ (G Vᵀ − rowsum(G ⊙ O))``, ``dQ = dS K/√H``, ``dK = dSᵀ Q/√H``."""
    tiles = _tiles(jnp.shape(q)[1], jnp.shape(k)[1], causal)
    scale = float(1 / np.sqrt(jnp.shape(q)[-1]))
    delta = jnp.einsum("btnh,btnh->bnt", g, o)  # padded queries: G = 0, δ = 0 and ℓ = 0 (finite), so dS = 0
    if tiles.queries == tiles.keys == 1:
        p = jnp.exp(_scores(q, k, causal) - lse[..., None])
        ds = p * (jnp.einsum("btnh,bsnh->bnts", g, v) - delta[..., None])
        dq, dk = jnp.einsum("bnts,bsnh->btnh", ds, k) * scale, jnp.einsum("bnts,btnh->bsnh", ds, q) * scale
        return dq, dk, jnp.einsum("bnts,btnh->bsnh", p, g)
    heads_first = (jnp.swapaxes(q, 1, 2), jnp.swapaxes(g, 1, 2), lse, delta)
    rows = tuple(_tiled(a, tiles.queries, tiles.rows) for a in heads_first)
    kv = tuple(_tiled(jnp.swapaxes(a, 1, 2), tiles.keys, tiles.edge) for a in (k, v))

    def column(dq, tile):
        (kj, vj), j = tile

        def add(grads, tile):
            (qi, gi, lse_i, delta_i), i = tile
            p = jnp.exp(_tile_scores(tiles, qi, kj, i, j) - lse_i[..., None])
            ds = p * (jnp.einsum("bnrh,bnch->bnrc", gi, vj) - delta_i[..., None])
            dk = grads[0] + jnp.einsum("bnrc,bnrh->bnch", ds, qi) * scale
            return (dk, grads[1] + jnp.einsum("bnrc,bnrh->bnch", p, gi)), jnp.einsum("bnrc,bnch->bnrh", ds, kj) * scale

        def skip(grads, tile):
            return grads, jnp.zeros_like(tile[0][0])

        seen = _causal_only(tiles, lambda i: tiles.seen(i, j))
        (dk, dv), dq_j = _loop(add, (jnp.zeros_like(kj), jnp.zeros_like(vj)), rows, seen, skip)
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = _loop(column, jnp.zeros_like(rows[0]), kv)
    return tuple(jnp.swapaxes(_untiled(a, n), 1, 2) for a, n in ((dq, tiles.t), (dk, tiles.s), (dv, tiles.s)))


def _attention_vjp(causal, residuals, g):
    return attention_backward(*residuals, causal, g)


attention.defvjp(attention_forward, _attention_vjp)

# (B, T, S, N, H), causal, label. Entries of order one: a row dominated by one logit needs q·k
# large, and the backward's absolute round-off grows with it (dS = P ⊙ (dP − δ) cancels in such
# a row) past the checker's floor of ten ulps of 1 in float64; tests/rules/test_transformer.py
# checks those rows at their own scale. softmax and log_softmax have theirs (a logit of 30) here.
_ATTENTION_CONFIGS = [
    ((2, 4, 4, 2, 3), False, "batch 2, 2 heads, T = S"),
    ((2, 4, 4, 2, 3), True, "causal, T = S"),
    ((1, 1, 5, 2, 3), False, "one query (T = 1), batch 1"),
    ((2, 3, 5, 1, 2), True, "S > T, one head, causal: keys 3 and 4 seen by no query"),
    ((1, 5, 3, 2, 2), True, "S < T, causal: queries 3 and 4 see every key"),
]


def _attention_samples(key, dtype):
    """The configurations above, each one tile (the whole row), and two that the backend's tile
    edge ``e`` splits: causal with two tiles each way, the last ragged (``T = S = e + e/3``: the
    tile above the diagonal skipped, a rescaled row, padded queries and keys), and five queries
    (one tile of 5 rows) against three key tiles, the last ragged. Rows no longer than that: the
    float32 check's round-off grows with the keys a row sums over."""
    e = tile_size()
    tiled = [
        ((1, e + e // 3, e + e // 3, 1, 2), True, f"causal, 2 tiles of {e} each way, the last ragged"),
        ((1, 5, 2 * e + 3, 1, 2), False, f"3 key tiles of {e}, the last ragged"),
    ]
    k = keys(key)
    return [
        Sample((*(normal(next(k), (b, r, n, h), dtype) for r in (t, s, s)), causal), label)
        for (b, t, s, n, h), causal, label in _ATTENTION_CONFIGS + tiled
    ]


def _pulled_back(q, k, v, g, lse, rowsum, causal: bool):
    """``Σ exp(S_ts − ℓ_t) (⟨G_t, V_s⟩ − δ_t)`` over every batch entry, head, query and key,
    ``S`` the scores of ``(q, k)`` with or without the mask, ``ℓ`` and ``δ`` held fixed. With
    the forward's mask, ``ℓ`` its log-sum-exp and ``δ = rowsum(G ⊙ O)``, its gradient in
    ``(q, k, v)`` is attention's VJP under ``G``: ``dV = Pᵀ G`` and ``dS = P ⊙ (G Vᵀ − δ)``.
    Another mask or ``δ = 0`` gives a usual mistake's wrong answer."""
    p = jnp.exp(_scores(q, k, causal) - lse[..., None])
    return jnp.sum(p * (jnp.einsum("btnh,bsnh->bnts", g, v) - rowsum[..., None]))


def _attention_mistakes(i: int):
    """The usual mistakes in argument ``i`` (0 ``q``, 1 ``k``, 2 ``v``) of attention."""

    def candidates(vjp: VJP, args, g) -> Iterator[tuple[str, Any]]:
        q, k, v, causal = args
        lse = _log_sum_exp(_scores(q, k, causal))
        rowsum = jnp.einsum("btnh,btnh->bnt", g, attention_reference(q, k, v, causal))
        one = jnp.ones((), jnp.result_type(q))

        def pulled(**changed):
            terms = {"g": g, "lse": lse, "rowsum": rowsum, "causal": causal, **changed}
            return vjp(lambda a: _pulled_back(*mistakes.replace((q, k, v), i, a), **terms), args[i], one)

        right = mistakes.reference_vjp(attention_reference, args, i, g, vjp)
        if causal:
            yield (
                "the right one with the causal mask not applied in the backward: P recomputed from the unmasked "
                "scores, so gradient reaches the future keys s > t",
                pulled(causal=False),
            )
            yield (
                "the right one for causal=False: the backward ignores the causal mask",
                mistakes.reference_vjp(attention_reference, (q, k, v, False), i, g, vjp),
            )
        if i == 2:
            if jnp.shape(q) == jnp.shape(k):
                p = jnp.exp(_scores(q, k, causal) - lse[..., None])
                yield "P G instead of Pᵀ G: P not transposed in dV", jnp.einsum("bnst,btnh->bsnh", p, g)
            return
        yield (
            "the right one with the softmax Jacobian's diagonal alone, dS = P ⊙ dP: the term −rowsum(dO ⊙ O) "
            "(its −p pᵀ part) is missing",
            pulled(rowsum=jnp.zeros_like(rowsum)),
        )
        yield (
            f"the right one times √H = {np.sqrt(jnp.shape(q)[-1]):.4g}: the scale 1/√H left out of d{'qk'[i]}",
            np.sqrt(jnp.shape(q)[-1]) * right,
        )
        if jnp.shape(q) == jnp.shape(k):
            other = "kq"[i]
            yield (
                f"the right d{other}: dQ and dK swapped (dQ = dS K/√H, dK = dSᵀ Q/√H)",
                mistakes.reference_vjp(attention_reference, args, 1 - i, g, vjp),
            )

    return Mistake(i, candidates)


register(
    Rule(
        name="attention",
        fn=attention,
        reference=attention_reference,
        sample_inputs=_attention_samples,
        differentiable=(0, 1, 2),
        seeds=(
            ("003", "the external definition of the gradient, df = ⟨g, dx⟩"),
            ("002", "§4 adjoints of each partial derivative; Remark 8: keep only what the backward needs"),
        ),
        linear_in=((2,),),
        mistakes=tuple(_attention_mistakes(i) for i in range(3)),
    )
)
