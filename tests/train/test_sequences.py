"""``manualgrad train --model gpt``: sequence data, nats per character, samples, --clip, resume, refusals.

Every run here is the tiny GPT (width 16, 1 block, 2 heads) on 200 made-up words the test writes
(180 to train: 11 steps of 16 an epoch)."""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manualgrad import cli
from manualgrad.train import checkpoint, data, models, progress
from manualgrad.train import step as train_step


@pytest.fixture
def tiny(word_list, monkeypatch):
    """--dataset words reads a list of 200 words of 2-9 letters; --model gpt is the tiny GPT."""
    monkeypatch.setattr(models, "GPT", {"width": 16, "depth": 1, "heads": 2})
    return word_list


def _train(*args):
    return cli.main(["train", "--model", "gpt", "--dataset", "words", "--batch-size", "16", "--lr", "0.01", *args])


def _state(directory):
    path = checkpoint.checkpoints(directory)[-1]
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files if k != "__meta__"}, checkpoint.read_meta(path)["step"]


def test_gpt_trains_in_nats_per_character_and_samples_ten_words(tiny, capsys):
    out = tiny / "run"
    assert _train("--epochs", "2", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    rows = progress.read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and set(rows[0]) == set(progress.METRICS)
    assert rows[1]["test_loss"] < rows[0]["test_loss"] < math.log(27)  # below the uniform guess over 27 tokens
    assert 0 < rows[1]["test_accuracy"] < 1
    assert "test loss" in printed and "nats/char" in printed
    samples = (out / "samples.txt").read_text().splitlines()
    assert len(samples) == 10 and all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples)
    assert f"10 samples from the model: {' '.join(samples)}" in printed
    assert "max relative error" in printed


def test_autodiff_gives_the_same_losses_and_samples(tiny):
    runs = {grad: tiny / grad for grad in train_step.GRADS}
    for grad, out in runs.items():
        assert _train("--epochs", "2", "--grad", grad, "--out", str(out), "--cross-check-batches", "0") == 0
    manual, auto = (progress.read_metrics(out / "metrics.csv") for out in runs.values())
    for a, b in zip(manual, auto):
        for k in ("train_loss", "test_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5)  # float32 round-off (~1e-7 a step) over 22 steps


def test_resume_from_mid_epoch_is_bit_identical(tiny):
    whole, cut = tiny / "whole", tiny / "cut"
    assert _train("--epochs", "2", "--checkpoint-every", "4", "--clip", "1", "--out", str(whole)) == 0
    shutil.copytree(whole, cut)
    checkpoint.checkpoints(cut)[-1].unlink()  # the end's: back to the one of step 20, in epoch 2
    assert checkpoint.read_meta(checkpoint.checkpoints(cut)[-1])["step"] == 20
    assert _train("--epochs", "2", "--checkpoint-every", "4", "--clip", "1", "--resume", str(cut)) == 0
    (received, step), (expected, whole_step) = _state(cut), _state(whole)
    assert step == whole_step == 22
    assert received.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(received[k], expected[k], err_msg=k)
    assert progress.read_metrics(cut / "metrics.csv") == progress.read_metrics(whole / "metrics.csv")
    assert (cut / "samples.txt").read_text() == (whole / "samples.txt").read_text()


def test_resume_refuses_another_schedule_or_clip(tiny, capsys):
    out = tiny / "run"
    assert _train("--epochs", "2", "--clip", "1", "--out", str(out), "--cross-check-batches", "0") == 0
    capsys.readouterr()
    for args, message in (
        (("--epochs", "3", "--clip", "1"), "trained with --epochs 2, this command asks for --epochs 3"),  # the schedule
        (("--epochs", "2", "--clip", "2"), "it was trained with --clip 1, this command asks for --clip 2"),
    ):
        assert _train(*args, "--resume", str(out)) == 2
        err = capsys.readouterr().err
        assert "holds another run" in err and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "gpt", "--dataset", "digits"), "--model gpt is a sequence model and needs --dataset words or"),
        (
            ("--model", "cnn", "--dataset", "words"),
            "--dataset words is token sequences for a sequence model (gpt, rnn or lstm)",
        ),
        (("--model", "gpt", "--dataset", "words", "--norm", "layer"), "--norm and --dropout act on the hidden"),
        (("--model", "gpt", "--dataset", "words", "--dropout", "0.1"), "--norm and --dropout act on the hidden"),
        (
            ("--model", "lstm", "--dataset", "words", "--dropout", "0.2"),
            "--norm and --dropout act on the hidden layers of cnn and mlp; --model lstm takes neither: drop them",
        ),
        (("--model", "mlp", "--dataset", "xor", "--clip", "0"), "--clip must be a finite number > 0"),
        (("--model", "mlp", "--dataset", "xor", "--clip", "nan"), "--clip must be a finite number > 0"),
    ],
)
def test_bad_combinations_exit_2_in_one_sentence_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manualgrad train: {message}") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_clip_scales_the_gradient_for_every_optimizer():
    grads = {"w": jnp.array([3.0, 4.0])}  # global norm 5
    for name in train_step.OPTIMIZERS:
        if name in train_step.SCHEDULED:
            continue  # its first step's rate is 0 (warm-up); the chain is the same code
        clipped = train_step.optimizer(name, 1.0, clip=0.5)
        updates, _ = clipped.update(grads, clipped.init(grads), grads)
        plain = train_step.optimizer(name, 1.0)
        expected, _ = plain.update({"w": grads["w"] / 10}, plain.init(grads), grads)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6, err_msg=name)


def test_evaluation_weighs_every_counted_target_alike_and_cropping_keeps_the_loss(tiny):
    sequences = data.load_sequences("words")
    net = models.transformer(sequences, jnp.float32, **models.GPT)
    params = net.init(jax.random.PRNGKey(0), (-1, sequences.length))[1]
    loss = train_step.loss_fn(net, "manual", sequences=True)
    x, y = sequences.tokens_test, sequences.mask_test
    whole = train_step.evaluate(loss, params, (), x, y, len(x), sequences=True)
    assert train_step.evaluate(loss, params, (), x, y, 3, sequences=True) == pytest.approx(whole, rel=1e-6)
    assert train_step.cropped(x, y)[1].shape == y.shape  # L = 10 (9 letters and "."): no multiple of 8 below it
    short = y.sum(axis=1) <= 8  # words of up to 7 letters: 8 counted targets at most
    xs, ys = train_step.cropped(x[short], y[short])
    assert ys.shape == (short.sum(), 8) and xs.shape == (short.sum(), 9)
    assert float(loss(params, (), xs, ys)[0]) == pytest.approx(float(loss(params, (), x[short], y[short])[0]), rel=1e-6)
