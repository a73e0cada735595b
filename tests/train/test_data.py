"""The datasets of ``manualgrad train`` (``manualgrad/train/data.py``): the built-in sets and their
seeded splits, IDX reading and writing, every loading error, and the batch order.
"""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from manualgrad.train import data, idx_format
from manualgrad.train.data import DataError

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def sorted_rows(x):
    """The rows of ``x`` (flattened per sample) in lexicographic order, to compare as multisets."""
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


# Built-in datasets


def test_digits_shapes_values_and_split():
    d = data.digits()
    assert (d.name, d.classes, d.input_shape, d.is_image) == ("digits", 10, (8, 8, 1), True)
    assert d.x_train.shape == (1438, 8, 8, 1) and d.x_test.shape == (359, 8, 8, 1)  # 359 = round(0.2 · 1797)
    assert d.y_train.shape == (1438,) and d.y_test.shape == (359,)
    assert d.x_train.dtype == d.x_test.dtype == np.float32
    assert d.y_train.dtype == d.y_test.dtype == np.int32
    assert d.x_train.min() == 0 and d.x_train.max() == 1 and d.x_test.max() <= 1
    assert set(np.unique(d.y_train)) == set(np.unique(d.y_test)) == set(range(10))

    # Train and test together are the 1797 digits (values /16, label kept with its image).
    original = load_digits()
    together = np.concatenate([d.x_train, d.x_test]).reshape(-1, 64)
    labels = np.concatenate([d.y_train, d.y_test])
    np.testing.assert_array_equal(
        sorted_rows(np.column_stack([together, labels])),
        sorted_rows(np.column_stack([original.data / 16, original.target]).astype(np.float32)),
    )
    # Stratified: every class holds out a fifth of its samples, to within one.
    held_out, total = np.bincount(d.y_test, minlength=10), np.bincount(original.target, minlength=10)
    assert np.all(np.abs(held_out - 0.2 * total) <= 1)


def test_digits_split_is_decided_by_the_seed():
    a, b, c = data.digits(seed=3), data.digits(seed=3), data.digits(seed=4)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.x_test.shape == c.x_test.shape
    assert not np.array_equal(a.x_test, c.x_test)
    assert data.digits(test_fraction=0.5).x_test.shape[0] == 898  # round(0.5 · 1797), half to even


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.0001])
def test_a_split_must_leave_samples_on_both_sides(fraction):
    with pytest.raises(DataError, match=rf"xor: test_fraction must leave .* got {fraction} of 1000 samples"):
        data.xor(test_fraction=fraction)


def test_xor_labels_are_the_sign_of_the_product():
    d = data.xor(seed=1, n=500, test_fraction=0.2)
    assert (d.classes, d.input_shape, d.is_image) == (2, (2,), False)
    assert d.x_train.shape == (400, 2) and d.x_test.shape == (100, 2) and d.x_train.dtype == np.float32
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert np.all(np.abs(x) <= 1)
        np.testing.assert_array_equal(y, (x[:, 0] * x[:, 1] > 0).astype(np.int32))
        assert 0.35 < y.mean() < 0.65
    np.testing.assert_array_equal(data.xor(seed=1, n=500).x_train, d.x_train)
    assert not np.array_equal(data.xor(seed=2, n=500).x_train, d.x_train)


def test_spirals_points_lie_on_their_own_arm():
    d = data.spirals(seed=0, n=400, noise=0.0)
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    assert d.classes == 2 and d.input_shape == (2,)
    assert np.bincount(y).tolist() == [200, 200]
    r = np.hypot(x[:, 0], x[:, 1])
    assert np.all((r >= 0.1 - 1e-6) & (r <= 1 + 1e-6))
    # Class k at radius r sits at angle 3πr + πk: the angle off its own arm is 0 (mod 2π) ...
    off = np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - 3 * np.pi * r - np.pi * y)))
    np.testing.assert_allclose(off, 0, atol=1e-5)
    # ... and π off the other arm, so the two spirals interleave.
    other = np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - 3 * np.pi * r - np.pi * (1 - y))))
    np.testing.assert_allclose(np.abs(other), np.pi, atol=1e-5)


def test_spirals_with_noise_are_of_order_one_and_seeded():
    d = data.spirals(seed=5)
    assert d.x_train.shape == (800, 2) and d.x_test.shape == (200, 2)
    assert 0.9 < np.abs(d.x_train).max() < 1.5
    assert abs(d.y_test.mean() - 0.5) <= 0.01
    np.testing.assert_array_equal(data.spirals(seed=5).x_test, d.x_test)
    assert not np.array_equal(data.spirals(seed=6).x_test, d.x_test)


def test_moons_are_centred_and_balanced():
    d = data.moons(seed=0, noise=0.0)
    x = np.concatenate([d.x_train, d.x_test])
    assert d.classes == 2 and x.shape == (1000, 2)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=0.05)
    assert np.bincount(np.concatenate([d.y_train, d.y_test])).tolist() == [500, 500]


@pytest.mark.parametrize("spec", ["digits", "xor", "spirals", "moons"])
def test_load_names_the_builtin_datasets(spec):
    d = data.load(spec, seed=2)
    assert d.name == spec
    np.testing.assert_array_equal(d.x_test, getattr(data, spec)(seed=2).x_test)


@pytest.mark.parametrize("spec", ["mnist", "Digits", "idx:", "idx", ""])
def test_load_refuses_unknown_specs_and_lists_the_known_ones(spec):
    known = "digits, xor, spirals, moons, idx:PATH"
    with pytest.raises(DataError, match=rf"unknown dataset {spec!r}; expected one of: {known}"):
        data.load(spec)
    assert issubclass(DataError, ValueError)


def test_dataset_repr_leaves_out_the_arrays():
    assert repr(data.xor()) == "Dataset(name='xor', classes=2)"


# IDX files

IDX_DTYPES = ["uint8", "int8", "int16", "int32", "float32", "float64"]


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", IDX_DTYPES)
def test_write_then_read_idx_round_trips(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    for shape in [(7,), (3, 4, 5), (2, 1, 3, 2)]:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        path = tmp_path / f"a{len(shape)}{suffix}"
        idx_format.write_idx(path, array)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
        back = idx_format.read_idx(path)
        assert back.dtype == array.dtype and back.dtype.isnative
        np.testing.assert_array_equal(back, array)


def test_idx_layout_is_the_mnist_one(tmp_path):
    """Header and data written by hand, the way the MNIST files are laid out."""
    images = tmp_path / "images"
    images.write_bytes(struct.pack(">I3i", 0x00000803, 2, 2, 3) + bytes(range(12)))
    np.testing.assert_array_equal(idx_format.read_idx(images), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    shorts = tmp_path / "shorts.gz"
    shorts.write_bytes(gzip.compress(struct.pack(">4Bi3h", 0, 0, 0x0B, 1, 3, -2, 300, 7)))
    np.testing.assert_array_equal(idx_format.read_idx(shorts), np.array([-2, 300, 7], np.int16))
    idx_format.write_idx(tmp_path / "labels", np.array([1, 2], np.int32))
    assert (tmp_path / "labels").read_bytes() == struct.pack(">4B3i", 0, 0, 0x0C, 1, 2, 1, 2)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"bad magic number \(empty file\)"),
        (b"\x01\x00\x08\x01\0\0\0\1x", r"bad magic number 01 00 08 01, expected 00 00 <type> <ndim>"),
        (b"\x00\x00\x0a\x01\0\0\0\1x", r"bad magic number 00 00 0a 01, .* one of 08, 09, 0b, 0c, 0d, 0e"),
        (
            b"\x00\x00\x08\x03" + struct.pack(">2i", 2, 2),
            r"truncated IDX header: 3 dimensions need 16 bytes, the file has 12",
        ),
        (
            b"\x00\x00\x08\x02" + struct.pack(">2i", 2, 5) + bytes(9),
            r"truncated: the header says uint8 of shape \(2, 5\), which is 22 bytes .* the file has 21",
        ),
        (
            b"\x00\x00\x0c\x01" + struct.pack(">2i", 1, 5) + b"?",
            r"too long: the header says int32 of shape \(1,\), which is 12 bytes .* has 13",
        ),
        (gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">i", 40) + bytes(40))[:-12], r"not a readable gzip file"),
    ],
    ids=["empty", "magic", "type code", "short header", "truncated", "too long", "broken gzip"],
)
def test_read_idx_refuses_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        idx_format.read_idx(path)


@pytest.mark.parametrize("array", [np.zeros(3, bool), np.zeros(3, np.int64), np.zeros((), np.uint8)])
def test_write_idx_refuses_what_idx_cannot_hold(tmp_path, array):
    with pytest.raises(DataError, match=rf"write_idx: IDX holds .* got {array.dtype} of shape"):
        idx_format.write_idx(tmp_path / "x", array)


# IDX directories


def write_mnist(directory, n_train=20, n_test=10, size=(28, 28), suffix="", labels=None):
    """A small MNIST-format directory; returns the arrays written."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10 if labels is None else labels[0],
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8)[::-1] % 10 if labels is None else labels[1],
    }
    directory.mkdir(exist_ok=True)
    for name, array in arrays.items():
        idx_format.write_idx(directory / (name + suffix), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_directory_loads_the_files_split(tmp_path, suffix):
    written = write_mnist(tmp_path / "mnist", suffix=suffix)
    d = data.load(f"idx:{tmp_path / 'mnist'}")
    assert (d.name, d.classes, d.input_shape, d.is_image) == (f"idx:{tmp_path / 'mnist'}", 10, (28, 28, 1), True)
    assert d.x_train.shape == (20, 28, 28, 1) and d.x_test.shape == (10, 28, 28, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    np.testing.assert_array_equal(d.x_train[..., 0], written["train-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(d.x_test[..., 0], written["t10k-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(d.y_train, written["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(d.y_test, written["t10k-labels-idx1-ubyte"])


def test_idx_directory_takes_any_image_size_channels_and_float_images(tmp_path):
    write_mnist(tmp_path, n_train=4, n_test=3, size=(5, 7), labels=(np.zeros(4, np.uint8), np.zeros(3, np.uint8)))
    d = data.idx(tmp_path)
    assert d.input_shape == (5, 7, 1) and d.classes == 2  # at least two classes

    colour = np.random.default_rng(2).random((4, 6, 6, 3)).astype(np.float32)
    idx_format.write_idx(tmp_path / "train-images-idx3-ubyte", colour)
    idx_format.write_idx(tmp_path / "t10k-images-idx3-ubyte", colour[:3])
    idx_format.write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 4, 1, 2], np.int32))
    d = data.idx(str(tmp_path))
    assert d.input_shape == (6, 6, 3) and d.classes == 5
    np.testing.assert_array_equal(d.x_train, colour)


def test_idx_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"idx: '.*nowhere' is not a directory"):
        data.load(f"idx:{tmp_path / 'nowhere'}")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DataError, match=r"is not a directory"):
        data.idx(tmp_path / "file")


def test_idx_missing_file_names_what_is_expected_and_what_is_there(tmp_path):
    write_mnist(tmp_path, suffix=".gz")
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    (tmp_path / "t10k-labels.idx1-ubyte").write_bytes(b"")
    expected = ", ".join(
        f"{name}[.gz]"
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )
    found = "t10k-images-idx3-ubyte.gz, t10k-labels.idx1-ubyte, train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError) as error:
        data.idx(tmp_path)
    assert str(error.value) == (
        f"idx: {tmp_path} has no test labels file t10k-labels-idx1-ubyte[.gz]; expected {expected}; found {found}"
    )
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    with pytest.raises(DataError, match=r"has no train images file train-images-idx3-ubyte\[\.gz\]; .* found nothing"):
        data.idx(tmp_path)


def test_idx_bad_magic_number(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: not an IDX file: bad magic number 3c 68 74 6d"):
        data.idx(tmp_path)


def test_idx_truncated_file(tmp_path):
    write_mnist(tmp_path, suffix=".gz")
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    message = r"t10k-images-idx3-ubyte.gz: truncated: the header says uint8 of shape \(10, 28, 28\)"
    with pytest.raises(DataError, match=message):
        data.idx(tmp_path)


def test_idx_image_and_label_counts_must_agree(tmp_path):
    write_mnist(tmp_path)
    idx_format.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    message = r"train-images-idx3-ubyte has 20 images but train-labels-idx1-ubyte has 19 labels"
    with pytest.raises(DataError, match=message):
        data.idx(tmp_path)


@pytest.mark.parametrize(
    "name, array, message",
    [
        (
            TEST_IMAGES,
            np.zeros((10, 14, 14), np.uint8),
            r"train images are \(28, 28, 1\) but test images are \(14, 14, 1\)",
        ),
        (
            TEST_IMAGES,
            np.zeros((10, 784), np.uint8),
            r"images must have shape \(N, H, W\) or \(N, H, W, C\), got \(10, 784\)",
        ),
        (
            TEST_IMAGES,
            np.zeros((10, 28, 28), np.int16),
            r"images must be uint8 \(0..255\) or floating point, got int16",
        ),
        (TEST_LABELS, np.zeros(10, np.float32), r"labels must be one axis of integers, got float32 of shape \(10,\)"),
        (TEST_LABELS, np.full(10, -1, np.int8), r"labels must be class indices ≥ 0, found -1"),
    ],
)
def test_idx_refuses_arrays_that_are_not_images_and_labels(tmp_path, name, array, message):
    write_mnist(tmp_path)
    idx_format.write_idx(tmp_path / name, array)
    with pytest.raises(DataError, match=message):
        data.idx(tmp_path)


def test_fashion_mnist():
    if not FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST}: apt install dataset-fashion-mnist")
    d = data.load(f"idx:{FASHION_MNIST}")
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.y_train.shape == (60000,) and d.y_test.shape == (10000,)
    assert d.classes == 10 and d.x_train.dtype == np.float32
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert np.bincount(d.y_train).tolist() == [6000] * 10 and np.bincount(d.y_test).tolist() == [1000] * 10


# Batches


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    order = data.epoch_order(7, 3, 50)
    np.testing.assert_array_equal(np.sort(order), np.arange(50))
    np.testing.assert_array_equal(data.epoch_order(7, 3, 50), order)
    assert not np.array_equal(data.epoch_order(7, 4, 50), order)
    assert not np.array_equal(data.epoch_order(8, 3, 50), order)
    # Epoch 3 does not depend on the epochs drawn before it (a resumed run sees the same order).
    for epoch in range(3):
        data.epoch_order(7, epoch, 50)
    np.testing.assert_array_equal(data.epoch_order(7, 3, 50), order)


def test_batches_are_full_in_order_and_drop_the_remainder():
    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int32)
    order = data.epoch_order(0, 0, 10)
    out = list(data.batches(x, y, 3, order))
    assert len(out) == 3 == data.steps_per_epoch(10, 3)
    for i, (xb, yb) in enumerate(out):
        assert xb.shape == (3, 3) and yb.shape == (3,)
        np.testing.assert_array_equal(yb, order[3 * i : 3 * i + 3])
        np.testing.assert_array_equal(xb, x[yb])
    seen = np.concatenate([yb for _, yb in out])
    assert len(np.unique(seen)) == 9 and order[9] not in seen
    assert [len(yb) for _, yb in data.batches(x, y, 10, order)] == [10]
    assert [len(yb) for _, yb in data.batches(x, y, 1, order)] == [1] * 10


@pytest.mark.parametrize("batch_size", [0, -1, 11])
def test_batch_size_must_fit_the_training_set(batch_size):
    x, y = np.zeros((10, 2)), np.zeros(10)
    message = rf"batch size must be between 1 and the number of training samples \(10\), got {batch_size}"
    with pytest.raises(DataError, match=message):
        data.batches(x, y, batch_size, np.arange(10))  # refused at the call, before iterating
    with pytest.raises(DataError, match=message):
        data.steps_per_epoch(10, batch_size)


def test_x_and_y_must_have_the_same_length():
    with pytest.raises(DataError, match=r"x has 10 samples but y has 9"):
        data.batches(np.zeros((10, 2)), np.zeros(9), 2, np.arange(10))
    with pytest.raises(DataError, match=r"x has 10 samples but y has 9"):
        data.evaluation_batches(np.zeros((10, 2)), np.zeros(9), 2)


def test_evaluation_batches_cover_every_sample_once_in_order():
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int32)
    out = list(data.evaluation_batches(x, y, 4))
    assert [len(yb) for _, yb in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in out]), x)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in out]), y)
    assert [len(yb) for _, yb in data.evaluation_batches(x, y, 64)] == [10]
    with pytest.raises(DataError, match=r"batch size must be at least 1, got 0"):
        data.evaluation_batches(x, y, 0)


# Token sequences

WORD_LIST = Path("/usr/share/dict/words")


def write_words(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


SMALL_LIST = ["Cab", "cab", "a", "it's", "café", "", "zebra", "Ab", "ab", "dog", "éclair", "x-ray", "cat", "ox"]
KEPT = ["a", "ab", "cab", "cat", "dog", "ox", "zebra"]  # lower-cased, a–z only, once each, sorted


def test_words_lower_cased_a_to_z_deduplicated_and_bounded(tmp_path):
    w = data.words(seed=3, path=write_words(tmp_path / "words", SMALL_LIST), test_fraction=0.3)
    assert (w.name, w.boundary, w.vocab[:3], len(w.vocab), w.length) == ("words", ".", (".", "a", "b"), 27, 6)
    assert w.tokens_train.dtype == w.tokens_test.dtype == np.int32 and w.mask_train.dtype == bool
    assert w.tokens_train.shape == (5, 7) and w.tokens_test.shape == (2, 7)  # 2 = round(0.3 · 7)
    rows = [w.decode(r) for r in np.concatenate([w.tokens_train, w.tokens_test])]
    assert sorted(r.strip(".") for r in rows) == KEPT
    assert all(r == f".{r.strip('.')}." + "." * (5 - len(r.strip("."))) for r in rows)  # padded with "."
    train = [w.decode(r).strip(".") for r in w.tokens_train]
    assert train == sorted(train)  # each part in alphabetical order
    # The targets of ".cab." are c, a, b, "." — four of them count, the padding's do not.
    tokens = np.concatenate([w.tokens_train, w.tokens_test])
    mask = np.concatenate([w.mask_train, w.mask_test])
    cab = [r.strip(".") for r in rows].index("cab")
    inputs, targets = data.inputs_and_targets(tokens[cab : cab + 1])
    assert w.decode(inputs[0]) == ".cab.." and w.decode(targets[0]) == "cab..."
    assert mask[cab].tolist() == [True] * 4 + [False] * 2
    assert all(m.sum() == len(r.strip(".")) + 1 and m[: m.sum()].all() for m, r in zip(w.mask_train, train))


def test_words_split_is_fixed_by_the_seed(tmp_path):
    path = write_words(tmp_path / "words", [f"w{'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10]}" for i in range(100)])
    a, b, c = data.words(seed=1, path=path), data.words(seed=1, path=path), data.words(seed=2, path=path)
    assert len(a.tokens_test) == 10 and len(a.tokens_train) == 90  # the default 90/10
    np.testing.assert_array_equal(a.tokens_test, b.tokens_test)
    assert not np.array_equal(a.tokens_test, c.tokens_test)
    together = {a.decode(r) for r in np.concatenate([a.tokens_train, a.tokens_test])}
    assert len(together) == 100 and not {a.decode(r) for r in a.tokens_train} & {a.decode(r) for r in a.tokens_test}


def test_words_errors(tmp_path):
    with pytest.raises(DataError, match=r"words: no word list at .*nowhere \(on Debian: apt install wamerican\)"):
        data.words(path=tmp_path / "nowhere")
    (tmp_path / "latin1").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"words: .*latin1 is not UTF-8 text: byte 3 is 0xe9"):
        data.words(path=tmp_path / "latin1")
    with pytest.raises(DataError, match=r"has 1 words of a–z only; test_fraction 0.1 must leave at least one on each"):
        data.words(path=write_words(tmp_path / "one", ["Hello", "it's"]))


def test_text_windows_share_one_character(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("héllo wörld, hello again!\n" * 3, encoding="utf-8")  # 78 characters
    t = data.text(path, block=8)
    content = path.read_text(encoding="utf-8")
    assert (t.name, t.boundary, t.length) == (f"text:{path}", None, 8)
    assert t.vocab == tuple(sorted(set(content))) and "ö" in t.vocab
    # (78 − 1) // 8 = 9 windows; the last round(0.9) = 1 is the test set, the 5-character tail dropped.
    assert t.tokens_train.shape == (8, 9) and t.tokens_test.shape == (1, 9)
    windows = [t.decode(r) for r in np.concatenate([t.tokens_train, t.tokens_test])]
    assert windows == [content[8 * i : 8 * i + 9] for i in range(9)]
    assert t.mask_train.all() and t.mask_test.all() and t.mask_train.shape == (8, 8)
    assert t.decode(t.encode("wörld")) == "wörld"
    with pytest.raises(DataError, match=r"characters \['Z'\] are not in the vocabulary of"):
        t.encode("Zoo")


def test_text_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(DataError, match=r"text: .*short.txt has 10 characters; windows of 9 need at least 17"):
        data.text(short, block=8)
    with pytest.raises(DataError, match=r"text: block must be a positive int, got 0"):
        data.text(short, block=0)
    with pytest.raises(DataError, match=r"text: no file '.*missing.txt'"):
        data.load_sequences(f"text:{tmp_path / 'missing.txt'}")
    (tmp_path / "binary").write_bytes(b"abc\xff\xfe" * 40)
    with pytest.raises(DataError, match=r"text: .*binary is not UTF-8 text: byte 3 is 0xff"):
        data.text(tmp_path / "binary")


@pytest.mark.parametrize("spec", ["text:", "Words", "chars", ""])
def test_load_sequences_refuses_unknown_specs(spec):
    with pytest.raises(DataError, match=rf"unknown sequence dataset {spec!r}; expected one of: words, text:PATH"):
        data.load_sequences(spec)


@pytest.mark.parametrize("spec", ["words", "text:/tmp/x.txt"])
def test_load_says_a_sequence_dataset_is_not_images_or_points(spec):
    with pytest.raises(DataError, match=rf"{spec!r} is a sequence dataset .* read by data.load_sequences"):
        data.load(spec)


def test_sequences_batch_like_the_other_datasets(tmp_path):
    w = data.words(path=write_words(tmp_path / "words", KEPT * 2 + ["b", "bb", "bbb"]), test_fraction=0.2)
    out = list(data.batches(w.tokens_train, w.mask_train, 3, data.epoch_order(0, 0, len(w.tokens_train))))
    assert len(out) == len(w.tokens_train) // 3
    assert all(tokens.shape == (3, w.length + 1) and mask.shape == (3, w.length) for tokens, mask in out)


def test_the_word_list():
    if not WORD_LIST.is_file():
        pytest.skip(f"no word list at {WORD_LIST}: apt install wamerican")
    w = data.load_sequences("words")
    assert len(w.tokens_train) + len(w.tokens_test) == 73445  # wamerican's words, lower-cased, a–z only
    assert (len(w.tokens_test), len(w.vocab), w.length) == (7344, 27, 23)  # round(7344.5), the longest word 22
    assert int(w.mask_train.sum() + w.mask_test.sum()) == 667584  # 73,445 words of 8.09 letters, plus the ends
