"""``manualgrad train --model lstm`` and ``--model rnn``: the defaults, and a tiny run of each.

Every run here is a character model of width 8 (embedding 4) on 200 made-up words the test writes
(180 to train: 11 steps of 16 an epoch)."""

import math
import re

import pytest

from manualgrad import cli
from manualgrad.nn import recurrent
from manualgrad.train import progress
from manualgrad.train.config import Config, resolved


@pytest.fixture
def tiny(word_list, monkeypatch):
    """--dataset words reads a list of 200 words of 2-9 letters; the character models have width 8."""
    for kind in recurrent.KINDS:
        monkeypatch.setitem(recurrent.DEFAULTS, kind, recurrent.DEFAULTS[kind]._replace(width=8, embed=4))
    return word_list


@pytest.mark.parametrize("kind", recurrent.KINDS)
def test_defaults_are_the_tuned_ones(kind):
    config = resolved(Config(model=kind, dataset="words"))
    tuned = recurrent.DEFAULTS[kind]
    assert (config.optimizer, config.batch_size, config.learning_rate, config.clip, config.epochs) == (
        tuned.optimizer,
        tuned.batch_size,
        tuned.lr,
        tuned.clip,
        tuned.epochs,
    )
    assert resolved(Config(model=kind, dataset="words", clip=5.0, lr=1e-3)).clip == 5.0  # flags win


@pytest.mark.parametrize("kind", recurrent.KINDS)
def test_a_tiny_run_learns_samples_ten_words_and_its_gradient_is_jax_grads(tiny, capsys, kind):
    out = tiny / kind
    args = ["train", "--model", kind, "--dataset", "words", "--batch-size", "16", "--lr", "0.02", "--epochs", "2"]
    assert cli.main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = progress.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["test_loss"] < rows[0]["test_loss"] < math.log(27)  # below the uniform guess over 27 tokens
    samples = (out / "samples.txt").read_text().splitlines()
    assert len(samples) == 10 and all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples)
    error = float(re.search(r"max relative error (\S+)", printed).group(1))
    assert error < 1e-4  # float32 round-off of the hand BPTT against jax.grad of the reference's scan


def test_a_sequence_model_refuses_image_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--model", "lstm", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("manualgrad train: --model lstm is a sequence model and needs --dataset words or")
    assert list(tmp_path.iterdir()) == []
