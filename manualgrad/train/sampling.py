"""Text drawn from a trained sequence model, written beside the run's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from manualgrad.nn import gpt, layers
from manualgrad.train import data
from manualgrad.train import distributed as multiprocess

SAMPLES = 10
_SAMPLE_STREAM = 2  # fold_in(PRNGKey(seed), 2): the samples' key, apart from the initialisation's and dropout's


def write_samples(net: layers.Layer, params: Any, sequences: data.Sequences, seed: int, path: Path) -> list[str]:
    """:data:`SAMPLES` sequences drawn from the trained model ``net`` (seeded by ``seed``), one a line in
    ``path`` (written by the writing process).

    Words start after the boundary token and end at the next one (or after ``L`` characters); a text's
    samples are ``L`` characters after the first character of the training text.
    """
    boundary = sequences.boundary
    start = sequences.vocab.index(boundary) if boundary is not None else int(sequences.tokens_train[0, 0])
    stop = None if boundary is None else start
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLE_STREAM)
    ids = np.asarray(gpt.sample(net, params, key, SAMPLES, sequences.length, start, stop))
    texts = [sequences.decode(row[1:]) for row in ids]
    if boundary is not None:
        texts = [t.split(boundary)[0] for t in texts]
    if multiprocess.is_writer():
        path.write_text("".join(f"{t}\n" for t in texts))
    return texts
