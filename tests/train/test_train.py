"""``manualgrad train``: layers, the jitted step on hand rules, checkpoints that survive SIGKILL, many devices."""

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
from manualgrad.train import checkpoint, data, loop

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _batch(shape=(16, 8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32), rng.integers(0, classes, shape[0]).astype(np.int32)


def _relative(a, b) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in pairs)


def test_layers_init_shapes_and_plain_pytrees():
    net = layers.serial(layers.Conv2D(4, (3, 3), padding="SAME"), layers.Relu, layers.MaxPool2D(2),
                        layers.Conv2D(6, (3, 3), stride=2), layers.Tanh, layers.AvgPool2D(1), layers.Flatten,
                        layers.Dense(5), layers.Sigmoid)
    out_shape, params = net.init(jax.random.PRNGKey(0), (-1, 16, 16, 3))
    assert out_shape == (-1, 5)
    assert [jax.tree_util.tree_map(jnp.shape, p) for p in params] == [
        {"w": (3, 3, 3, 4), "b": (4,)}, (), (), {"w": (3, 3, 4, 6), "b": (6,)}, (), (), (), {"w": (54, 5), "b": (5,)}, ()]
    x = jnp.ones((2, 16, 16, 3), jnp.float32)
    assert net.apply(params, x).shape == (2, 5)
    opt_state = optax.adam(1e-3).init(params)  # optax takes the params as they are
    assert jax.tree_util.tree_structure(optax.adam(1e-3).update(params, opt_state, params)[0]) == \
        jax.tree_util.tree_structure(params)
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


def test_training_step_runs_the_registered_backward():
    """Planting a wrong ReLU backward changes the manual step and leaves the autodiff step bit-identical."""
    x, y = _batch()
    net = layers.cnn(10)
    _, params = net.init(jax.random.PRNGKey(0), (-1, 8, 8, 1))
    tx = optax.sgd(0.1)

    def one_step(grad):
        step = loop.make_step(loop.loss_fn(net, grad), tx)
        p = jax.tree_util.tree_map(jnp.copy, params)
        return step(p, tx.init(p), x, y)[0]

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


def test_default_digits_cnn_reaches_97_percent(tmp_path):
    summary = loop.train(loop.Config(out=str(tmp_path)))
    assert summary["test_accuracy"] >= 0.97
    assert summary["cross_check_max_relative_error"] <= 1e-4  # float32 gradients of a trained net
    rows = loop.read_metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(1, 11))
    assert set(rows[0]) == set(loop.METRICS)
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


def _cli(*args, env=None):
    return [sys.executable, "-m", "manualgrad", "train", *args]


def _final_params(directory):
    net = layers.mlp(2, hidden=(32, 32))
    _, params = net.init(jax.random.PRNGKey(0), (-1, 2))
    template = {"params": params, "opt_state": optax.adam(3e-3).init(params)}
    state, meta, warnings = checkpoint.latest(directory, template)
    return state["params"], meta, warnings


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    run = ["--model", "mlp", "--dataset", "xor", "--epochs", "40", "--checkpoint-every", "7"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_cli(*run, "--out", str(whole)), check=True, capture_output=True)

    process = subprocess.Popen(_cli(*run, "--out", str(cut)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint.checkpoints(cut) and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    total = 40 * data.steps_per_epoch(800, 32)
    killed_at = _final_params(cut)[1]["step"]
    assert 0 < killed_at < total, "the run finished before it could be killed"

    # Damage the newest checkpoint too: resume must say so and fall back to the one before.
    newest = checkpoint.checkpoints(cut)[-1]
    if len(checkpoint.checkpoints(cut)) > 1:
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resumed = subprocess.run(_cli(*run, "--out", str(cut), "--resume", str(cut)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    if len(checkpoint.checkpoints(cut)) > 2:
        assert newest.name in resumed.stderr

    expected, meta_whole, _ = _final_params(whole)
    received, meta_cut, _ = _final_params(cut)
    assert meta_cut["step"] == meta_whole["step"] == total
    for a, b in zip(jax.tree_util.tree_leaves(received), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert loop.read_metrics(cut / "metrics.csv") == loop.read_metrics(whole / "metrics.csv")


def test_resume_refuses_a_different_run(tmp_path):
    subprocess.run(_cli("--model", "mlp", "--dataset", "xor", "--epochs", "1", "--out", str(tmp_path)),
                   check=True, capture_output=True)
    result = subprocess.run(_cli("--model", "mlp", "--dataset", "xor", "--epochs", "2", "--lr", "0.5",
                                 "--out", str(tmp_path), "--resume", str(tmp_path)), capture_output=True, text=True)
    assert result.returncode == 2
    assert "holds a different run: --lr None (saved) vs 0.5 (now)" in result.stderr


def test_bad_configurations_name_the_flag(tmp_path):
    with pytest.raises(loop.TrainError, match="--model cnn needs images"):
        loop.train(loop.Config(dataset="xor", out=str(tmp_path)))
    with pytest.raises(loop.TrainError, match="--devices must be between 1 and"):
        loop.train(loop.Config(model="mlp", dataset="xor", devices=999, out=str(tmp_path)))
    with pytest.raises(loop.TrainError, match="no checkpoint there"):
        loop.train(loop.Config(model="mlp", dataset="xor", resume=str(tmp_path), out=str(tmp_path)))


def test_idx_dataset_trains(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        data.write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    summary = loop.train(loop.Config(model="mlp", dataset=f"idx:{tmp_path}", epochs=1, out=str(tmp_path / "run")))
    assert summary["steps"] == 2 and 0 <= summary["test_accuracy"] <= 1


def test_eight_devices_give_the_one_device_gradient():
    """Data parallelism on 8 virtual CPU devices: same gradient and same step as on one device."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from manualgrad.nn import layers
        from manualgrad.train import loop
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
        summary = loop.train(loop.Config(model="mlp", epochs=1, devices=8, out="/tmp/manualgrad-8-devices"))
        print(summary["devices"], summary["test_accuracy"])
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    difference, summary = lines[0], lines[-1]
    assert float(difference) <= 1e-5  # float32: the all-reduce sums the batch in another order
    devices, accuracy = summary.split()
    assert devices == "8" and float(accuracy) > 0.5
