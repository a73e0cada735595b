"""A decoder-only transformer (GPT) on the hand rules, and the loss of every sequence model.

The sequence-model interface: a :class:`~manualgrad.nn.layers.Layer` whose
``apply(params, ids, *, state, train, key, reference)`` maps token ids ``(N, T)`` (integers) to
logits ``(N, T, V)``, the logits at position ``t`` predicting token ``t + 1`` from tokens
``0..t`` alone. :func:`sequence_loss` trains any such model (the GPT here, a recurrent network)
on the rows of :class:`manualgrad.train.data.Sequences`; :func:`sample` draws from it.

The GPT (Radford et al.'s GPT-2 layout, pre-LN)::

    x = embedding(ids, E_tok) + embedding(t, E_pos)
    per block:  x = x + attention(LN(x) W_q, LN(x) W_k, LN(x) W_v, causal) W_o
                x = x + gelu(LN(x) W_1) W_2
    logits = LN(x) W_head

every ``+`` the rule ``add``, every ``W`` the rules ``dense`` and ``bias_add``, ``LN`` the rule
``layer_norm``; the only plain ``jnp`` is the reshape of ``(N, T, D)`` into heads ``(N, T, n, D/n)``
and back. With ``reference=True`` every rule is replaced by its plain-``jnp`` reference, so
``jax.grad`` is JAX's autodiff of the same model.

The key projection ``W_k`` has no bias: a bias ``b`` would add ``q_t · b`` to every score of row ``t``,
which the softmax cancels, so its gradient is exactly 0 (and in float32 round-off alone).

Initialisation (GPT-2's): every weight ``N(0, 0.02²)``, the two projections into the residual
stream (``W_o``, ``W_2``) ``N(0, (0.02/√(2·depth))²)`` so that the stream's variance does not grow
with depth, biases 0, ``γ = 1``, ``β = 0``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from manualgrad.nn.layers import Layer, LayerError, Shape, _plus_bias, _rule, _stateless

INIT_STD = 0.02


def _linear(
    key: jax.Array, fan_in: int, fan_out: int, std: float, dtype: Any, bias: bool = True
) -> dict[str, jax.Array]:
    w = std * jax.random.normal(key, (fan_in, fan_out), dtype)
    return {"w": w, "b": jnp.zeros((fan_out,), dtype)} if bias else {"w": w}


def _norm(width: int, dtype: Any) -> dict[str, jax.Array]:
    return {"gamma": jnp.ones((width,), dtype), "beta": jnp.zeros((width,), dtype)}


def _block_params(key: jax.Array, width: int, depth: int, dtype: Any) -> dict[str, Any]:
    kq, kk, kv, ko, k1, k2 = jax.random.split(key, 6)
    residual = INIT_STD / (2 * depth) ** 0.5
    return {
        "ln1": _norm(width, dtype),
        "q": _linear(kq, width, width, INIT_STD, dtype),
        "k": _linear(kk, width, width, INIT_STD, dtype, bias=False),
        "v": _linear(kv, width, width, INIT_STD, dtype),
        "o": _linear(ko, width, width, residual, dtype),
        "ln2": _norm(width, dtype),
        "fc": _linear(k1, width, 4 * width, INIT_STD, dtype),
        "proj": _linear(k2, 4 * width, width, residual, dtype),
    }


def gpt(vocab: int, context: int, width: int = 64, depth: int = 2, heads: int = 4, dtype: Any = jnp.float32) -> Layer:
    """The GPT of the module docstring for ``vocab`` tokens and sequences of at most ``context``.

    ``init(key, (N, T))`` with ``T ≤ context``; ``width`` must be a multiple of ``heads``.
    """
    for name, value in (("vocab", vocab), ("context", context), ("width", width), ("depth", depth), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerError(f"gpt: {name} must be a positive int, got {value!r}")
    if width % heads:
        raise LayerError(f"gpt: width {width} must be a multiple of heads {heads} (head size width/heads)")

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, Any]:
        if len(input_shape) != 2 or input_shape[1] > context:
            raise LayerError(f"gpt: input must be token ids (N, T) with T ≤ {context}, got shape {tuple(input_shape)}")
        k_tok, k_pos, k_head, *k_blocks = jax.random.split(key, 3 + depth)
        params = {
            "tokens": INIT_STD * jax.random.normal(k_tok, (vocab, width), dtype),
            "positions": INIT_STD * jax.random.normal(k_pos, (context, width), dtype),
            "blocks": [_block_params(k, width, depth, dtype) for k in k_blocks],
            "ln_f": _norm(width, dtype),
            "head": _linear(k_head, width, vocab, INIT_STD, dtype),
        }
        return (*input_shape, vocab), params

    def forward(params: Any, ids: jax.Array, reference: bool) -> jax.Array:
        _check_ids(ids, context)
        rule = lambda name: _rule(name, reference)  # noqa: E731
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = rule("add")(rule("embedding")(ids, params["tokens"]), rule("embedding")(positions, params["positions"]))
        for block in params["blocks"]:
            x = rule("add")(x, _attention(block, rule("layer_norm")(x, **block["ln1"]), heads, reference))
            hidden = rule("gelu")(_affine(block["fc"], rule("layer_norm")(x, **block["ln2"]), reference))
            x = rule("add")(x, _affine(block["proj"], hidden, reference))
        return _affine(params["head"], rule("layer_norm")(x, **params["ln_f"]), reference)

    return Layer(init, _stateless(forward))


def _check_ids(ids: jax.Array, context: int) -> None:
    if jnp.ndim(ids) != 2 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise LayerError(
            f"gpt: ids must be integer token ids of shape (N, T), got {jnp.result_type(ids)} {jnp.shape(ids)}"
        )
    if ids.shape[1] > context:
        raise LayerError(f"gpt: sequences of at most {context} tokens (its context), got T = {ids.shape[1]}")


def _affine(params: dict[str, jax.Array], x: jax.Array, reference: bool) -> jax.Array:
    return _plus_bias(_rule("dense", reference)(x, params["w"]), params, reference)


def _attention(block: dict[str, Any], x: jax.Array, heads: int, reference: bool) -> jax.Array:
    """``attention(x W_q, x W_k, x W_v, causal) W_o`` with ``heads`` heads: ``(N, T, D)`` as ``(N, T, n, D/n)``."""
    n, t, d = x.shape
    q, k, v = (_affine(block[name], x, reference).reshape(n, t, heads, d // heads) for name in "qkv")
    return _affine(block["o"], _rule("attention", reference)(q, k, v, True).reshape(n, t, d), reference)


def sequence_loss(
    model: Layer, params: Any, tokens: jax.Array, mask: jax.Array, *, reference: bool = False, **keywords: Any
) -> tuple[jax.Array, jax.Array]:
    """The masked mean cross-entropy of next-token prediction, in nats per token, and the number of
    counted targets predicted right.

    ``tokens`` ``(N, T + 1)``, ``mask`` bool ``(N, T)``; with ``ids = tokens[:, :-1]``,
    ``y = tokens[:, 1:]`` and ``ℓ = log_softmax(model(ids))`` (the rule):
    ``L = −Σ_{n,t} m_{nt} ℓ_{nt, y_{nt}} / Σ m``. The selection of ``ℓ_{nt, y_{nt}}`` and the masked
    mean are one linear map with constant weights ``m_{nt}·onehot(y_{nt})/Σ m`` (plain ``jnp``).
    ``keywords`` (``state``, ``train``, ``key``) go to ``model.apply``.
    """
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model.apply(params, ids, reference=reference, **keywords)
    log_p = _rule("log_softmax", reference)(logits, -1)
    mask = mask.astype(log_p.dtype)
    weights = jax.nn.one_hot(targets, log_p.shape[-1], dtype=log_p.dtype) * (mask / jnp.sum(mask))[..., None]
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
    return -jnp.sum(weights * log_p), correct


def sample(
    model: Layer, params: Any, key: jax.Array, count: int, length: int, start: int, stop: int | None = None
) -> jax.Array:
    """``count`` sequences of ``length`` tokens after the token ``start``, each drawn from the model's
    softmax at the position before it; ``(count, length + 1)`` ids, ``start`` first. Once ``stop`` is
    drawn a row is only ``stop`` after it (the decoding cuts there)."""

    def draw(t, carry):
        ids, key = carry
        key, sub = jax.random.split(key)
        logits = model.apply(params, ids[:, :-1])[:, t]
        token = jax.random.categorical(sub, logits).astype(ids.dtype)
        if stop is not None:
            token = jnp.where((t > 0) & (ids[:, t] == stop), stop, token)
        return ids.at[:, t + 1].set(token), key

    return jax.lax.fori_loop(0, length, draw, (jnp.full((count, length + 1), start, jnp.int32), key))[0]
