"""Checkpoints: exact round trips, atomic writes, and clear errors for damaged or foreign files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manualgrad import checkpoint


def _state(seed=0):
    rng = np.random.default_rng(seed)
    params = [{"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}, (),
              {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32), "b": jnp.ones(2, jnp.float32)}]
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    _, opt_state = opt.update(params, opt_state, params)  # count = 1, moments non-zero
    momentum = optax.sgd(0.1, momentum=0.9)
    return {"params": params, "adam": opt_state, "momentum": momentum.init(params),
            "key": jax.random.key_data(jax.random.PRNGKey(seed)), "flag": np.array(True), "step": np.int32(7)}


def _assert_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_round_trip_is_bit_identical(tmp_path):
    state = _state()
    meta = {"epoch_loss": 0.1 + 0.2, "metrics": [{"epoch": 1, "test_accuracy": 0.97}], "config": {"lr": None}}
    path = checkpoint.save(tmp_path, 12, state, meta)
    assert path.name == "checkpoint-00000012.npz"
    loaded, loaded_meta = checkpoint.load(path, _state(seed=1))
    _assert_identical(loaded, state)
    assert loaded_meta == {**meta, "step": 12}  # floats survive JSON exactly


def test_keeps_the_newest_two(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _state(), {})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000002.npz", "checkpoint-00000003.npz"]


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, _state(), {"n": 1})

    def crash(src, dst):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, _state(), {"n": 2})
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000001.npz"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    (tmp_path / ".checkpoint-stray.tmp").write_bytes(b"half")  # what SIGKILL before the rename leaves
    state, meta, warnings = checkpoint.latest(tmp_path, _state())
    assert meta["n"] == 1 and warnings == []
    checkpoint.save(tmp_path, 3, _state(), {})
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_truncated_checkpoint_is_named_and_the_older_one_used(tmp_path):
    checkpoint.save(tmp_path, 1, _state(), {"n": 1})
    newest = checkpoint.save(tmp_path, 2, _state(), {"n": 2})
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint-00000002\.npz is unreadable \(truncated or corrupt\)"):
        checkpoint.load(newest, _state())
    state, meta, warnings = checkpoint.latest(tmp_path, _state())
    assert meta["n"] == 1
    assert len(warnings) == 1 and "checkpoint-00000002.npz" in warnings[0]
    assert newest.exists()  # the damaged file is left for the user to inspect


def test_flipped_byte_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": np.zeros(4096, np.float32)}, {})
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the array's data
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt|unreadable"):
        checkpoint.load(path, {"w": np.zeros(4096, np.float32)})


def test_every_checkpoint_damaged(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(), {})
    path.write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint in .* is damaged"):
        checkpoint.latest(tmp_path, _state())
    assert checkpoint.latest(tmp_path / "empty", _state()) is None


def test_template_mismatch_names_the_leaf(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": np.zeros((3, 4), np.float32)}, {})
    with pytest.raises(checkpoint.CheckpointError, match=r"\['w'\] is float32\[3, 4\], expected float32\[4, 3\]"):
        checkpoint.load(path, {"w": np.zeros((4, 3), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match=r"different model or optimizer: missing \[\"\['v'\]\"\]"):
        checkpoint.load(path, {"v": np.zeros((3, 4), np.float32)})
