"""Checkpoints: bit-identical round trips, retention, atomic writes, and damage that is caught and named."""

import io
import json
import os
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manualgrad.train import checkpoint
from manualgrad.train.checkpoint import CheckpointError, CheckpointMismatchError


def _params(hidden=3):
    rng = np.random.default_rng(0)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(2, hidden)), jnp.float32), "b": jnp.zeros(hidden, jnp.float32)},
        "layers": [jnp.asarray(rng.normal(size=(hidden, 1)), jnp.float32), (), jnp.ones(1, jnp.float32)],
    }


def _state(tx=None, hidden=3):
    """A training state with a few optimizer steps taken, so no moment is zero."""
    tx = tx or optax.adam(1e-2)
    params = _params(hidden)
    opt_state = tx.init(params)
    for _ in range(3):
        grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.5, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "key": jax.random.key_data(jax.random.PRNGKey(7)),
        "mask": np.array([True, False, True]),
        "count": np.int32(5),
        "scale": 0.25,
        "odd": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),  # NaN, negative zero, a subnormal
        "half": jnp.asarray([1.5, -2.25], jnp.bfloat16),
    }


def _assert_bit_identical(received, expected):
    assert jax.tree_util.tree_structure(received) == jax.tree_util.tree_structure(expected)
    received_leaves = jax.tree_util.tree_leaves_with_path(received)
    for (path, got), want in zip(received_leaves, jax.tree_util.tree_leaves(expected)):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray), jax.tree_util.keystr(path)
        assert got.dtype == want.dtype, jax.tree_util.keystr(path)
        assert got.shape == want.shape, jax.tree_util.keystr(path)
        assert got.tobytes() == want.tobytes(), jax.tree_util.keystr(path)  # bit for bit, NaN and -0.0 included


def _rewrite(path, **entries):
    """Rewrites the zip at ``path`` with some entries replaced by these arrays; the CRCs stay valid."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    for key, array in entries.items():
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array)
        members[f"{key}.npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _header(path):
    with np.load(path) as f:
        return json.loads(f["__meta__"].tobytes())


@pytest.mark.parametrize("tx", [optax.adam(1e-2), optax.sgd(0.1, momentum=0.9)], ids=["adam", "sgd-momentum"])
def test_round_trip_is_bit_identical(tmp_path, tx):
    state = _state(tx)
    written = checkpoint.save(tmp_path, 3, state, {})
    assert written == tmp_path / "checkpoint-00000003.npz"
    loaded, meta = checkpoint.load(written, _state(tx))
    _assert_bit_identical(loaded, state)
    assert meta == {"step": 3}
    # optax's NamedTuples come back as themselves, so the optimizer takes the loaded state.
    assert [type(s) for s in loaded["opt_state"]] == [type(s) for s in state["opt_state"]]
    grads = jax.tree_util.tree_map(jnp.ones_like, state["params"])
    expected, _ = tx.update(grads, state["opt_state"], state["params"])
    received, _ = tx.update(grads, loaded["opt_state"], loaded["params"])
    _assert_bit_identical(jax.device_get(received), jax.device_get(expected))


def test_adam_state_keeps_its_leaves_and_dtypes(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, 1, state, {})
    leaves = _header(tmp_path / "checkpoint-00000001.npz")["leaves"]
    assert leaves["['opt_state'][0].count"] == [[], "<i4"]  # the 0-d step count
    assert leaves["['opt_state'][0].mu['dense']['w']"] == [[2, 3], "<f4"]
    assert leaves["['key']"] == [[2], "<u4"]
    assert leaves["['half']"] == [[2], "bfloat16"]  # the .npy header cannot name it: recorded by name


def test_template_can_be_shapes_only(tmp_path):
    state = _state()
    checkpoint.save(tmp_path, 1, state, {})
    loaded, _ = checkpoint.load(tmp_path / "checkpoint-00000001.npz", jax.eval_shape(lambda: _state()))
    _assert_bit_identical(loaded, state)


def test_meta_round_trips_and_step_is_added(tmp_path):
    meta = {
        "epoch": 4,
        "data_seed": 123456789,
        "epoch_loss": 0.1 + 0.2,  # floats come back exactly
        "metrics": [
            {"epoch": 1, "train_loss": 0.693147, "test_accuracy": 0.5},
            {"epoch": 2, "train_loss": float("nan")},
        ],
        "config": {"model": "mlp", "lr": None, "hidden": [32, 32], "resume": "runs/x"},
    }
    checkpoint.save(tmp_path, 42, _state(), meta)
    _, loaded = checkpoint.load(tmp_path / "checkpoint-00000042.npz", _state())
    assert loaded.pop("step") == 42
    assert loaded["epoch_loss"] == 0.1 + 0.2
    assert np.isnan(loaded["metrics"][1].pop("train_loss")) and np.isnan(meta["metrics"][1].pop("train_loss"))
    assert loaded == meta


def test_read_meta_needs_no_template_and_still_checks_the_arrays(tmp_path):
    path = checkpoint.save(tmp_path, 7, _state(), {"config": {"model": "mlp", "lr": None}})
    assert checkpoint.read_meta(path) == {"config": {"model": "mlp", "lr": None}, "step": 7}
    _rewrite(path, **{"['params']['dense']['b']": np.ones(3, np.float32)})  # valid zip, wrong digest
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
        checkpoint.read_meta(path)


def test_file_is_a_plain_npz_that_numpy_reads(tmp_path):
    state = _state()
    path = checkpoint.save(tmp_path, 1, state, {"epoch": 1})
    with np.load(path) as f:
        np.testing.assert_array_equal(f["['params']['dense']['w']"], state["params"]["dense"]["w"])
        assert f["['mask']"].dtype == bool
    header = _header(path)
    assert header["version"] == checkpoint.VERSION and header["step"] == 1 and header["meta"] == {"epoch": 1}
    assert len(header["digest"]) == 64


def test_keep_retains_the_newest(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step * 10, _state(), {})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000040.npz", "checkpoint-00000050.npz"]
    checkpoint.save(tmp_path, 60, _state(), {}, keep=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000060.npz"]
    with pytest.raises(ValueError, match="keep ≥ 1"):
        checkpoint.save(tmp_path, 70, _state(), {}, keep=0)
    with pytest.raises(ValueError, match="step must be ≥ 0"):
        checkpoint.save(tmp_path, -1, _state(), {})


def test_a_resumed_run_never_deletes_what_it_just_wrote(tmp_path):
    """Resumed at step 10 behind damaged later checkpoints: saving step 11 keeps 10 and 11, leaves 20 and 30."""
    for step in (10, 20, 30):
        checkpoint.save(tmp_path, step, _state(), {}, keep=3)
    for step in (20, 30):
        path = tmp_path / f"checkpoint-{step:08d}.npz"
        path.write_bytes(path.read_bytes()[:100])
    checkpoint.save(tmp_path, 11, _state(), {})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [f"checkpoint-{s:08d}.npz" for s in (10, 11, 20, 30)]
    _, meta, warnings = checkpoint.latest(tmp_path, _state())
    assert meta["step"] == 11 and len(warnings) == 2


def test_checkpoints_are_ordered_by_step_and_ignore_other_files(tmp_path):
    assert checkpoint.checkpoints(tmp_path / "nowhere") == []
    assert checkpoint.latest(tmp_path / "nowhere", _state()) is None
    assert checkpoint.latest(tmp_path, _state()) is None
    for step in (123_456_789, 9, 80):  # past 8 digits too
        checkpoint.save(tmp_path, step, _state(), {}, keep=5)
    (tmp_path / "metrics.csv").write_text("epoch\n")
    (tmp_path / "checkpoint-1.npz").write_bytes(b"not ours")
    (tmp_path / ".checkpoint-00000099-0000.tmp").write_bytes(b"stray")
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [
        "checkpoint-00000009.npz",
        "checkpoint-00000080.npz",
        "checkpoint-123456789.npz",
    ]
    assert checkpoint.latest(tmp_path, _state())[1]["step"] == 123_456_789


def test_saving_a_step_again_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 5, _state(), {"run": 1})
    checkpoint.save(tmp_path, 5, _state(), {"run": 2})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["checkpoint-00000005.npz"]
    assert checkpoint.load(tmp_path / "checkpoint-00000005.npz", _state())[1]["run"] == 2


def test_crash_before_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    state = _state()
    checkpoint.save(tmp_path, 1, state, {"epoch": 1})
    before = sorted(os.listdir(tmp_path))

    def crash(*args):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, _state(hidden=5), {"epoch": 2})
    assert sorted(os.listdir(tmp_path)) == before  # no partial file, under any name
    monkeypatch.undo()
    loaded, meta, warnings = checkpoint.latest(tmp_path, _state())
    assert meta == {"epoch": 1, "step": 1} and warnings == []
    _assert_bit_identical(loaded, state)


def test_meta_that_is_not_json_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        checkpoint.save(tmp_path, 1, _state(), {"when": object()})
    assert os.listdir(tmp_path) == []


def test_stray_temporary_file_is_ignored_and_cleaned(tmp_path):
    """What SIGKILL during a write leaves: half a file under a temporary name."""
    first = checkpoint.save(tmp_path, 1, _state(), {})
    stray = tmp_path / ".checkpoint-00000002-dead.tmp"
    stray.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    assert checkpoint.checkpoints(tmp_path) == [first]
    assert checkpoint.latest(tmp_path, _state())[1:] == ({"step": 1}, [])
    checkpoint.save(tmp_path, 2, _state(), {})
    assert not stray.exists()


def test_sigkill_while_saving_never_leaves_a_broken_checkpoint(tmp_path):
    """A process saving in a loop is killed at an arbitrary moment: every checkpoint-named file is intact."""
    script = (
        "import sys, numpy as np\n"
        "from manualgrad.train import checkpoint\n"
        "state = {'w': np.arange(2_000_000, dtype=np.float32)}\n"
        "for step in range(1, 10_000):\n"
        "    state['w'][0] = step\n"
        "    checkpoint.save(sys.argv[1], step, state, {'step_again': step})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    deadline = time.time() + 60
    while len(checkpoint.checkpoints(tmp_path)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    process.kill()
    process.wait()
    found = checkpoint.checkpoints(tmp_path)
    assert found, "the saving process wrote no checkpoint before it was killed"
    template = {"w": np.zeros(2_000_000, np.float32)}
    for path in found:
        state, meta = checkpoint.load(path, template)
        assert state["w"][0] == meta["step"] == meta["step_again"]
    _, meta, warnings = checkpoint.latest(tmp_path, template)
    assert warnings == [] and f"checkpoint-{meta['step']:08d}.npz" == found[-1].name


def test_truncated_checkpoint_is_named_and_latest_falls_back(tmp_path):
    older_state = _state()
    checkpoint.save(tmp_path, 1, older_state, {"epoch": 1})
    newest = checkpoint.save(tmp_path, 2, _state(), {"epoch": 2})
    damaged = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(damaged)

    with pytest.raises(CheckpointError, match=r"checkpoint-00000002\.npz is truncated or corrupt"):
        checkpoint.load(newest, _state())
    state, meta, warnings = checkpoint.latest(tmp_path, _state())
    assert meta == {"epoch": 1, "step": 1}
    _assert_bit_identical(state, older_state)
    assert len(warnings) == 1 and "checkpoint-00000002.npz" in warnings[0] and "truncated" in warnings[0]
    assert newest.read_bytes() == damaged  # left as it was, for the user to inspect


def test_every_checkpoint_damaged_names_them_all(tmp_path):
    for step in (1, 2):
        path = checkpoint.save(tmp_path, step, _state(), {})
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        checkpoint.latest(tmp_path, _state())
    assert "checkpoint-00000001.npz" in str(error.value) and "checkpoint-00000002.npz" in str(error.value)


def test_flipped_byte_in_array_data_is_caught(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": np.arange(1000, dtype=np.float32)}, {})
    data = bytearray(path.read_bytes())
    offset = data.find(np.arange(1000, dtype=np.float32).tobytes())
    assert offset > 0
    data[offset + 1234] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path, {"w": np.zeros(1000, np.float32)})


def test_digest_catches_damage_the_zip_layer_misses(tmp_path):
    """An array changed inside a zip whose CRCs were recomputed: only the SHA-256 digest can tell."""
    path = checkpoint.save(tmp_path, 1, _state(), {})
    w = np.asarray(_state()["params"]["dense"]["w"]).copy()
    w.view(np.uint32)[0, 0] ^= 1  # one bit of one float
    _rewrite(path, **{"['params']['dense']['w']": w})
    with pytest.raises(CheckpointError, match="do not match the SHA-256 digest"):
        checkpoint.load(path, _state())


def test_metadata_inconsistent_with_arrays_is_caught(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": np.ones(4, np.float32)}, {})
    _rewrite(path, **{"['w']": np.ones(4, np.int32)})  # same bytes count, other dtype
    with pytest.raises(CheckpointError, match=r"is corrupt: \['w'\] is int32\[4\]"):
        checkpoint.load(path, {"w": np.ones(4, np.float32)})


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(tmp_path / "checkpoint-00000001.npz", _state())
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(CheckpointError, match="garbage.npz is truncated or corrupt"):
        checkpoint.load(garbage, _state())
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.ones(3))
    with pytest.raises(CheckpointError, match="no __meta__ entry: not a manualgrad checkpoint"):
        checkpoint.load(plain, _state())
    newer = checkpoint.save(tmp_path, 1, {"w": np.ones(3)}, {})
    header = _header(newer)
    _rewrite(newer, __meta__=np.frombuffer(json.dumps({**header, "version": 99}).encode(), np.uint8))
    with pytest.raises(CheckpointError, match="format version 99; this manualgrad reads version 1"):
        checkpoint.load(newer, {"w": np.ones(3)})
    _rewrite(newer, __meta__=np.frombuffer(b"{not json", np.uint8))
    with pytest.raises(CheckpointError, match="__meta__ entry is damaged"):
        checkpoint.load(newer, {"w": np.ones(3)})


def test_different_model_names_the_leaves(tmp_path):
    path = checkpoint.save(tmp_path, 1, _state(), {})
    bigger = _state()
    bigger["params"]["extra"] = jnp.zeros(2, jnp.float32)
    del bigger["mask"]
    with pytest.raises(CheckpointMismatchError, match="different model or optimizer") as error:
        checkpoint.load(path, bigger)
    assert "missing ['params']['extra']" in str(error.value)
    assert "not in the template: ['mask']" in str(error.value)
    with pytest.raises(CheckpointMismatchError, match=r"\['opt_state'\]\[0\]\.mu") as error:
        checkpoint.load(path, _state(optax.sgd(0.1, momentum=0.9)))
    assert "\"['opt_state'][0].trace['dense']['b']\"" not in str(error.value)  # keys shown plainly
    assert "['opt_state'][0].trace['dense']['b']" in str(error.value)


def test_shape_and_dtype_mismatches_name_the_leaf(tmp_path):
    small = checkpoint.save(tmp_path / "small", 1, {"w": np.zeros((3, 4), np.float32)}, {})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"does not fit the template: \['w'\] is float32\[3, 4\] "
        r"in the file, the template expects float32\[4, 3\]$",
    ):
        checkpoint.load(small, {"w": np.zeros((4, 3), np.float32)})
    path = checkpoint.save(tmp_path, 1, _state(), {})
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoint.load(path, _state(hidden=4))  # 9 leaves differ: the first 5 are named
    assert "['opt_state'][0].mu['dense']['w'] is float32[2, 3] in the file, the template expects float32[2, 4]" in str(
        error.value
    )
    assert str(error.value).endswith(" and 4 more")
    wider = _state()
    wider["count"] = np.int64(5)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"\['count'\] is int32\[\] in the file, "
        r"the template expects int64\[\]",
    ):
        checkpoint.load(path, wider)
    # latest() does not fall back past a checkpoint that is intact but for another model.
    with pytest.raises(CheckpointMismatchError):
        checkpoint.latest(tmp_path, wider)


def test_leaves_numpy_cannot_hold_are_refused_by_name(tmp_path):
    with pytest.raises(TypeError, match=r"leaf \['key'\] cannot be stored"):
        checkpoint.save(tmp_path, 1, {"key": jax.random.key(0)}, {})
    with pytest.raises(TypeError, match=r"leaf \['fn'\] is a Python object"):
        checkpoint.save(tmp_path, 1, {"fn": print}, {})
    assert os.listdir(tmp_path) == []
