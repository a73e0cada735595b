"""The models ``manualgrad bench`` measures, with their shapes and batch sizes, and their inputs.

The shapes are written here rather than read from ``manualgrad train``'s defaults, so that a
change of a training default does not silently change what a benchmark figure measures; a
model described as one of ``train``'s defaults is checked against it by the bench's tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad.errors import ManualgradError
from manualgrad.nn import gpt, layers, recurrent

LEARNING_RATE = 3e-3
KEY = np.zeros(2, np.uint32)  # dropout's key in every benchmarked step: PRNGKey(0)'s data, made without a JAX backend

WORDS_VOCAB, WORDS_LENGTH = 27, 23  # --dataset words: "." and a–z; the longest word, 22 letters, and its "."
GPT = {"width": 64, "depth": 2, "heads": 4}  # train's default GPT
GPT_BATCH = 64
LSTM = {"embed": 32, "width": 256}  # train's default character LSTM
LSTM_BATCH = 128
LONG = {"width": 64, "depth": 1, "heads": 4, "context": 512}  # gpt_long: one block, attention over 512 positions
LONG_BATCH = 8
LONG_2K = {**LONG, "context": 2048}  # gpt_2k: gpt_long's block, attention over 2048 positions
LONG_2K_BATCH = 2


class BenchError(ManualgradError, ValueError):
    """A model that ``manualgrad bench`` does not know or cannot build a peer of."""


class Model(NamedTuple):
    """A benchmarked model: a :mod:`manualgrad.nn.layers` network, its input shape (no batch) and batch size;
    for a sequence model (:mod:`manualgrad.nn.gpt`) ``vocab`` > 0, ``input_shape`` ``(T,)`` and its attention's
    ``heads``."""

    description: str
    build: Callable[[], layers.Layer]
    input_shape: tuple[int, ...]
    batch: int
    mlp: bool
    vocab: int = 0
    heads: int = 0

    @property
    def sequences(self) -> bool:
        return self.vocab > 0


MODELS: dict[str, Model] = {
    "digits_mlp": Model(
        "digits MLP 64-128-10 (train --model mlp), batch 32", lambda: layers.mlp(10, (128,)), (8, 8, 1), 32, True
    ),
    "mlp_1024": Model("MLP 784-1024-1024-10, batch 256", lambda: layers.mlp(10, (1024, 1024)), (784,), 256, True),
    "mlp_large": Model("MLP 2048-2048-2048-10, batch 1024", lambda: layers.mlp(10, (2048, 2048)), (2048,), 1024, True),
    "digits_cnn": Model(
        "digits CNN 8x8x1 (train's default cnn), batch 32", lambda: layers.cnn(10), (8, 8, 1), 32, False
    ),
    "cnn_28": Model(
        "CNN 28x28x1: conv3x3x32, conv3x3x64/2, dense 128, dense 10, batch 128",
        lambda: layers.cnn(10, (32, 64), 128),
        (28, 28, 1),
        128,
        False,
    ),
    "bn_cnn": Model(
        "cnn_28 with batch_norm after each conv and the dense 128 (train --norm batch; no bias before it), batch 128",
        lambda: layers.cnn(10, (32, 64), 128, norm=layers.BatchNorm()),
        (28, 28, 1),
        128,
        False,
    ),
    "gpt": Model(
        "the default GPT of train --model gpt --dataset words (width {width}, {depth} blocks, {heads} heads), ".format(
            **GPT
        )
        + f"T = {WORDS_LENGTH}, batch {GPT_BATCH}",
        lambda: gpt.gpt(WORDS_VOCAB, WORDS_LENGTH, **GPT),
        (WORDS_LENGTH,),
        GPT_BATCH,
        False,
        WORDS_VOCAB,
        GPT["heads"],
    ),
    "lstm": Model(
        "the default character LSTM of train --model lstm --dataset words (embedding {embed}, width {width}), ".format(
            **LSTM
        )
        + f"T = {WORDS_LENGTH}, batch {LSTM_BATCH}; jax_grad differentiates the reference's scan",
        lambda: recurrent.char_model("lstm", WORDS_VOCAB, **LSTM),
        (WORDS_LENGTH,),
        LSTM_BATCH,
        False,
        WORDS_VOCAB,
    ),
    "gpt_long": Model(
        f"a GPT of one block, width {LONG['width']}, {LONG['heads']} heads, T = S = {LONG['context']}, "
        f"vocabulary {WORDS_VOCAB}, batch {LONG_BATCH}",
        lambda: gpt.gpt(WORDS_VOCAB, **LONG),
        (LONG["context"],),
        LONG_BATCH,
        False,
        WORDS_VOCAB,
        LONG["heads"],
    ),
    "gpt_2k": Model(
        f"gpt_long's block at T = S = {LONG_2K['context']}, batch {LONG_2K_BATCH}",
        lambda: gpt.gpt(WORDS_VOCAB, **LONG_2K),
        (LONG_2K["context"],),
        LONG_2K_BATCH,
        False,
        WORDS_VOCAB,
        LONG_2K["heads"],
    ),
}


def inputs(model: Model, seed: int) -> tuple[Any, jax.Array, jax.Array]:
    """Parameters and a batch: images or features and labels below 10, or random token rows (``T + 1`` ids)
    with every target counted."""
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    _, params = model.build().init(kp, (-1, *model.input_shape))
    if model.sequences:
        (length,) = model.input_shape
        tokens = jax.random.randint(kx, (model.batch, length + 1), 0, model.vocab)
        return params, tokens, jnp.ones((model.batch, length), bool)
    x = jax.random.normal(kx, (model.batch, *model.input_shape), jnp.float32)
    return params, x, jax.random.randint(ky, (model.batch,), 0, 10)
