"""``manualgrad train``: layers, the jitted step on hand rules, checkpoints that survive SIGKILL, many devices."""

import dataclasses
import functools
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manualgrad.nn import layers
from manualgrad.rules import activations
from manualgrad.rules.convolution import conv2d
from manualgrad.train import checkpoint, data, errors, idx_format, loop, models, progress, runs, step
from manualgrad.train.config import ADDED_LATER, Config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _batch(shape=(16, 8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32), rng.integers(0, classes, shape[0]).astype(np.int32)


def _relative(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in pairs)


def test_layers_init_shapes_and_plain_pytrees():
    net = layers.serial(
        layers.Conv2D(4, (3, 3), padding="SAME"),
        layers.Relu,
        layers.MaxPool2D(2),
        layers.Conv2D(6, (3, 3), stride=2),
        layers.Tanh,
        layers.AvgPool2D(1),
        layers.Flatten,
        layers.Dense(5),
        layers.Sigmoid,
    )
    out_shape, params = net.init(jax.random.PRNGKey(0), (-1, 16, 16, 3))
    assert out_shape == (-1, 5)
    assert [jax.tree_util.tree_map(jnp.shape, p) for p in params] == [
        {"w": (3, 3, 3, 4), "b": (4,)},
        (),
        (),
        {"w": (3, 3, 4, 6), "b": (6,)},
        (),
        (),
        (),
        {"w": (54, 5), "b": (5,)},
        (),
    ]
    x = jnp.ones((2, 16, 16, 3), jnp.float32)
    assert net.apply(params, x).shape == (2, 5)
    opt_state = optax.adam(1e-3).init(params)  # optax takes the params as they are
    assert jax.tree_util.tree_structure(
        optax.adam(1e-3).update(params, opt_state, params)[0]
    ) == jax.tree_util.tree_structure(params)
    conv1d = layers.serial(layers.Conv1D(3, 3), layers.LeakyRelu(0.1), layers.Softplus, layers.Identity)
    assert conv1d.init(jax.random.PRNGKey(1), (-1, 10, 2))[0] == (-1, 8, 3)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_model_gradient_is_the_hand_rules_and_matches_jax_grad(name):
    x, y = _batch()
    net = layers.cnn(10) if name == "cnn" else layers.mlp(10)
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 1))
    manual = jax.grad(lambda p: layers.classifier_loss(net, p, x, y)[0])(params)
    auto = jax.grad(lambda p: layers.classifier_loss(net, p, x, y, reference=True)[0])(params)
    assert _relative(manual, auto) <= 1e-5  # float32: different summation order, a few ulps


@pytest.mark.parametrize(
    "leaf, finite",
    [
        (jnp.array([1.0, -2.0]), True),
        (jnp.array([3e38, -3e38, 3e38]), True),  # finite, though their sum overflows
        (jnp.array(7, jnp.int32), True),  # optax's step count
        (jnp.zeros((0, 3)), True),
        (jnp.array([1.0, jnp.inf]), False),
        (jnp.array([-jnp.inf]), False),
        (jnp.array([0.0, jnp.nan]), False),
        (jnp.array([1.0, jnp.inf], jnp.bfloat16), False),
    ],
)
def test_the_step_s_finiteness_test_flags_exactly_a_non_finite_entry(leaf, finite):
    tree = {"w": jnp.ones((2, 3)), "count": jnp.array(1, jnp.int32), "leaf": leaf}
    assert bool(jax.jit(step._all_finite)(tree)) is finite


def _entry(hlo: str) -> str:
    """The program's top-level computation: a library's fusion holds its convolution inside."""
    return hlo[hlo.index("\nENTRY") :]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's options: the step runs on another backend")
def test_the_step_compiles_its_convolutions_with_xla_s_own_emitter_on_cpu():
    """:data:`step.CPU_COMPILER_OPTIONS` take effect in the compiled step: its convolutions are XLA
    ``convolution`` instructions, not YNNPACK fusions, while a plain ``jax.jit`` keeps XLA's default."""
    assert step.compiler_options("cpu") == step.CPU_COMPILER_OPTIONS and step.compiler_options("gpu") == {}
    net = layers.cnn(10)
    _, params = net.init(jax.random.PRNGKey(0), (-1, 28, 28, 1))
    x, y = jnp.zeros((128, 28, 28, 1), jnp.float32), jnp.zeros((128,), jnp.int32)
    tx = optax.adam(1e-3)
    step_fn = step.make_step(step.loss_fn(net, "manual"), tx)
    compiled = step_fn.lower(params, tx.init(params), net.init_state(params), x, y, step.step_keys(0, [0])[0])
    compiled = compiled.compile()
    text = _entry(compiled.as_text())
    assert text.count(" convolution(") == 2  # the two layers' forward C; both adjoints are products
    plain = jax.jit(functools.partial(conv2d, stride=2, padding="SAME"))
    h, w = jnp.zeros((128, 28, 28, 32), jnp.float32), jnp.zeros((3, 3, 32, 64), jnp.float32)
    default = _entry(plain.lower(h, w).compile().as_text())
    assert " convolution(" not in default and "__ynn_fusion" in default


def test_training_step_runs_the_registered_backward():
    """Planting a wrong ReLU backward changes the manual step and leaves the autodiff step bit-identical."""
    x, y = _batch()
    net = layers.cnn(10)
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 1))
    tx = optax.sgd(0.1)

    def one_step(grad):
        step_fn = step.make_step(step.loss_fn(net, grad), tx)
        p = jax.tree_util.tree_map(jnp.copy, params)
        return step_fn(p, tx.init(p), net.init_state(p), x, y, step.step_keys(0, [0])[0])[0]

    before = {grad: one_step(grad) for grad in ("manual", "autodiff")}
    activations.relu.defvjp(activations.relu_forward, lambda f, g: (2 * g,))  # forgets the mask, doubles
    try:
        after = {grad: one_step(grad) for grad in ("manual", "autodiff")}
    finally:
        activations.relu.defvjp(activations.relu_forward, activations._relu_vjp)
    assert _relative(after["manual"], before["manual"]) > 1e-2
    for a, b in zip(jax.tree_util.tree_leaves(after["autodiff"]), jax.tree_util.tree_leaves(before["autodiff"])):
        np.testing.assert_array_equal(a, b)
    restored = one_step("manual")
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(before["manual"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_default_digits_cnn_reaches_97_percent(tmp_path, norm):
    summary = loop.train(Config(norm=norm, out=str(tmp_path)))
    assert summary["test_accuracy"] >= 0.97
    assert summary["cross_check_max_relative_error"] <= 1e-4  # float32 gradients of a trained net
    rows = progress.read_metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert set(rows[0]) == set(progress.METRICS)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_manual_and_autodiff_runs_agree(tmp_path):
    """Same seed, 3 epochs: every metric of --grad manual within float32 round-off of --grad autodiff."""
    import runpy

    differences = runpy.run_path(str(ROOT / "comparisons" / "manual_vs_autodiff.py"))["main"](3, "mlp", tmp_path)
    assert len(differences) == 3
    # Round-off (~1e-7 per step) compounds over ~130 Adam steps; 1e-4 is far below any real
    # difference (a wrong rule moves the loss by percent, see the test above).
    assert max(max(row.values()) for row in differences) <= 1e-4
    assert (tmp_path / "manual_vs_autodiff.png").exists()


def _cli(*args):
    return [sys.executable, "-m", "manualgrad", "train", *args]


XOR = ("--model", "mlp", "--dataset", "xor")
LONG = (*XOR, "--epochs", "40", "--checkpoint-every", "7")  # 1000 steps: long enough to be stopped mid-run
LONG_TOTAL = 40 * data.steps_per_epoch(800, 32)


def _final_params(directory):
    net = layers.mlp(2, hidden=(32, 32))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 2))
    template = {"params": params, "opt_state": optax.adam(3e-3).init(params)}
    state, meta, warnings = checkpoint.latest(directory, template)
    return state["params"], meta, warnings


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run from start to end, for the stopped-and-resumed runs to be compared with."""
    whole = tmp_path_factory.mktemp("whole")
    subprocess.run(_cli(*LONG, "--out", str(whole)), check=True, capture_output=True)
    return whole


def _start_then(signal_number, out, checkpoints=1):
    """Starts the LONG run in ``out``, sends ``signal_number`` once ``checkpoints`` checkpoints exist."""
    process = subprocess.Popen(
        _cli(*LONG, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while len(checkpoint.checkpoints(out)) < checkpoints and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate()
    return process.returncode, stdout, stderr


def _assert_same_run(received_dir, expected_dir):
    expected, meta_whole, _ = _final_params(expected_dir)
    received, meta_cut, _ = _final_params(received_dir)
    assert meta_cut["step"] == meta_whole["step"] == LONG_TOTAL
    for a, b in zip(jax.tree_util.tree_leaves(received), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert progress.read_metrics(received_dir / "metrics.csv") == progress.read_metrics(expected_dir / "metrics.csv")


def test_sigkill_then_resume_is_bit_identical_and_skips_a_damaged_checkpoint(tmp_path, uninterrupted):
    cut = tmp_path / "cut"
    _start_then(signal.SIGKILL, cut, checkpoints=2)
    killed_at = _final_params(cut)[1]["step"]
    assert 0 < killed_at < LONG_TOTAL, "the run finished before it could be killed"

    # Damage the newest checkpoint too: resume must say so and fall back to the one before.
    before, newest = checkpoint.checkpoints(cut)[-2:]
    fallback = checkpoint.read_meta(before)["step"]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = subprocess.run(_cli(*LONG, "--out", str(cut), "--resume", str(cut)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{newest} is truncated or corrupt" in resumed.stderr
    assert f"skipped it and loaded {before.name} instead" in resumed.stderr
    assert f"resuming from step {fallback} (epoch {fallback // 25 + 1})" in resumed.stdout
    _assert_same_run(cut, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_ends_the_same(tmp_path, uninterrupted):
    cut = tmp_path / "cut"
    returncode, _, stderr = _start_then(signal.SIGINT, cut)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "interrupted" in line]
    step = _final_params(cut)[1]["step"]
    assert 0 < step < LONG_TOTAL, "the run finished before it could be interrupted"
    saved = cut / f"checkpoint-{step:08d}.npz"
    assert line.startswith(
        f"manualgrad train: interrupted at step {step}; checkpoint saved to {saved}; resume with --resume {cut}"
    )
    resumed = subprocess.run(_cli(*LONG, "--resume", str(cut)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} (epoch {step // 25 + 1})" in resumed.stdout
    _assert_same_run(cut, uninterrupted)


def _train(*args):
    from manualgrad import cli

    return cli.main(["train", *XOR, *args])


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_out_holding_a_run_is_refused_untouched_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train("--epochs", "2", "--out", str(out)) == 0
    before = _snapshot(out)
    assert {"metrics.csv", "curves.png", "checkpoint-00000050.npz"} <= set(before)
    capsys.readouterr()
    assert _train("--epochs", "1", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manualgrad train: --out {out} already holds a run (metrics.csv, curves.png, checkpoint-")
    assert f"--resume {out}" in err and "--overwrite" in err
    assert _snapshot(out) == before

    assert _train("--epochs", "1", "--out", str(out), "--overwrite") == 0
    out_text = capsys.readouterr().out
    # the old run's later checkpoint is gone, and the one reported written is this run's
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-00000025.npz"]
    assert f"wrote {out / 'metrics.csv'}, {out / 'curves.png'}, {out / 'checkpoint-00000025.npz'}" in out_text
    assert len(progress.read_metrics(out / "metrics.csv")) == 1


def test_without_out_every_run_gets_a_folder_and_latest_names_the_newest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folders = []
    for _ in range(2):
        assert _train("--epochs", "1") == 0
        lines = capsys.readouterr().out.splitlines()
        folder = pathlib.Path(lines[0].split()[2])
        assert lines[0] == f"run folder {folder} (runs/latest names it)"
        assert folder.parent == pathlib.Path("runs") and (folder / "metrics.csv").is_file()
        assert f"runs/latest names {folder}" in lines[-1]
        folders.append(folder)
    assert folders[0] != folders[1]
    assert sorted(p.name for p in pathlib.Path("runs").iterdir()) == sorted(
        [folders[0].name, folders[1].name, "latest"]
    )
    assert os.readlink("runs/latest") == folders[1].name
    assert checkpoint.checkpoints(folders[0]) and checkpoint.checkpoints(folders[1])


def test_run_folders_never_collide_and_latest_falls_back_to_a_text_file(tmp_path, monkeypatch):
    import datetime

    now = datetime.datetime(2026, 12, 1, 8, 42, 11)
    names = [runs.new_run_folder(tmp_path, now).name for _ in range(3)]
    assert names == ["2026-12-01T08-42-11", "2026-12-01T08-42-11-2", "2026-12-01T08-42-11-3"]
    assert runs.point_latest(tmp_path / names[0]) is None
    assert runs.followed(tmp_path / "latest") == tmp_path / names[0]

    def no_symlinks(*args, **kwargs):
        raise OSError("symbolic links are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    assert runs.point_latest(tmp_path / names[2]) is None
    assert (tmp_path / "latest").read_text() == names[2] + "\n" and not (tmp_path / "latest").is_symlink()
    assert runs.followed(tmp_path / "latest") == tmp_path / names[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "latest"])  # no temporary left


def test_a_latest_folder_of_an_older_version_is_left_alone(tmp_path):
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "metrics.csv").write_text("old run")
    warning = runs.point_latest(runs.new_run_folder(tmp_path, None))
    assert warning.startswith(f"{tmp_path / 'latest'} is a folder of its own")
    assert (tmp_path / "latest" / "metrics.csv").read_text() == "old run"


def test_resume_continues_in_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert _train("--epochs", "1", "--out", str(run)) == 0
    capsys.readouterr()
    assert _train("--epochs", "2", "--resume", str(run), "--lr", "0.003") == 0  # adam's default, now explicit
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"resuming from step 25 (epoch 2) in {run}"
    assert [r["epoch"] for r in progress.read_metrics(run / "metrics.csv")] == [1, 2]
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-00000025.npz", "checkpoint-00000050.npz"]
    assert not (tmp_path / "runs").exists()

    assert _train("--epochs", "3", "--out", str(tmp_path / "elsewhere"), "--resume", str(run)) == 2
    assert capsys.readouterr().err == (
        f"manualgrad train: --resume {run} continues the run in {run}, but --out {tmp_path / 'elsewhere'} names "
        f"another folder: drop --out (or give --out {run})\n"
    )
    assert not (tmp_path / "elsewhere").exists()
    assert _train("--epochs", "2", "--resume", str(run), "--overwrite") == 2
    assert "--overwrite and --resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A one-epoch xor run that the tests below try to resume with other arguments (and never change)."""
    run = tmp_path_factory.mktemp("one_epoch")
    assert _train("--epochs", "1", "--out", str(run)) == 0
    return run


@pytest.mark.parametrize(
    "args, saved, asked",
    [
        (("--lr", "0.5"), "--lr 0.003", "--lr 0.5"),
        (("--optimizer", "sgd"), "--optimizer adam --lr 0.003", "--optimizer sgd --lr 0.1"),
        (("--seed", "1", "--batch-size", "16"), "--batch-size 32 --seed 0", "--batch-size 16 --seed 1"),
        (("--model", "cnn"), "--model mlp", "--model cnn"),  # not the leaves' paths, not "needs images"
        (("--norm", "batch"), "--norm none", "--norm batch"),
        (("--norm", "group", "--dropout", "0.5"), "--norm none --dropout 0", "--norm group --dropout 0.5 --groups 4"),
    ],
)
def test_resume_refuses_a_different_run_in_the_users_words(one_epoch, capsys, args, saved, asked):
    before = _snapshot(one_epoch)
    assert _train("--epochs", "2", "--resume", str(one_epoch), *args) == 2
    assert capsys.readouterr().err == (
        f"manualgrad train: --resume {one_epoch} holds another run: it was trained with {saved}, this command asks "
        f"for {asked}; give the run's own arguments to resume it, or start a new run without --resume\n"
    )
    assert _snapshot(one_epoch) == before


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_finite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("--optimizer", "sgd", "--lr", "1e30", "--checkpoint-every", "1", "--out", str(run)) == 1
    err = capsys.readouterr().err
    assert err.startswith("manualgrad train: the loss became nan at step 2 (epoch 1); stopped")
    assert f"the last finite checkpoint is {run / 'checkpoint-00000001.npz'}" in err
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-00000001.npz"]
    state = checkpoint.load(run / "checkpoint-00000001.npz", _sgd_template())[0]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state))


def _sgd_template():
    net = layers.mlp(2, hidden=(32, 32))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 2))
    return {"params": params, "opt_state": optax.sgd(1.0).init(params)}


@pytest.mark.parametrize(
    "args, message",
    [
        (("--lr", "nan"), "--lr must be a finite number > 0, got nan"),
        (("--lr", "inf"), "--lr must be a finite number > 0, got inf"),
        (("--lr", "-0.1"), "--lr must be a finite number > 0, got -0.1"),
        (("--lr", "0"), "--lr must be a finite number > 0, got 0"),
        (("--seed", "-1"), "--seed must be an integer from 0 to 4294967295, got -1"),
        (("--seed", str(2**32)), "--seed must be an integer from 0 to 4294967295, got 4294967296"),
        (("--cross-check-batches", "-1"), "--cross-check-batches must be ≥ 0 (0: no cross-check), got -1"),
        (("--overwrite",), "--overwrite needs --out DIR"),
        (("--dropout", "1"), "--dropout must be a number in [0, 1), the probability of dropping a hidden unit, got 1"),
        (("--dropout", "-0.5"), "--dropout must be a number in [0, 1)"),
        (("--groups", "2"), "--groups is the number of channel groups of --norm group, and this run has --norm none"),
        (("--norm", "group", "--groups", "0"), "--groups must be ≥ 1, got 0"),
        (
            ("--norm", "group", "--groups", "3"),
            "--model mlp --norm group --groups 3 cannot be built for dataset xor: GroupNorm: groups 3 must divide "
            "the 32 channels of its input (shape (-1, 32))",
        ),
        (
            ("--norm", "batch", "--batch-size", "1"),
            "--norm batch normalises every unit over the batch and needs --batch-size ≥ 2, got 1",
        ),
    ],
)
def test_bad_values_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert _train("--epochs", "1", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manualgrad train: {message}") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_no_cross_check_with_zero_batches(tmp_path, capsys):
    assert _train("--epochs", "1", "--cross-check-batches", "0", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "no cross-check of the hand-rule gradient (--cross-check-batches 0)" in out
    assert "max relative error" not in out


def test_bad_configurations_name_the_field(tmp_path):
    """The library's refusals name the configuration's fields (the command line names its flags)."""
    with pytest.raises(errors.ConfigError, match="^model cnn needs images") as error:
        loop.train(Config(dataset="xor", out=str(tmp_path)))
    assert error.value.field == "model"
    with pytest.raises(errors.ConfigError, match="^devices must be between 1 and") as error:
        loop.train(Config(model="mlp", dataset="xor", devices=999, out=str(tmp_path)))
    assert error.value.field == "devices"
    with pytest.raises(errors.ConfigError, match="^lr must be a finite number > 0, got nan"):
        loop.train(Config(model="mlp", dataset="xor", lr=float("nan"), out=str(tmp_path)))
    with pytest.raises(errors.TrainError, match="no checkpoint there"):
        loop.train(Config(model="mlp", dataset="xor", resume=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_idx_dataset_trains(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        idx_format.write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        idx_format.write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    summary = loop.train(Config(model="mlp", dataset=f"idx:{tmp_path}", epochs=1, out=str(tmp_path / "run")))
    assert summary["steps"] == 2 and 0 <= summary["test_accuracy"] <= 1


def test_eight_devices_give_the_one_device_gradient(tmp_path):
    """Data parallelism on 8 virtual CPU devices: same gradient and same step as on one device."""
    script = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from manualgrad.nn import layers
        from manualgrad.train import loop
        from manualgrad.train.config import Config
        assert len(jax.devices()) == 8
        rng = np.random.default_rng(0)
        x, y = rng.random((32, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int32)
        net = layers.cnn(10)
        _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 1))
        grad = jax.jit(jax.grad(lambda p, x, y: layers.classifier_loss(net, p, x, y)[0]))
        results = {}
        for n in (1, 8):
            mesh = loop.mesh(n)
            xs = jax.device_put(x, NamedSharding(mesh, P("data")))
            assert len(xs.sharding.device_set) == n
            ps = jax.device_put(params, NamedSharding(mesh, P()))
            results[n] = jax.device_get(grad(ps, xs, jax.device_put(y, NamedSharding(mesh, P("data")))))
        pairs = zip(jax.tree_util.tree_leaves(results[8]), jax.tree_util.tree_leaves(results[1]))
        print(max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in pairs))
        summary = loop.train(Config(model="mlp", epochs=1, devices=8, out=sys.argv[1]))
        print(summary["devices"], summary["test_accuracy"])
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    difference, summary = lines[0], lines[-1]
    assert float(difference) <= 1e-5  # float32: the all-reduce sums the batch in another order
    devices, accuracy = summary.split()
    assert devices == "8" and float(accuracy) > 0.5


NORMED = ("--norm", "batch", "--dropout", "0.3", "--checkpoint-every", "10")


def _state(directory):
    """Every array of the newest checkpoint in ``directory``, by key path, and its step."""
    path = checkpoint.checkpoints(directory)[-1]
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files if k != "__meta__"}, checkpoint.read_meta(path)["step"]


def test_batch_norm_and_dropout_resume_bit_identical_from_mid_epoch(tmp_path):
    """The running statistics are checkpointed and step s's dropout key is fold_in(seed, s): a run
    resumed at step 20 (epoch 1 of 25 steps) ends with every array and metric of the whole run."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _train(*NORMED, "--epochs", "2", "--out", str(whole)) == 0
    assert _train(*NORMED, "--epochs", "1", "--out", str(cut)) == 0
    (cut / "checkpoint-00000025.npz").unlink()  # back to the checkpoint of step 20, mid-epoch
    assert _train(*NORMED, "--epochs", "2", "--resume", str(cut)) == 0
    (received, step), (expected, whole_step) = _state(cut), _state(whole)
    assert step == whole_step == 50
    assert any("model_state" in k and "mean" in k for k in expected)  # the running statistics are saved
    assert received.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(received[k], expected[k], err_msg=k)
    assert progress.read_metrics(cut / "metrics.csv") == progress.read_metrics(whole / "metrics.csv")


def test_a_run_saved_before_norm_and_dropout_resumes(tmp_path, capsys):
    """Checkpoints of earlier versions do not record --norm, --dropout, --groups: they had the defaults."""
    run = tmp_path / "run"
    assert _train("--epochs", "1", "--out", str(run)) == 0
    net = layers.mlp(2, hidden=(32, 32))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 2))
    path = checkpoint.checkpoints(run)[-1]
    state, meta = checkpoint.load(path, {"params": params, "opt_state": optax.adam(3e-3).init(params)})
    for key in ADDED_LATER:
        del meta["config"][key]
    path.unlink()
    checkpoint.save(run, meta.pop("step"), state, meta)
    capsys.readouterr()
    assert _train("--epochs", "2", "--resume", str(run)) == 0
    assert capsys.readouterr().out.startswith(f"resuming from step 25 (epoch 2) in {run}")
    assert _train("--epochs", "3", "--resume", str(run), "--norm", "rms") == 2
    assert "it was trained with --norm none, this command asks for --norm rms" in capsys.readouterr().err


@pytest.mark.parametrize("norm", list(models.NORMS))
def test_autodiff_runs_every_norm_and_the_cross_check_agrees(tmp_path, norm):
    """--grad autodiff trains each norm (with dropout) from the references; the hand rules' gradient
    of the result matches jax.grad's to float32 round-off."""
    config = Config(
        model="mlp", dataset="xor", norm=norm, dropout=0.2, grad="autodiff", epochs=1, cross_check_batches=1
    )
    summary = loop.train(dataclasses.replace(config, out=str(tmp_path)))
    assert summary["test_accuracy"] > 0.5 and np.isfinite(summary["test_loss"])
    assert summary["cross_check_max_relative_error"] <= 1e-5
