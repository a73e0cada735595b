"""Datasets for ``manualgrad train``, all available offline, and the order they are fed in.

Images are float32 NHWC with values in ``[0, 1]``, points are float32 ``(N, d)`` rows, and
labels are int32 class indices. ``load("digits" | "xor" | "spirals" | "moons" | "idx:PATH")``
picks one; ``idx:PATH`` reads MNIST-format IDX files (e.g. Fashion-MNIST) from a directory
(:mod:`~manualgrad.train.idx_format`).

Token sequences for next-token models (a GPT, an LSTM) are :class:`Sequences`:
``load_sequences("words" | "text:PATH")`` (:data:`SEQUENCE_SPECS`); their convention (token ids,
the boundary token, padding and the target mask) is in the class's docstring.

Every random choice depends only on an explicit seed: the train/test split on the dataset's
seed, and the order of an epoch on ``(seed, epoch)`` alone (:func:`epoch_order`), so a run
resumed at any epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from manualgrad import extras
from manualgrad.text import counted
from manualgrad.train.errors import DataError
from manualgrad.train.idx_format import read_idx

SPECS = ("digits", "xor", "spirals", "moons", "idx:PATH")

_SHOWN = 4  # names of a folder an error lists at most
IDX_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split; ``x`` is float32 (images NHWC in ``[0, 1]``, points ``(N, d)``),
    ``y`` int32 class indices below ``classes``."""

    name: str
    x_train: np.ndarray = dataclasses.field(repr=False)
    y_train: np.ndarray = dataclasses.field(repr=False)
    x_test: np.ndarray = dataclasses.field(repr=False)
    y_test: np.ndarray = dataclasses.field(repr=False)
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. ``(8, 8, 1)`` or ``(2,)``."""
        return self.x_train.shape[1:]

    @property
    def is_image(self) -> bool:
        return self.x_train.ndim == 4


def load(spec: str, seed: int = 0) -> Dataset:
    """The dataset named by ``spec``: one of :data:`SPECS`; ``seed`` picks the split of the
    built-in datasets (IDX files come split already)."""
    if spec.startswith("idx:") and len(spec) > len("idx:"):
        return idx(spec[len("idx:") :])
    if spec == "words" or spec.startswith("text:"):
        raise DataError(
            f"{spec!r} is a sequence dataset (token ids for a next-token model, read by data.load_sequences), "
            f"not images or points; expected one of: {', '.join(SPECS)}"
        )
    builders = {"digits": digits, "xor": xor, "spirals": spirals, "moons": moons}
    if spec not in builders:
        raise DataError(f"unknown dataset {spec!r}; expected one of: {', '.join(SPECS)}")
    return builders[spec](seed=seed)


def _split(name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, classes: int) -> Dataset:
    """A stratified split holding out ``round(test_fraction · N)`` samples, chosen by ``seed``.

    The samples are shuffled, grouped by class (stable, so the shuffle survives within each
    class), and every ``1 / test_fraction``-th one is held out: each class gives its share to
    within one sample. Both parts keep the original order of ``x``.
    """
    n = len(x)
    n_test = round(test_fraction * n) if 0 < test_fraction < 1 else 0
    if not 0 < n_test < n:
        raise DataError(
            f"{name}: test_fraction must leave at least one sample on each side of the split, "
            f"got {test_fraction} of {n} samples"
        )
    shuffled = np.random.default_rng(seed).permutation(n)
    grouped = shuffled[np.argsort(y[shuffled], kind="stable")]
    held_out = np.zeros(n, bool)
    held_out[grouped[((np.arange(n_test) + 0.5) * n / n_test).astype(int)]] = True
    return Dataset(
        name=name,
        x_train=np.asarray(x[~held_out], np.float32),
        y_train=np.asarray(y[~held_out], np.int32),
        x_test=np.asarray(x[held_out], np.float32),
        y_test=np.asarray(y[held_out], np.int32),
        classes=classes,
    )


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), ``(N, 8, 8, 1)``."""
    datasets = extras.require("sklearn.datasets", "train", "the digits data set")  # here: its import takes a while
    bunch = datasets.load_digits()
    x = (bunch.images / 16.0)[..., None]
    return _split("digits", x, bunch.target, seed, test_fraction, classes=10)


def xor(seed: int = 0, n: int = 1000, test_fraction: float = 0.2) -> Dataset:
    """Points uniform in ``[-1, 1]²``, class 1 where ``x0 · x1 > 0`` (first and third quadrants)."""
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, (n, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)
    return _split("xor", x, y, seed, test_fraction, classes=2)


def spirals(seed: int = 0, n: int = 1000, noise: float = 0.05, test_fraction: float = 0.2) -> Dataset:
    """Two interleaved spirals of 1.5 turns, radius 0.1 to 1, plus Gaussian noise of std ``noise``.

    A point of class ``k`` at radius ``r`` sits at angle ``3π r + π k``, so the arms are
    ``1/3`` apart radially; classes have ``n // 2`` and ``n - n // 2`` points.
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 2).astype(np.int32)
    r = np.sqrt(rng.uniform(0.01, 1.0, n))  # uniform in area between radii 0.1 and 1
    angle = 3 * np.pi * r + np.pi * y
    x = r[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x = x + noise * rng.standard_normal((n, 2))
    return _split("spirals", x, y, seed, test_fraction, classes=2)


def moons(seed: int = 0, n: int = 1000, noise: float = 0.1, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's two interleaving half circles, centred on the origin (``make_moons - (0.5, 0.25)``)."""
    datasets = extras.require("sklearn.datasets", "train", "the moons data set")  # here: its import takes a while
    x, y = datasets.make_moons(n, noise=noise, random_state=seed)
    return _split("moons", x - np.array([0.5, 0.25]), y, seed, test_fraction, classes=2)


def idx(path: str | os.PathLike) -> Dataset:
    """MNIST-format IDX files in the directory ``path`` (:data:`IDX_FILES`, each raw or ``.gz``; ``~`` expanded).

    Images of shape ``(N, H, W)`` gain a channel axis; uint8 images are scaled by ``1/255``,
    floating ones kept as they are. ``classes`` is the largest label plus one, at least 2.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataError(f"idx: {os.fspath(path)!r} is not a directory")
    present = sorted(p.name for p in directory.iterdir())
    arrays = {}
    for role, stem in IDX_FILES.items():
        name = next((n for n in (stem, stem + ".gz") if n in present), None)
        if name is None:
            expected = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
            raise DataError(
                f"idx: {directory} has no {role} file {stem}[.gz]; expected {expected}; found {_found(present)}"
            )
        arrays[role] = (directory / name, read_idx(directory / name))
    x_train, y_train = _idx_pair(*arrays["train images"], *arrays["train labels"])
    x_test, y_test = _idx_pair(*arrays["test images"], *arrays["test labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"idx: train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]} "
            "(height, width, channels)"
        )
    classes = max(2, int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1)
    return Dataset(f"idx:{os.fspath(path)}", x_train, y_train, x_test, y_test, classes)


def _found(names: list[str]) -> str:
    """What a folder holds, as an error shows it: the few names that look like IDX files, and how many others."""
    like = [n for n in names if "idx" in n or "ubyte" in n]
    others = len(names) - len(like)
    if not like:
        return f"no IDX file among its {counted(others, 'entry', 'entries')}" if others else "nothing"
    shown = ", ".join(like[:_SHOWN]) + (f" and {len(like) - _SHOWN} more" if len(like) > _SHOWN else "")
    return shown + (f" (and {counted(others, 'other entry', 'other entries')})" if others else "")


def _idx_pair(
    image_path: Path, images: np.ndarray, label_path: Path, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Checks and converts one images file and its labels file to NHWC float32 and int32."""
    if images.ndim not in (3, 4):
        raise DataError(f"{image_path}: images must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255
    elif not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{image_path}: images must be uint8 (0..255) or floating point, got {images.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{label_path}: labels must be one axis of integers, got {labels.dtype} of shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(f"{image_path.name} has {len(images)} images but {label_path.name} has {len(labels)} labels")
    if labels.size and labels.min() < 0:
        raise DataError(f"{label_path}: labels must be class indices ≥ 0, found {labels.min()}")
    x = images if images.ndim == 4 else images[..., None]
    return np.asarray(x, np.float32), labels.astype(np.int32)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``n`` training samples for ``epoch``: a function of ``(seed, epoch)`` only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches in an epoch of ``n`` samples (the remainder is dropped)."""
    _check_batch_size(batch_size, n)
    return n // batch_size


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, order: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Full batches of ``(x, y)`` taken in ``order``; the last ``len(order) % batch_size``
    samples are dropped so that every batch has the same shape (one compilation under jit).
    A bad ``batch_size`` is refused here, not at the first batch."""
    _same_length(x, y)
    _check_batch_size(batch_size, len(x))
    order = np.asarray(order)
    starts = range(0, len(order) - batch_size + 1, batch_size)
    return ((x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in starts)


def evaluation_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every sample exactly once, in order; the last batch may be smaller."""
    _same_length(x, y)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))


def _check_batch_size(batch_size: int, n: int) -> None:
    if not 1 <= batch_size <= n:
        raise DataError(f"batch size must be between 1 and the number of training samples ({n}), got {batch_size}")


def _same_length(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}")


# Token sequences

SEQUENCE_SPECS = ("words", "text:PATH")
WORDS = Path("/usr/share/dict/words")  # Debian's wamerican
BOUNDARY = "."
TEXT_BLOCK = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Sequences:
    """Token sequences for next-token prediction, one row a sequence, split into train and test.

    ``tokens_train`` and ``tokens_test`` are int32 ``(N, L + 1)``: token ids, indices into
    ``vocab`` (one character each). A model reads ``row[:-1]`` and predicts ``row[1:]``
    (:func:`inputs_and_targets`): at position ``t`` it has seen tokens ``0..t`` and predicts
    token ``t + 1``. ``mask_train`` and ``mask_test`` are bool ``(N, L)``, True where that target
    counts. The loss is the mean over the counted targets (nats per token, here per character)
    and the accuracy the fraction of them predicted.

    Variable-length sequences (words) begin and end with the ``boundary`` token (``"."``, id 0):
    ``"cab"`` is ``. c a b .`` and its targets ``c a b .`` all count — ending the word is a
    prediction too. Shorter rows are padded at the end with the boundary id and those targets
    masked out; padding sits after every counted target, so a causal model (attention masked to
    the past, or an LSTM run forward) computes the same counted predictions as on the unpadded
    row. Fixed-length windows of a text have no boundary (``None``) and every target counts.
    Batches are :func:`batches` of ``(tokens, mask)`` pairs, in :func:`epoch_order`.
    """

    name: str
    vocab: tuple[str, ...] = dataclasses.field(repr=False)
    tokens_train: np.ndarray = dataclasses.field(repr=False)
    mask_train: np.ndarray = dataclasses.field(repr=False)
    tokens_test: np.ndarray = dataclasses.field(repr=False)
    mask_test: np.ndarray = dataclasses.field(repr=False)
    boundary: str | None

    @property
    def length(self) -> int:
        """``L``, the number of predictions per row."""
        return self.tokens_train.shape[1] - 1

    def encode(self, text: str) -> np.ndarray:
        """The token ids of ``text``, one per character (a character outside ``vocab`` is refused)."""
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise DataError(f"{self.name}: characters {unknown} are not in the vocabulary of {len(self.vocab)}")
        return _ids(text, self.vocab)

    def decode(self, ids) -> str:
        """The characters of token ids ``ids``."""
        return "".join(self.vocab[int(i)] for i in np.ravel(ids))


def inputs_and_targets(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens[:, :-1], tokens[:, 1:])``: what a next-token model reads and what it predicts."""
    return tokens[:, :-1], tokens[:, 1:]


def load_sequences(spec: str, seed: int = 0) -> Sequences:
    """The sequences named by ``spec``, one of :data:`SEQUENCE_SPECS`; ``seed`` picks the words' split."""
    if spec == "words":
        return words(seed=seed)
    if spec.startswith("text:") and len(spec) > len("text:"):
        return text(spec[len("text:") :])
    raise DataError(f"unknown sequence dataset {spec!r}; expected one of: {', '.join(SEQUENCE_SPECS)}")


def _read_utf8(path: Path, name: str) -> str:
    if not path.is_file():
        raise DataError(f"{name}: no file {os.fspath(path)!r}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {os.fspath(path)} is not UTF-8 text: byte {e.start} is {raw[e.start]:#04x}") from None


def words(seed: int = 0, path: str | os.PathLike = WORDS, test_fraction: float = 0.1) -> Sequences:
    """A word list as sequences of characters: every line lower-cased, kept if it is a–z only,
    duplicates removed (Debian's wamerican gives 73,445 words), each word ``.word.`` with the
    boundary token at both ends; ``round(test_fraction · N)`` words held out by a shuffle seeded
    with ``seed``. Both parts are in alphabetical order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"words: no word list at {os.fspath(path)} (on Debian: apt install wamerican)")
    lines = _read_utf8(path, "words").splitlines()
    kept = sorted({w for w in (line.strip().lower() for line in lines) if re.fullmatch("[a-z]+", w)})
    n_test = round(test_fraction * len(kept)) if 0 < test_fraction < 1 else 0
    if not 0 < n_test < len(kept):
        raise DataError(
            f"words: {os.fspath(path)} has {len(kept)} words of a–z only; test_fraction {test_fraction} must leave "
            "at least one on each side of the split"
        )
    held_out = np.zeros(len(kept), bool)
    held_out[np.random.default_rng(seed).permutation(len(kept))[:n_test]] = True
    vocab = (BOUNDARY, *"abcdefghijklmnopqrstuvwxyz")
    length = max(map(len, kept)) + 1
    tokens, mask = _padded(kept, vocab, length)
    return Sequences("words", vocab, tokens[~held_out], mask[~held_out], tokens[held_out], mask[held_out], BOUNDARY)


def _padded(items: list[str], vocab: tuple[str, ...], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``. w .`` padded with the boundary id to ``length + 1`` tokens, and their target masks."""
    sizes = np.array([len(w) for w in items])
    ids = _ids("".join(items), vocab)
    rows = np.repeat(np.arange(len(items)), sizes)
    columns = 1 + np.arange(len(ids)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    tokens = np.zeros((len(items), length + 1), np.int32)
    tokens[rows, columns] = ids
    return tokens, np.arange(length) <= sizes[:, None]


def _ids(content: str, vocab: tuple[str, ...]) -> np.ndarray:
    """The index in ``vocab`` of every character of ``content`` (each one in ``vocab``)."""
    codes = np.frombuffer(content.encode("utf-32-le"), np.uint32)
    points = np.array([ord(c) for c in vocab], np.uint32)
    order = np.argsort(points)
    return order[np.searchsorted(points[order], codes)].astype(np.int32)


def text(path: str | os.PathLike, block: int = TEXT_BLOCK, test_fraction: float = 0.1) -> Sequences:
    """A UTF-8 text file, character by character, in windows of ``block + 1`` characters.

    Window ``i`` is ``text[i·block : (i + 1)·block + 1]``: consecutive windows share one
    character, so every character but the first is predicted exactly once. The vocabulary is
    the file's characters, sorted. The last ``round(test_fraction · windows)`` windows (at least
    one) are the test set: the split is by position, so no test window overlaps a training one
    by more than that shared character. A tail shorter than a window is dropped.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise DataError(f"text: block must be a positive int, got {block!r}")
    path = Path(path).expanduser()
    content = _read_utf8(path, "text")
    windows = (len(content) - 1) // block
    if windows < 2:
        raise DataError(
            f"text: {os.fspath(path)} has {len(content)} characters; windows of {block + 1} need at least "
            f"{2 * block + 1} for one window on each side of the split"
        )
    vocab = tuple(sorted(set(content)))
    ids = _ids(content[: windows * block + 1], vocab)
    tokens = np.stack([ids[i * block : (i + 1) * block + 1] for i in range(windows)])
    n_test = min(max(1, round(test_fraction * windows)), windows - 1)
    mask = np.ones((windows, block), bool)
    cut = windows - n_test
    return Sequences(f"text:{os.fspath(path)}", vocab, tokens[:cut], mask[:cut], tokens[cut:], mask[cut:], None)
