"""The collectives across devices, as rules: ``all_gather``, ``psum_scatter``, ``psum``, ``pvary`` and
``sync_batch_norm`` (batch norm whose statistics span every device, PyTorch's ``SyncBatchNorm``).

Each rule below follows the protocol of :mod:`manualgrad.rules`; read it there before adding one.
A collective runs only inside ``jax.shard_map``, over the mesh axis its ``axis_name`` names.
``Rule.split`` says which arguments vary by device: the samples give each of them as the blocks
of every device stacked on a leading axis (:data:`~manualgrad.rules.devices.SAMPLE_DEVICES` of
them, along :data:`~manualgrad.rules.devices.SAMPLE_AXIS`), and the checker runs the rule on
such a mesh (:func:`manualgrad.check.sharded.device_rule`); where the process has fewer devices
every check of these rules is not applicable. The references are JAX's own collectives, so
JAX's transposes judge the hand adjoints.

Inside ``shard_map`` with ``check_vma=True`` a value's type says whether it varies by device.
The all-reduce ``psum`` takes a varying value to an invariant one and ``pvary`` an invariant
one to a varying copy: they are Megatron-LM's conjugate operators (M. Shoeybi et al.,
"Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism", §3),
``g`` (all-reduce forward, identity backward) and ``f`` (identity forward, all-reduce
backward). They are named as JAX names them (``pvary`` is ``lax.pvary`` of JAX's releases up to
0.9, ``lax.pcast(x, axis_name, to="varying")`` since), so that a reader of JAX's ``shard_map``
documentation finds them, and not by Megatron's letters, which say nothing of what they do.
Sequence parallelism (V. Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models") pairs ``all_gather`` with ``psum_scatter``, each the other's adjoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from manualgrad import validation
from manualgrad.registry import VJP, Mistake, Rule, Sample, register
from manualgrad.rules import devices, normalization
from manualgrad.rules.samples import keys, normal

_SEEDS = (("002", "§4 ι and ι*: the adjoint of copying is summing the copies"),)
_D = devices.SAMPLE_DEVICES


def _stacked_blocks(g: jax.Array) -> jax.Array:
    """A cotangent seen from outside ``shard_map`` ``(D, D·n, ...)`` as ``(D, D, n, ...)``: device, block."""
    return jnp.reshape(g, (_D, _D, g.shape[1] // _D, *g.shape[2:]))


# --------------------------------------------------------------------------- all_gather


def all_gather_reference(x: jax.Array, axis_name: str) -> jax.Array:
    return lax.all_gather(x, axis_name, tiled=True)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def all_gather(x: jax.Array, axis_name: str) -> jax.Array:
    """All-gather: every device's block ``x_k`` of shape ``(n, ...)``, concatenated along the first axis
    on every device, ``y = [x_1; …; x_D]`` of shape ``(D·n, ...)``.

    Derivation (seed 002 §4: the adjoint from ``⟨G, C(h)⟩ = ⟨C*(G), h⟩``; Korthikanti et al.,
    "Reducing Activation Recomputation in Large Transformer Models": all-gather and
    reduce-scatter, each the other's adjoint). Device ``j`` holds ``y`` and its cotangent
    ``G^j`` (``D`` blocks ``G^j_k`` of ``n`` rows). Perturbing device ``k``'s block by ``h``
    changes block ``k`` of ``y`` on every device ``j``, so the loss, which sums over devices, sees

    Result:

        ΔL = Σ_j ⟨G^j_k, h⟩ = ⟨Σ_j G^j_k, h⟩      ⇒  dx_k = Σ_j G^j_k = psum_scatter(G)_k

    the sum over the devices of each device's block ``k``: a reduce-scatter. Each device's
    ``G^j_k`` alone misses the other devices' paths (seed 003's variable on several paths);
    nothing is saved for the backward.
    """
    return all_gather_forward(x, axis_name)[0]


def all_gather_forward(x: jax.Array, axis_name: str) -> tuple[jax.Array, tuple[()]]:
    validation.floating("all_gather", "x", x)
    validation.min_rank("all_gather", "x", x, 1, "(n, ...), one block per device")
    validation.mesh_axis("all_gather", axis_name)
    validation.varies("all_gather", "x", x, axis_name, True)
    return lax.all_gather(x, axis_name, tiled=True), ()


def all_gather_backward(axis_name: str, g: jax.Array) -> jax.Array:
    """``dx_k = Σ_j G^j_k``: the reduce-scatter of ``G`` along the first axis."""
    return lax.psum_scatter(g, axis_name, scatter_dimension=0, tiled=True)


def _all_gather_vjp(axis_name, residuals, g):
    del residuals
    return (all_gather_backward(axis_name, g),)


all_gather.defvjp(all_gather_forward, _all_gather_vjp)


def _all_gather_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (_D, 3, 2), dtype), devices.SAMPLE_AXIS), "blocks of 3 rows"),
        Sample((normal(next(k), (_D, 1), dtype), devices.SAMPLE_AXIS), "one entry per device"),
        Sample((normal(next(k), (_D, 2, 2, 3), dtype), devices.SAMPLE_AXIS), "a sequence block (T, B, C)"),
    ]


def _gather_mistakes(vjp: VJP, args, g):
    blocks = _stacked_blocks(g)  # (device j, block k, ...)
    own = jnp.stack([blocks[k, k] for k in range(_D)])
    yield "each device's own block of G: the sum over the devices (the reduce) is missing", own
    yield "the mean over the devices instead of their sum", jnp.sum(blocks, axis=0) / _D


register(
    Rule(
        name="all_gather",
        fn=all_gather,
        reference=all_gather_reference,
        sample_inputs=_all_gather_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
        mistakes=(Mistake(0, _gather_mistakes),),
        split=(0,),
    )
)

# --------------------------------------------------------------------------- psum_scatter


def psum_scatter_reference(x: jax.Array, axis_name: str) -> jax.Array:
    return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def psum_scatter(x: jax.Array, axis_name: str) -> jax.Array:
    """Reduce-scatter: every device's ``x^j`` of shape ``(D·n, ...)``, in ``D`` blocks ``x^j_k`` of ``n``
    rows; device ``k`` keeps the sum of everyone's block ``k``, ``y_k = Σ_j x^j_k``.

    Derivation (seed 002 §4; Korthikanti et al., "Reducing Activation Recomputation in Large
    Transformer Models", sequence parallelism). Perturb device ``j``'s ``x^j`` by ``h`` (blocks
    ``h_k``): device ``k``'s output changes by ``h_k``, so with ``G_k`` device ``k``'s cotangent

    Result:

        ΔL = Σ_k ⟨G_k, h_k⟩ = ⟨[G_1; …; G_D], h⟩     ⇒  dx^j = [G_1; …; G_D] = all_gather(G)

    the same on every device ``j``: the all-gather, the adjoint of the reduce-scatter (and the
    reduce-scatter the all-gather's, :func:`all_gather`). Summing again over the devices counts
    each path ``D`` times; keeping only ``G_j`` in block ``j`` drops the other devices' outputs.
    """
    return psum_scatter_forward(x, axis_name)[0]


def psum_scatter_forward(x: jax.Array, axis_name: str) -> tuple[jax.Array, tuple[()]]:
    validation.floating("psum_scatter", "x", x)
    validation.min_rank("psum_scatter", "x", x, 1, "(D·n, ...), D blocks")
    count = validation.mesh_axis("psum_scatter", axis_name)
    if jnp.shape(x)[0] % count:
        raise validation.RuleInputError(
            f"psum_scatter: the first axis of x must split into {count} blocks, one per device along "
            f"{axis_name!r}, got x: {jnp.shape(x)}"
        )
    validation.varies("psum_scatter", "x", x, axis_name, True)
    return lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True), ()


def psum_scatter_backward(axis_name: str, g: jax.Array) -> jax.Array:
    """``dx^j = [G_1; …; G_D]``: the all-gather of ``G`` along the first axis."""
    return lax.all_gather(g, axis_name, tiled=True)


def _psum_scatter_vjp(axis_name, residuals, g):
    del residuals
    return (psum_scatter_backward(axis_name, g),)


psum_scatter.defvjp(psum_scatter_forward, _psum_scatter_vjp)


def _psum_scatter_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (_D, 2 * _D, 3), dtype), devices.SAMPLE_AXIS), "blocks of 2 rows"),
        Sample((normal(next(k), (_D, _D), dtype), devices.SAMPLE_AXIS), "one entry per block"),
        Sample((normal(next(k), (_D, 2 * _D, 2, 2), dtype), devices.SAMPLE_AXIS), "a sequence (T, B, C)"),
    ]


def _scatter_mistakes(vjp: VJP, args, g):
    gathered = jnp.reshape(g, (_D * g.shape[1], *g.shape[2:]))  # [G_1; …; G_D]
    right = jnp.stack([gathered] * _D)
    yield "the all-gather summed over the devices again: each path counted once per device", _D * right
    mine = jnp.zeros((_D, _D, *g.shape[1:]), g.dtype).at[jnp.arange(_D), jnp.arange(_D)].set(g)  # device, block
    own = jnp.reshape(mine, right.shape)
    yield "G_j in device j's own block and zeros elsewhere: the other devices' outputs are missing", own


register(
    Rule(
        name="psum_scatter",
        fn=psum_scatter,
        reference=psum_scatter_reference,
        sample_inputs=_psum_scatter_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
        mistakes=(Mistake(0, _scatter_mistakes),),
        split=(0,),
    )
)

# --------------------------------------------------------------------------- psum


def psum_reference(x: jax.Array, axis_name: str) -> jax.Array:
    return lax.psum(x, axis_name)


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def psum(x: jax.Array, axis_name: str) -> jax.Array:
    """All-reduce: every device's own ``x_k`` summed, ``y = Σ_k x_k``, one value on every device.

    Derivation (seed 002 §4; M. Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter
    Language Models Using Model Parallelism", §3, the operator ``g``). ``y`` is invariant: one
    value, whose cotangent ``G`` is one value too (JAX has already summed whatever the devices'
    uses of ``y`` contributed). Perturbing device ``k``'s ``x_k`` by ``h`` changes ``y`` by ``h``:

    Result:

        ΔL = ⟨G, h⟩      ⇒  dx_k = G on every device k: pvary(G), the identity backward

    Megatron's ``g`` (all-reduce forward, identity backward) is this rule. A backward that
    all-reduces again (the adjoint of a plain sum of copies) sums ``G`` where the argument
    varies: ``D`` times too much.
    """
    return psum_forward(x, axis_name)[0]


def psum_forward(x: jax.Array, axis_name: str) -> tuple[jax.Array, tuple[()]]:
    validation.floating("psum", "x", x)
    validation.mesh_axis("psum", axis_name)
    validation.varies("psum", "x", x, axis_name, True)
    return lax.psum(x, axis_name), ()


def psum_backward(axis_name: str, g: jax.Array) -> jax.Array:
    """``dx_k = G``: the invariant cotangent, as each device's own copy."""
    return devices.to_varying(g, (axis_name,))


def _psum_vjp(axis_name, residuals, g):
    del residuals
    return (psum_backward(axis_name, g),)


psum.defvjp(psum_forward, _psum_vjp)


def _psum_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (_D, 4, 3), dtype), devices.SAMPLE_AXIS), "a (4, 3) block per device"),
        Sample((normal(next(k), (_D,), dtype), devices.SAMPLE_AXIS), "a scalar per device"),
    ]


def _psum_mistakes(vjp: VJP, args, g):
    right = jnp.stack([jnp.sum(g, axis=0)] * _D)
    yield "the right one summed over the devices once more: summed where the argument varies", _D * right
    yield "each device's own cotangent of the output, not the one G of the invariant output", g


register(
    Rule(
        name="psum",
        fn=psum,
        reference=psum_reference,
        sample_inputs=_psum_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
        mistakes=(Mistake(0, _psum_mistakes),),
        split=(0,),
    )
)

# --------------------------------------------------------------------------- pvary


def pvary_reference(x: jax.Array, axis_name: str) -> jax.Array:
    return lax.pcast(x, axis_name, to="varying")


@functools.partial(devices.custom_vjp, nondiff_argnums=(1,))
def pvary(x: jax.Array, axis_name: str) -> jax.Array:
    """Copy to every device: one value ``x``, the same on every device, becomes each device's own
    ``y_k = x`` (no data moves: ``lax.pcast(x, axis_name, to="varying")``).

    Derivation (seed 002 §4, T. Hamm's ``ι`` and ``ι*``; M. Shoeybi et al., "Megatron-LM:
    Training Multi-Billion Parameter Language Models Using Model Parallelism", §3, the operator
    ``f``). Seed 002's ``ι`` copies a bias to every row of a batch; ``pvary`` copies ``x`` to every
    device. Perturbing ``x`` by ``h`` perturbs every copy, and device ``k``'s cotangent is ``G_k``:

    Result:

        ΔL = Σ_k ⟨G_k, h⟩ = ⟨Σ_k G_k, h⟩      ⇒  dx = ι*(G) = Σ_k G_k = psum(G)

    Megatron's ``f`` (identity forward, all-reduce backward) is this rule, and every rule applies
    it to an argument replicated over the devices (:mod:`manualgrad.rules.devices`). One device's
    ``G_k`` alone is the missing sum.
    """
    return pvary_forward(x, axis_name)[0]


def pvary_forward(x: jax.Array, axis_name: str) -> tuple[jax.Array, tuple[()]]:
    validation.floating("pvary", "x", x)
    validation.mesh_axis("pvary", axis_name)
    validation.varies("pvary", "x", x, axis_name, False)
    return lax.pcast(x, axis_name, to="varying"), ()


def pvary_backward(axis_name: str, g: jax.Array) -> jax.Array:
    """``dx = Σ_k G_k``: the all-reduce of the copies' cotangents."""
    return lax.psum(g, axis_name)


def _pvary_vjp(axis_name, residuals, g):
    del residuals
    return (pvary_backward(axis_name, g),)


pvary.defvjp(pvary_forward, _pvary_vjp)


def _pvary_samples(key, dtype):
    k = keys(key)
    return [
        Sample((normal(next(k), (4, 3), dtype), devices.SAMPLE_AXIS), "a (4, 3) weight"),
        Sample((normal(next(k), (), dtype), devices.SAMPLE_AXIS), "a scalar"),
    ]


def _pvary_mistakes(vjp: VJP, args, g):
    yield "device 0's cotangent alone: the sum over the devices is missing", g[0]
    yield "the mean over the devices instead of their sum", jnp.sum(g, axis=0) / _D


register(
    Rule(
        name="pvary",
        fn=pvary,
        reference=pvary_reference,
        sample_inputs=_pvary_samples,
        differentiable=(0,),
        seeds=_SEEDS,
        linear_in=((0,),),
        mistakes=(Mistake(0, _pvary_mistakes),),
    )
)

# --------------------------------------------------------------------------- sync_batch_norm


def sync_batch_norm_reference(x, gamma, beta, eps, axis_name):
    leading = tuple(range(jnp.ndim(x) - 1))
    mu = lax.pmean(jnp.mean(x, axis=leading, keepdims=True), axis_name)
    var = lax.pmean(jnp.mean((x - mu) ** 2, axis=leading, keepdims=True), axis_name)
    shape = (1,) * len(leading) + jnp.shape(gamma)
    return jnp.reshape(gamma, shape) * (x - mu) / jnp.sqrt(var + eps) + jnp.reshape(beta, shape)


@functools.partial(devices.custom_vjp, nondiff_argnums=(3, 4))
def sync_batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, eps: float, axis_name: str) -> jax.Array:
    """Batch normalisation across devices (PyTorch's ``SyncBatchNorm``): ``batch_norm`` whose
    statistics span every device's block of the batch along ``axis_name``, ``y = γ x̂ + β``.

    Each device holds ``m`` entries of a channel (its block of the batch, and H and W), the
    ``D`` devices ``M = D m`` together, and every device uses the statistics of all ``M``:

        μ = (1/M) Σ_all x,    v = (1/M) Σ_all (x − μ)²,    σ = √(v + ε),

    ``Σ_all`` being each device's own sum all-reduced. The same numbers as ``batch_norm`` on the
    whole batch on one device. Every device holds the same number of entries (as
    ``jax.shard_map``'s blocks do).

    Derivation (seed 002 §4 and ``batch_norm``'s: the statistics are one function of the whole
    batch, wherever its entries are held). ``batch_norm``'s result holds with ``m`` → ``M`` and
    every ``Σ`` over all ``M`` entries: a sum over the whole batch is each device's own sum,
    summed over the devices. ``γ`` and ``β``, replicated, are copied to every device; their
    cotangents are each device's ``ι*`` summed over the devices (:mod:`manualgrad.rules.devices`).

    Result:

        dβ_k = Σ_k G,   dγ_k = Σ_k G ⊙ x̂            (each device k's own sums)
        dx = (γ/(M σ)) (M G − Σ_j dβ_j − x̂ Σ_j dγ_j) = (γ/(m σ)) (m G − mean_j dβ_j − x̂ mean_j dγ_j)

    the statistics' cotangents all-reduced: ``batch_norm``'s backward fed the devices' mean of
    the two per-channel sums (``lax.pmean``). Each device's own sums alone are the local batch's
    statistics, not the ones the forward used.
    """
    return sync_batch_norm_forward(x, gamma, beta, eps, axis_name)[0]


def sync_batch_norm_forward(x, gamma, beta, eps, axis_name):
    for name, a in (("x", x), ("gamma", gamma), ("beta", beta)):
        validation.floating("sync_batch_norm", name, a)
    validation.min_rank("sync_batch_norm", "x", x, 2, "(batch, ..., C)")
    if jnp.shape(gamma) != jnp.shape(x)[-1:] or jnp.shape(beta) != jnp.shape(x)[-1:]:
        raise validation.RuleInputError(
            f"sync_batch_norm: gamma and beta must have shape {jnp.shape(x)[-1:]} to match the channels (last axis) "
            f"of x (x: {jnp.shape(x)}, gamma: {jnp.shape(gamma)}, beta: {jnp.shape(beta)})"
        )
    validation.same_dtype("sync_batch_norm", x=x, gamma=gamma, beta=beta)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise validation.RuleInputError(f"sync_batch_norm: eps must be a Python number > 0, got {eps!r}")
    validation.mesh_axis("sync_batch_norm", axis_name)
    leading = tuple(range(jnp.ndim(x) - 1))
    centred = x - lax.pmean(jnp.mean(x, axis=leading, keepdims=True), axis_name)
    inv = lax.rsqrt(lax.pmean(jnp.mean(centred * centred, axis=leading, keepdims=True), axis_name) + eps)
    xhat = centred * inv
    shape = (1,) * len(leading) + jnp.shape(gamma)
    return jnp.reshape(gamma, shape) * xhat + jnp.reshape(beta, shape), (xhat, inv, gamma)


def sync_batch_norm_backward(axis_name, xhat, inv, gamma, dgamma, dbeta, g):
    """``dx``: ``batch_norm``'s backward fed the devices' mean of the two per-channel sums."""
    mean = functools.partial(lax.pmean, axis_name=axis_name)
    return normalization.batch_norm_backward(xhat, inv, gamma, mean(dgamma), mean(dbeta), g)


def _sync_batch_norm_vjp(eps, axis_name, residuals, g):
    del eps
    xhat, inv, gamma = residuals
    dgamma, dbeta = normalization.batch_norm_gradient(xhat, g)
    return sync_batch_norm_backward(axis_name, xhat, inv, gamma, dgamma, dbeta, g), dgamma, dbeta


sync_batch_norm.defvjp(sync_batch_norm_forward, _sync_batch_norm_vjp)


def _sync_batch_norm_samples(key, dtype):
    k = keys(key)
    out = []
    for shape, label in (((_D, 3, 3), "3 rows per device"), ((_D, 1, 2, 2, 3), "NHWC, batch 1 per device")):
        c = shape[-1]
        gamma, beta = normal(next(k), (c,), dtype, 0.5) + 1, normal(next(k), (c,), dtype)
        out.append(Sample((normal(next(k), shape, dtype, 2.0), gamma, beta, 1e-5, devices.SAMPLE_AXIS), label))
    return out


def _local_statistics(vjp: VJP, args, g):
    """The backward's per-channel sums of each device's block alone, with the forward's x̂ and σ."""
    x, gamma, _, eps = args[:4]
    axes = tuple(range(jnp.ndim(x) - 1))  # the device axis and every block's own
    xhat = (x - jnp.mean(x, axis=axes, keepdims=True)) / jnp.sqrt(jnp.var(x, axis=axes, keepdims=True) + eps)
    inv = jnp.sqrt(jnp.var(x, axis=axes, keepdims=True) + eps)[0] ** -1
    dx = [
        normalization.batch_norm_backward(xhat[k], inv, gamma, *normalization.batch_norm_gradient(xhat[k], g[k]), g[k])
        for k in range(_D)
    ]
    yield (
        "the right one with each device's own ΣG and Σ G ⊙ x̂: the statistics' cotangents not all-reduced",
        jnp.stack(dx),
    )


register(
    Rule(
        name="sync_batch_norm",
        fn=sync_batch_norm,
        reference=sync_batch_norm_reference,
        sample_inputs=_sync_batch_norm_samples,
        differentiable=(0, 1, 2),
        seeds=_SEEDS,
        mistakes=(Mistake(0, _local_statistics),),
        split=(0,),
    )
)
