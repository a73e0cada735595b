"""What ``manualgrad train`` and the command line say: one-line refusals in the flags' words (the
library's in its fields'), counts in the right number, progress where stderr is a log, and a
missing optional package named with the extra that installs it."""

import sys

import pytest

from manualgrad import cli, text
from manualgrad.train import config, data, errors, loop, progress

XOR = ("train", "--model", "mlp", "--dataset", "xor")
INSTALL = "pip install 'manualgrad[train]'"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "nope"], "manualgrad train: --model must be cnn, mlp, gpt, rnn or lstm, got 'nope'"),
        (["train", "--dtype", "float16"], "manualgrad train: --dtype must be float32 or float64, got 'float16'"),
        (["check", "--dtype", "half"], "manualgrad check: --dtype must be float32 or float64, got 'half'"),
        (["grade", "--format", "pdf"], "manualgrad grade: --format must be "),
        (["nope"], "manualgrad: command must be check, audit, "),
        (["train", "--lr", "fast"], "manualgrad train: --lr: invalid float value: 'fast'"),
    ],
)
def test_a_bad_command_line_is_one_line_without_the_usage_block(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(message) and "usage:" not in captured.err


def test_help_shows_rest_literals_plainly(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_the_library_speaks_of_fields_and_the_command_line_of_flags(tmp_path, capsys):
    bad = config.Config(model="mlp", dataset="xor", lr=float("nan"), batch_size=0, out=str(tmp_path))
    with pytest.raises(errors.ConfigError) as error:
        loop.train(bad)
    assert str(error.value) == "epochs and batch_size must be ≥ 1 and checkpoint_every ≥ 0 (got 10, 0, 0)"
    assert error.value.fields == ("epochs", "batch_size", "checkpoint_every")
    assert isinstance(error.value, ValueError) and isinstance(error.value, errors.ManualgradError)
    assert cli.main([*XOR, "--batch-size", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "manualgrad train: --epochs and --batch-size must be ≥ 1 and --checkpoint-every ≥ 0 (got 10, 0, 0)\n"
    )
    with pytest.raises(errors.ConfigError, match=r"^overwrite needs out; without out every run gets a new folder"):
        loop.train(config.Config(model="mlp", dataset="xor", overwrite=True))


def test_every_error_of_training_is_a_manualgrad_error_of_its_builtin_kind():
    from manualgrad.train import checkpoint, distributed

    for error, builtin in (
        (errors.TrainError, ValueError),
        (errors.ConfigError, ValueError),
        (errors.Diverged, RuntimeError),
        (errors.Interrupted, Exception),
        (data.DataError, ValueError),
        (checkpoint.CheckpointError, RuntimeError),
        (checkpoint.CheckpointMismatchError, RuntimeError),
        (distributed.DistributedError, ValueError),
    ):
        assert issubclass(error, errors.ManualgradError) and issubclass(error, builtin), error


def test_an_idx_folder_of_other_files_is_not_listed_name_by_name(tmp_path, capsys):
    for i in range(48):
        (tmp_path / f"unrelated-{i:02d}.txt").write_text("")
    assert cli.main([*XOR[:2], "mlp", "--dataset", f"idx:{tmp_path}", "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "expected train-images-idx3-ubyte[.gz]" in line
    assert line.endswith("found no IDX file among its 48 entries") and "unrelated-" not in line


def test_counts_are_in_the_right_number(tmp_path, capsys):
    assert cli.main([*XOR, "--epochs", "1", "--devices", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"after 1 epoch ({data.steps_per_epoch(800, 32)} steps on 1 device of 1 process)" in out
    assert "(s)" not in out and "(es)" not in out
    assert text.counted(1, "batch", "batches") == "1 batch" and text.counted(3, "batch", "batches") == "3 batches"


def test_a_log_that_is_not_a_terminal_gets_a_progress_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    assert cli.main([*XOR, "--epochs", "1", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    steps = data.steps_per_epoch(800, 32)
    assert lines and all(line.startswith("epoch 1/1: step ") for line in lines)
    assert lines[0].startswith(f"epoch 1/1: step 1 of {steps}, loss ") and " acc " in lines[0]


def test_a_log_line_waits_for_its_interval(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    shown = progress.progress(10, 0, "epoch 1/2")
    for second in (5, 10, 25, 30, 50):
        now[0] = second
        shown.step(0.5, 0.25)
    assert capsys.readouterr().err.splitlines() == [
        "epoch 1/2: step 3 of 10, loss 0.5000 acc 0.250",
        "epoch 1/2: step 5 of 10, loss 0.5000 acc 0.250",
    ]


@pytest.mark.parametrize(
    "blocked, argv, message",
    [
        (("matplotlib",), XOR, "plotting the curves needs matplotlib: " + INSTALL),
        (
            ("sklearn", "sklearn.datasets"),
            ("train",),
            "the digits data set needs sklearn: pip install 'manualgrad[train]'",
        ),
    ],
)
def test_a_missing_extra_is_named_in_one_line_before_anything_runs(
    tmp_path, capsys, monkeypatch, blocked, argv, message
):
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    assert cli.main([*argv, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"manualgrad train: {message}\n"
    assert list(tmp_path.iterdir()) == []
