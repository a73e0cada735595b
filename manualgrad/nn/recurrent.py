"""The character model ``embedding → rnn | lstm → dense``.

A sequence model is a :class:`~manualgrad.nn.layers.Layer` whose ``apply(params, ids)`` maps
token ids ``(N, T)`` (int) to next-token logits ``(N, T, V)``: position ``t`` has read tokens
``0..t``. :func:`char_model` is one, built from the registered rules ``embedding``, ``rnn`` or
``lstm``, ``dense`` and ``bias_add`` (their references with ``reference=True``), the hidden
state starting at ``h0 = c0 = 0``; the training loop samples from it as from any sequence model
(one token at a time, the whole prefix recomputed at every step).

Initialisation follows PyTorch's ``torch.nn.Embedding``, ``RNN``/``LSTM`` and ``Linear``: the
table ``N(0, 1)``; every recurrent weight and bias, and the output layer's weights,
``U(−1/√H, 1/√H)``; but the output bias starts at 0, and the LSTM's forget-gate bias starts at 1 instead
(Jozefowicz, Zaremba and Sutskever, "An Empirical Exploration of Recurrent Network
Architectures", 2015): ``c_t`` then keeps most of ``c_{t−1}`` at first, and its gradient reaches
back through the forget-gate path from the first step.

:data:`DEFAULTS` are the sizes and the training settings that ``manualgrad train --model lstm
--dataset words`` (and ``--model rnn``) use: chosen to reach a test loss below 1.8 nats per
character for the LSTM and 2.0 for the RNN within minutes on a laptop's CPU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from manualgrad.nn.layers import Layer, LayerError, Shape, _rule

KINDS = ("rnn", "lstm")
BLOCKS = {"rnn": 1, "lstm": 4}  # blocks of H in w_x, w_h and b
FORGET_BIAS = 1.0


class Defaults(NamedTuple):
    """A character model's sizes and how ``manualgrad train`` trains it by default (global-norm clipping)."""

    width: int  # H, the hidden state
    embed: int  # E, the embedding's dimension
    optimizer: str  # adamw: linear warm-up, then a cosine decay to lr/10 over the run
    batch_size: int
    lr: float
    clip: float  # optax.clip_by_global_norm's bound
    epochs: int


DEFAULTS: dict[str, Defaults] = {
    "lstm": Defaults(width=256, embed=32, optimizer="adamw", batch_size=128, lr=4e-3, clip=1.0, epochs=5),
    "rnn": Defaults(width=256, embed=32, optimizer="adamw", batch_size=128, lr=3e-3, clip=1.0, epochs=4),
}


def _uniform(key: jax.Array, shape: Shape, bound: float, dtype: Any) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_params(key: jax.Array, kind: str, vocab: int, width: int, embed: int, dtype: Any = jnp.float32) -> dict:
    """``{"embedding": (V, E), "recurrent": {"w_x": (E, kH), "w_h": (H, kH), "b": (kH,)},
    "output": {"w": (H, V), "b": (V,)}}`` with ``k`` = 1 (rnn) or 4 (lstm), initialised as the module
    docstring says."""
    k = jax.random.split(key, 5)
    bound, blocks = width**-0.5, BLOCKS[kind] * width
    b = _uniform(k[3], (blocks,), bound, dtype)
    if kind == "lstm":
        b = b.at[width : 2 * width].set(FORGET_BIAS)  # the f block of (i, f, g, o)
    return {
        "embedding": jax.random.normal(k[0], (vocab, embed), dtype),
        "recurrent": {
            "w_x": _uniform(k[1], (embed, blocks), bound, dtype),
            "w_h": _uniform(k[2], (width, blocks), bound, dtype),
            "b": b,
        },
        "output": {"w": _uniform(k[4], (width, vocab), bound, dtype), "b": jnp.zeros((vocab,), dtype)},
    }


def char_model(
    kind: str, vocab: int, width: int | None = None, embed: int | None = None, dtype: Any = jnp.float32
) -> Layer:
    """``logits = dense(rnn|lstm(embedding(ids), 0), w) + b``: ids ``(N, T)`` → logits ``(N, T, vocab)``.

    ``kind`` is ``"rnn"`` (``h_t = tanh(x_t w_x + h_{t−1} w_h + b)``) or ``"lstm"`` (gates
    ``i, f, g, o``); ``width`` (``H``) and ``embed`` (``E``) default to :data:`DEFAULTS`. The
    layer has no state; ``train`` and ``key`` are ignored (no dropout).
    """
    if kind not in KINDS:
        raise LayerError(f"char_model: kind must be 'rnn' or 'lstm', got {kind!r}")
    width = DEFAULTS[kind].width if width is None else width
    embed = DEFAULTS[kind].embed if embed is None else embed
    for name, value in (("vocab", vocab), ("width", width), ("embed", embed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerError(f"char_model: {name} must be a positive int, got {value!r}")

    def init(key: jax.Array, input_shape: Shape) -> tuple[Shape, dict]:
        if len(input_shape) != 2:
            raise LayerError(f"char_model: input_shape must be (N, T) token ids, got {tuple(input_shape)}")
        return (*input_shape, vocab), init_params(key, kind, vocab, width, embed, dtype)

    def apply(params, ids, *, state=None, train=False, key=None, reference=False):
        del train, key
        if jnp.ndim(ids) != 2 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
            raise LayerError(
                f"char_model: ids must be integer token ids of shape (N, T), got {jnp.result_type(ids)} "
                f"{jnp.shape(ids)}"
            )
        x = _rule("embedding", reference)(ids, params["embedding"])
        zeros = jnp.zeros((jnp.shape(ids)[0], width), x.dtype)
        rec = params["recurrent"]
        initial = (zeros,) if kind == "rnn" else (zeros, zeros)
        h = _rule(kind, reference)(x, *initial, rec["w_x"], rec["w_h"], rec["b"])
        out = params["output"]
        logits = _rule("bias_add", reference)(_rule("dense", reference)(h, out["w"]), out["b"])
        return logits if state is None else (logits, state)

    return Layer(init, apply)
