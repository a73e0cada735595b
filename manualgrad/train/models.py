"""The ready-made models of ``manualgrad train``, by name, for a data set.

Each builder takes the data set (its classes, input shape or vocabulary), the dtype and what
goes inside the hidden layers (a normalisation layer, a dropout rate); the sizes of the GPT are
:data:`GPT`, and those of the recurrent models :data:`manualgrad.nn.recurrent.DEFAULTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from manualgrad.nn import gpt, layers, recurrent
from manualgrad.text import either
from manualgrad.train import data
from manualgrad.train.errors import ConfigError

DEFAULT_GROUPS = 4  # group norm's groups: divides every width of the ready-made models
GPT = {"width": 64, "depth": 2, "heads": 4}  # the ready-made GPT's shape

# norm name -> (groups, dtype) -> the layer after every hidden convolution and dense layer (None: none).
NORMS: dict[str, Callable[[int, Any], layers.Layer | None]] = {
    "none": lambda groups, dtype: None,
    "batch": lambda groups, dtype: layers.BatchNorm(dtype=dtype),
    "layer": lambda groups, dtype: layers.LayerNorm(dtype=dtype),
    "group": lambda groups, dtype: layers.GroupNorm(groups, dtype=dtype),
    "rms": lambda groups, dtype: layers.RMSNorm(dtype=dtype),
}
Builder = Callable[[Any, Any, "layers.Layer | None", float], layers.Layer]  # (dataset, dtype, norm, dropout)


def cnn(dataset: data.Dataset, dtype: Any, norm: layers.Layer | None = None, dropout: float = 0.0) -> layers.Layer:
    """:func:`~manualgrad.nn.layers.cnn` for the image classes of ``dataset``."""
    if not dataset.is_image:
        raise ConfigError(
            "{model} cnn needs images (N, H, W, C); dataset {name} has inputs of shape {shape}: use {model} mlp",
            name=dataset.name,
            shape=dataset.input_shape,
        )
    return layers.cnn(dataset.classes, dtype=dtype, norm=norm, dropout=dropout)


def mlp(dataset: data.Dataset, dtype: Any, norm: layers.Layer | None = None, dropout: float = 0.0) -> layers.Layer:
    """:func:`~manualgrad.nn.layers.mlp`: one hidden layer of 128 for images, two of 32 for features."""
    hidden = (128,) if dataset.is_image else (32, 32)
    return layers.mlp(dataset.classes, hidden, dtype, norm=norm, dropout=dropout)


def transformer(sequences: data.Sequences, dtype: Any, *, width: int, depth: int, heads: int) -> layers.Layer:
    """:func:`~manualgrad.nn.gpt.gpt` of ``width``, ``depth`` blocks and ``heads`` over ``sequences``'s vocabulary."""
    return gpt.gpt(len(sequences.vocab), sequences.length, dtype=dtype, width=width, depth=depth, heads=heads)


def _char_model(kind: str) -> Builder:
    """``embedding → kind → dense`` of :data:`manualgrad.nn.recurrent.DEFAULTS`'s sizes for ``sequences``."""
    return lambda sequences, dtype, norm, dropout: recurrent.char_model(kind, len(sequences.vocab), dtype=dtype)


# Sequence models map token ids (N, T) to logits (N, T, V) (manualgrad.nn.gpt's interface) and
# train on data.Sequences; a model named here gets that training path.
SEQUENCE_MODELS: dict[str, Builder] = {
    "gpt": lambda sequences, dtype, norm, dropout: transformer(sequences, dtype, **GPT),
    **{kind: _char_model(kind) for kind in recurrent.KINDS},
}
MODELS: dict[str, Builder] = {"cnn": cnn, "mlp": mlp, **SEQUENCE_MODELS}


def model(
    name: str,
    dataset: data.Dataset | data.Sequences,
    dtype: Any,
    *,
    norm: str = "none",
    groups: int | None = None,
    dropout: float = 0.0,
) -> layers.Layer:
    """The ready-made model ``name`` (:data:`MODELS`) for ``dataset``, with the normalisation ``norm``
    (:data:`NORMS`; ``groups`` for ``group``, :data:`DEFAULT_GROUPS` if ``None``) and ``dropout``."""
    if name not in MODELS:
        raise ConfigError("{model} must be " + either(tuple(MODELS)) + ", got {got!r}", got=name)
    if norm not in NORMS:
        raise ConfigError("{norm} must be " + either(tuple(NORMS)) + ", got {got!r}", got=norm)
    layer = NORMS[norm](DEFAULT_GROUPS if groups is None else groups, dtype)
    return MODELS[name](dataset, dtype, layer, dropout)
