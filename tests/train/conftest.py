"""Fixtures of the training tests."""

import functools

import numpy as np
import pytest

from manualgrad.train import data

WORDS = 200


@pytest.fixture
def word_list(tmp_path, monkeypatch):
    """--dataset words reads a list of 200 made-up words of 2-9 letters the test writes in tmp_path."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters[: rng.integers(3, 8)], rng.integers(2, 10))) for _ in range(3 * WORDS)}
    path = tmp_path / "words.txt"
    path.write_text("\n".join(sorted(words)[:WORDS]) + "\n")
    monkeypatch.setattr(data, "words", functools.partial(data.words, path=path))
    return tmp_path
