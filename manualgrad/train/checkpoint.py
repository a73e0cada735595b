"""Checkpoints that lose nothing: atomic ``.npz`` files of a training-state pytree.

Format: one numpy ``.npz`` (an uncompressed zip of ``.npy`` files) per checkpoint, named
``checkpoint-{step:08d}.npz``. Every leaf of the state is stored under its key path
(``jax.tree_util.keystr``, e.g. ``['opt_state'][0].mu['w']``), and a JSON entry ``__meta__``
(UTF-8 bytes as a ``uint8`` array) records the format version, the step, the caller's ``meta``
(epoch, data-order seed, metrics so far, command-line arguments), each leaf's shape and dtype,
and a SHA-256 digest of every array's bytes.

Why ``.npz``: it needs no dependency beyond numpy, ``numpy.load`` reads it anywhere, it stores
every dtype exactly (a resumed run is bit-identical only if nothing is rounded), and the zip
layer keeps a CRC-32 of each entry. The digest is a second check on the arrays, so a damaged
byte that the zip layer misses is still caught. Dtypes that the ``.npy`` header cannot name
(``bfloat16`` and the other ``ml_dtypes``) are recorded by name and restored on load.

Writing is atomic: the file is written under a temporary name in the same directory, flushed
and ``fsync``-ed, ``os.replace``-d to its final name, and the directory is ``fsync``-ed; only
then are old checkpoints deleted. A crash at any moment, SIGKILL included, leaves the previous
checkpoint intact and never a half-written file under a checkpoint name. Stray temporary files
(``.checkpoint-*.tmp``) are ignored when loading and removed by the next :func:`save`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import pathlib
import re
import secrets
import zipfile
from typing import Any

import jax
import numpy as np

from manualgrad.errors import ManualgradError

VERSION = 1
_NAME = re.compile(r"checkpoint-(\d{8,})\.npz")
_META = "__meta__"
_SHOWN = 5  # leaf paths named in a mismatch message before "and N more"


class CheckpointError(ManualgradError, RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the state it is loaded into."""


class CheckpointMismatchError(CheckpointError):
    """An intact checkpoint whose leaves (paths, shapes or dtypes) differ from the template's."""


def _dtype_label(dtype: np.dtype) -> str:
    """``dtype.str``, or the name for dtypes the ``.npy`` header cannot describe (``bfloat16``)."""
    descr = np.lib.format.dtype_to_descr(dtype)
    return dtype.str if np.lib.format.descr_to_dtype(descr) == dtype else dtype.name


def _describe(shape: tuple[int, ...], dtype: np.dtype) -> str:
    return f"{dtype}{list(shape)}"


def _arrays(state: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        key = jax.tree_util.keystr(path)
        try:
            array = np.asarray(jax.device_get(leaf))
        except TypeError as error:  # e.g. a typed PRNG key: save jax.random.key_data(key) instead
            raise TypeError(f"checkpoint: leaf {key} cannot be stored as a numpy array: {error}") from error
        if array.dtype.hasobject:
            raise TypeError(f"checkpoint: leaf {key} is a Python object ({type(leaf).__name__}), not an array")
        arrays[key] = array
    return arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def _step(path: pathlib.Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The checkpoint files in ``directory``, oldest (lowest step) first; ``[]`` if there is none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.fullmatch(p.name) and p.is_file()]
    return sorted(found, key=_step)


def path_of(directory: str | os.PathLike, step: int) -> pathlib.Path:
    """Where :func:`save` writes the checkpoint of ``step`` in ``directory``."""
    return pathlib.Path(directory) / f"checkpoint-{step:08d}.npz"


def _fsync_directory(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | os.PathLike, step: int, state: Any, meta: dict[str, Any], keep: int = 2) -> pathlib.Path:
    """Writes ``state`` and ``meta`` to ``directory/checkpoint-{step:08d}.npz`` atomically; returns its path.

    ``state`` is any pytree of arrays (jax or numpy arrays, Python scalars); ``meta`` must be
    JSON-serialisable and comes back from :func:`load` as JSON gives it (tuples as lists).
    Afterwards only the newest ``keep`` checkpoints up to ``step`` are kept, and stray
    temporary files from interrupted saves are removed. Checkpoints of later steps (left by a
    run this one resumed before) are not deleted: this run overwrites them as it reaches them.
    """
    step = operator.index(step)
    if step < 0 or keep < 1:
        raise ValueError(f"checkpoint.save: step must be ≥ 0 and keep ≥ 1, got step {step}, keep {keep}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(state)
    header = {
        "version": VERSION,
        "step": step,
        "meta": meta,
        "leaves": {key: [list(a.shape), _dtype_label(a.dtype)] for key, a in arrays.items()},
        "digest": _digest(arrays),
    }
    encoded = np.frombuffer(json.dumps(header).encode(), np.uint8)  # before any file exists: meta may not be JSON
    final = path_of(directory, step)
    temporary = directory / f".checkpoint-{step:08d}-{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for key, array in {_META: encoded, **arrays}.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    for old in [p for p in checkpoints(directory) if _step(p) <= step][:-keep]:
        old.unlink(missing_ok=True)
    for stray in directory.glob(".checkpoint-*.tmp"):
        stray.unlink(missing_ok=True)
    return final


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every entry of the zip at ``path``, each checked against its CRC-32."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                with archive.open(name) as member:
                    arrays[name.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
                    if member.read(1):
                        raise ValueError(f"entry {name} has bytes after its array")
    except Exception as error:  # damage fails in many ways: zip directory, CRC, .npy header, short read
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {type(error).__name__}: {error}") from error
    return arrays


def _header(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Pops, parses and checks the metadata entry; restores dtypes recorded by name."""
    if _META not in arrays:
        raise CheckpointError(f"checkpoint {path} has no {_META} entry: not a manualgrad checkpoint")
    try:
        header = json.loads(arrays.pop(_META).tobytes().decode())
        if header["version"] != VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {header['version']}; this manualgrad reads version {VERSION}"
            )
        step, meta, leaves, digest = (header[k] for k in ("step", "meta", "leaves", "digest"))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path}: its {_META} entry is damaged: {error!r}") from error
    if set(leaves) != set(arrays):
        raise CheckpointError(f"checkpoint {path} is corrupt: its {_META} entry lists other leaves than it holds")
    for key, (shape, label) in leaves.items():
        array = arrays[key]
        if array.dtype.str != label and array.dtype.kind == "V":
            try:
                array = arrays[key] = array.view(np.dtype(label))
            except (TypeError, ValueError):
                pass  # reported just below
        if list(array.shape) != shape or _dtype_label(array.dtype) != label:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {key} is {_describe(array.shape, array.dtype)}, "
                f"but its {_META} entry records {label} {shape}"
            )
    if _digest(arrays) != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its arrays do not match the SHA-256 digest saved with them"
        )
    return {**meta, "step": step}


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` given to :func:`save` plus ``"step"``, without a template; the arrays are
    checked as by :func:`load`."""
    path = pathlib.Path(path)
    return _header(path, _read(path))


def _spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a template leaf (an array, a ``jax.ShapeDtypeStruct`` or a Python scalar)."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = np.asarray(leaf)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """Reads one checkpoint into the structure of ``template``; returns ``(state, meta)``.

    ``template`` is a pytree of the saved state's structure (e.g. freshly initialised
    parameters and optimizer state, or its ``jax.eval_shape``); it supplies the containers
    (dicts, lists, optax's NamedTuples and ``EmptyState``) that the file does not store.
    ``state`` holds numpy arrays with the saved dtypes, bit for bit; ``meta`` is the ``meta``
    given to :func:`save` plus ``"step"``.

    Raises :class:`CheckpointError` if the file is unreadable, truncated or corrupt, and
    :class:`CheckpointMismatchError` if its leaves differ from the template's.
    """
    path = pathlib.Path(path)
    arrays = _read(path)
    meta = _header(path, arrays)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(p): _spec(leaf) for p, leaf in flat}
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for a different model or optimizer: "
            + "; ".join(
                ([f"missing {_listed(missing)}"] if missing else [])
                + ([f"not in the template: {_listed(extra)}"] if extra else [])
            )
        )
    wrong = [
        f"{key} is {_describe(arrays[key].shape, arrays[key].dtype)} in the file, "
        f"the template expects {_describe(*expected[key])}"
        for key in expected
        if (arrays[key].shape, arrays[key].dtype) != expected[key]
    ]
    if wrong:
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the template: {_listed(wrong)}")
    return jax.tree_util.tree_unflatten(treedef, [arrays[key] for key in expected]), meta


def latest(directory: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any], list[str]] | None:
    """The newest intact checkpoint in ``directory`` as ``(state, meta, warnings)``; ``None`` if there is none.

    A newer checkpoint that is truncated or corrupt is skipped (never modified or deleted) and
    ``warnings`` says which file and why, for the caller to print. Raises
    :class:`CheckpointError` naming every file if none is intact, and
    :class:`CheckpointMismatchError` if the newest intact one does not fit ``template``.
    """
    damaged: list[str] = []
    for path in reversed(checkpoints(directory)):
        try:
            state, meta = load(path, template)
        except CheckpointMismatchError:
            raise
        except CheckpointError as error:
            damaged.append(str(error))
            continue
        return state, meta, [f"{reason}; skipped it and loaded {path.name} instead" for reason in damaged]
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {directory}: " + "; ".join(damaged))
    return None
