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
backward. The usual mistakes (the softmax Jacobian's diagonal alone, the ``1/√H`` left out,
the causal mask forgotten in the backward, ``dQ`` and ``dK`` swapped) are attached to the
rules as :class:`~manualgrad.registry.Mistake` s built from the references.

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
    backward recomputes ``S`` and ``P`` from them (FlashAttention's backward, for whole rows).
    """
    return attention_forward(q, k, v, causal)[0]


# The tile edge for each backend (jax.default_backend()): XLA:CPU runs the tiles of a step as one
# batched product, where a tile's scores should stay in the core's cache; an accelerator wants
# tiles that fill its matrix units. Other backends take the CPU's.
TILES = {"cpu": 128, "gpu": 128, "tpu": 128}


class _Step(NamedTuple):
    """One step of the tiled loop: ``count`` blocks of ``rows`` queries from query ``q0`` on, block
    ``a`` against the ``tile`` keys from ``k0 + a·tile`` on; ``visible`` where some key is masked."""

    q0: int
    count: int
    rows: int
    k0: int
    visible: np.ndarray | None


class _Plan(NamedTuple):
    """The tile edge, the queries and keys padded to whole tiles, and the steps."""

    tile: int
    queries: int
    keys: int
    steps: tuple[_Step, ...]


def tile_size(t: int, s: int, h: int, backend: str | None = None) -> int:
    """The tile edge attention uses for ``T`` queries and ``S`` keys of head size ``H``.

    ``TILES[backend]`` (default ``jax.default_backend()``), halved while a tile's three ``tile × H``
    operands outgrow a ``tile × tile`` score block, so that a large head keeps the block in cache.
    Where both ``T`` and ``S`` fit one tile, that tile is the whole row: one step with no padding,
    the whole-row form (tiling a short row only adds steps, and nothing masked is skipped)."""
    edge = TILES.get(backend or jax.default_backend(), TILES["cpu"])
    while edge > 16 and 3 * h > edge:
        edge //= 2
    return max(t, s) if max(t, s) <= edge else edge


def _plan(t: int, s: int, h: int, causal: bool) -> _Plan:
    """The steps over the tiles that hold a visible key. Without ``causal``, key tile ``j`` against
    every query at once. With ``causal``, step ``d`` pairs query tile ``i`` with key tile ``i − d`` for
    every ``i`` at once: key tiles above the diagonal (``j > i``), empty under the mask, never appear."""
    tile = tile_size(t, s, h)
    key_tiles = -(-s // tile)
    if causal:
        query_tiles = -(-t // tile)
        pairs = [(d * tile, min(query_tiles - d, key_tiles), tile, 0) for d in range(query_tiles)]
        queries = query_tiles * tile
    else:
        pairs = [(0, 1, t, j * tile) for j in range(key_tiles)]
        queries = t
    steps = tuple(_Step(*pair, _visible(*pair, tile, s, causal)) for pair in pairs)
    return _Plan(tile, queries, key_tiles * tile, steps)


def _visible(q0: int, count: int, rows: int, k0: int, tile: int, s: int, causal: bool) -> np.ndarray | None:
    """``(count, rows, tile)``: whether query ``q0 + a·rows + r`` sees key ``k0 + a·tile + c`` (a key
    of the padding ``≥ S`` never, a later key not under ``causal``); ``None`` where every key is seen."""
    blocks = np.arange(count)[:, None, None]
    query = q0 + blocks * rows + np.arange(rows)[None, :, None]
    key = k0 + blocks * tile + np.arange(tile)[None, None, :]
    seen = (key < s) & ((key <= query) if causal else True)
    return None if seen.all() else seen


def _heads_first(a, length: int):
    """``(B, L, N, H)`` as ``(B, N, length, H)``, zero rows appended up to ``length``."""
    a = jnp.swapaxes(a, 1, 2)
    return jnp.pad(a, ((0, 0), (0, 0), (0, length - jnp.shape(a)[2]), (0, 0)))


def _blocks(a, start: int, count: int, size: int):
    """Rows ``start .. start + count·size`` of ``a`` ``(B, N, L, ...)`` as ``count`` blocks of ``size``."""
    b, n = jnp.shape(a)[:2]
    return a[:, :, start : start + count * size].reshape(b, n, count, size, *jnp.shape(a)[3:])


def _put(a, start: int, blocks, add: bool = False):
    """``a`` with the rows from ``start`` on replaced by (or, with ``add``, increased by) ``blocks``."""
    b, n, count, size = jnp.shape(blocks)[:4]
    rows = blocks.reshape(b, n, count * size, *jnp.shape(blocks)[4:])
    where = a.at[:, :, start : start + count * size]
    return where.add(rows) if add else where.set(rows)


def _tile_scores(q, k, step: _Step, tile: int):
    """The step's query blocks, key blocks and scores ``(B, N, count, rows, tile)``, masked keys ``−∞``."""
    qb, kb = _blocks(q, step.q0, step.count, step.rows), _blocks(k, step.k0, step.count, tile)
    s = jnp.einsum("bnarh,bnach->bnarc", qb, kb) * float(1 / np.sqrt(jnp.shape(q)[-1]))  # weakly typed
    return qb, kb, s if step.visible is None else jnp.where(step.visible, s, -jnp.inf)


def _online_step(q, k, v, state, step: _Step, tile: int):
    """The running maximum ``m``, sum ``l`` and accumulator of the step's queries after its keys:
    ``m' = max(m, max S)``, ``l' = e^{m − m'} l + Σ e^{S − m'}``, ``acc' = e^{m − m'} acc + e^{S − m'} V``."""
    m, total, acc = state
    _, _, s = _tile_scores(q, k, step, tile)
    old = [_blocks(x, step.q0, step.count, step.rows) for x in state]
    top = jnp.maximum(old[0], jnp.max(s, axis=-1))
    p = jnp.exp(s - top[..., None])
    shrink = jnp.exp(old[0] - top)  # e^{m − m'} ≤ 1; 0 where m is still −∞
    pv = jnp.einsum("bnarc,bnach->bnarh", p, _blocks(v, step.k0, step.count, tile))
    new = (top, shrink * old[1] + jnp.sum(p, axis=-1), shrink[..., None] * old[2] + pv)
    return tuple(_put(x, step.q0, y) for x, y in zip(state, new))


def attention_forward(q, k, v, causal=False):
    _validate_attention(q, k, v, causal)
    t = jnp.shape(q)[1]
    plan = _plan(t, jnp.shape(k)[1], jnp.shape(q)[3], causal)
    qh, kh, vh = _heads_first(q, plan.queries), _heads_first(k, plan.keys), _heads_first(v, plan.keys)
    m = jnp.full(jnp.shape(qh)[:3], -jnp.inf, qh.dtype)
    state = (m, jnp.zeros_like(m), jnp.zeros_like(qh))
    for step in plan.steps:
        state = _online_step(qh, kh, vh, state, step, plan.tile)
    m, total, acc = state
    o = jnp.swapaxes(acc / total[..., None], 1, 2)[:, :t]
    return o, (q, k, v, o, (m + jnp.log(total))[..., :t])


def _backward_step(inputs, grads, step: _Step, tile: int):
    """The step's share of ``dQ, dK, dV``: ``P = exp(S − ℓ)``, ``dV += Pᵀ G``,
    ``dS = P ⊙ (G Vᵀ − δ)``, ``dQ += dS K/√H``, ``dK += dSᵀ Q/√H``."""
    q, k, v, g, lse, delta = inputs
    qb, kb, s = _tile_scores(q, k, step, tile)
    lse_b, delta_b, gb = (_blocks(x, step.q0, step.count, step.rows) for x in (lse, delta, g))
    p = jnp.exp(s - lse_b[..., None])
    ds = p * (jnp.einsum("bnarh,bnach->bnarc", gb, _blocks(v, step.k0, step.count, tile)) - delta_b[..., None])
    scale = float(1 / np.sqrt(jnp.shape(q)[-1]))
    dq, dk, dv = grads
    return (
        _put(dq, step.q0, jnp.einsum("bnarc,bnach->bnarh", ds, kb) * scale, add=True),
        _put(dk, step.k0, jnp.einsum("bnarc,bnarh->bnach", ds, qb) * scale, add=True),
        _put(dv, step.k0, jnp.einsum("bnarc,bnarh->bnach", p, gb), add=True),
    )


def attention_backward(q, k, v, o, lse, causal, g):
    """Step by step over the forward's tiles, ``P = exp(S − ℓ)`` recomputed from the saved ``ℓ``:
    ``dV = Pᵀ G``, ``dS = P ⊙ (G Vᵀ − rowsum(G ⊙ O))``, ``dQ = dS K/√H``, ``dK = dSᵀ Q/√H``."""
    t, s = jnp.shape(q)[1], jnp.shape(k)[1]
    plan = _plan(t, s, jnp.shape(q)[3], causal)
    pad = ((0, 0), (0, 0), (0, plan.queries - t))
    delta = jnp.pad(jnp.einsum("btnh,btnh->bnt", g, o), pad)  # padded queries: G = 0, δ = 0, ℓ = 0 (finite)
    inputs = (
        _heads_first(q, plan.queries),
        _heads_first(k, plan.keys),
        _heads_first(v, plan.keys),
        _heads_first(g, plan.queries),
        jnp.pad(lse, pad),
        delta,
    )
    grads = (jnp.zeros_like(inputs[0]), jnp.zeros_like(inputs[1]), jnp.zeros_like(inputs[2]))
    for step in plan.steps:
        grads = _backward_step(inputs, grads, step, plan.tile)
    dq, dk, dv = (jnp.swapaxes(x, 1, 2)[:, :n] for x, n in zip(grads, (t, s, s)))
    return dq, dk, dv


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
    k = keys(key)
    return [
        Sample((*(normal(next(k), (b, r, n, h), dtype) for r in (t, s, s)), causal), label)
        for (b, t, s, n, h), causal, label in _ATTENTION_CONFIGS
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
