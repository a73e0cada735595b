"""Checkpoints that lose nothing: atomic ``.npz`` files of a training-state pytree.

Format: one numpy ``.npz`` per checkpoint, ``checkpoint-{step:08d}.npz``, holding every leaf of
the state under its key path (``jax.tree_util.keystr``) and a JSON metadata entry: the format
version, the step, the caller's ``meta`` (epoch sums, metrics, arguments), each leaf's shape
and dtype, and a SHA-256 digest of all the arrays' bytes. Why ``.npz``: no dependency beyond
numpy, readable anywhere numpy is, exact for every dtype (bit-identical resumes need that), and
the zip layer's CRCs plus the digest catch truncated or damaged files.

Writing is atomic: the file is written under a temporary name in the same directory, flushed
and ``fsync``-ed, then ``os.replace``-d to its final name, and the directory is ``fsync``-ed. A
crash at any moment, SIGKILL included, leaves the previous checkpoint intact and never a
half-written file under a checkpoint name.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

VERSION = 1
_NAME = re.compile(r"checkpoint-(\d{8})\.npz$")
_META = "__meta__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the state it is loaded into."""


def _leaves(state: Any) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def checkpoints(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The checkpoint files in ``directory``, oldest (lowest step) first."""
    path = pathlib.Path(directory)
    if not path.is_dir():
        return []
    return sorted((p for p in path.iterdir() if _NAME.fullmatch(p.name)), key=lambda p: p.name)


def save(directory: str | os.PathLike, step: int, state: Any, meta: dict[str, Any], keep: int = 2) -> pathlib.Path:
    """Writes ``state`` and ``meta`` as ``directory/checkpoint-{step:08d}.npz`` atomically; keeps the newest ``keep``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _leaves(state)
    header = {"version": VERSION, "step": int(step), "meta": meta, "digest": _digest(arrays),
              "leaves": {k: [list(a.shape), a.dtype.str] for k, a in arrays.items()}}
    final = directory / f"checkpoint-{step:08d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{_META: np.frombuffer(json.dumps(header).encode(), np.uint8)}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in checkpoints(directory)[:-keep]:
        old.unlink()
    for stray in directory.glob(".checkpoint-*.tmp"):
        stray.unlink(missing_ok=True)
    return final


def load(path: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """Reads one checkpoint into the structure of ``template``; returns ``(state, meta)`` (``meta["step"]`` set)."""
    path = pathlib.Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt): {error}") from error
    if _META not in arrays:
        raise CheckpointError(f"checkpoint {path} has no metadata: not a manualgrad checkpoint")
    header = json.loads(arrays.pop(_META).tobytes().decode())
    if _digest(arrays) != header["digest"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its arrays do not match the digest written with them")
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in flat}
    missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} was written for a different model or optimizer: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, want in expected.items():
        got = arrays[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"checkpoint {path}: {key} is {got.dtype}{list(got.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
    state = jax.tree_util.tree_unflatten(treedef, [arrays[jax.tree_util.keystr(p)] for p, _ in flat])
    return state, {**header["meta"], "step": header["step"]}


def latest(directory: str | os.PathLike, template: Any) -> tuple[Any, dict[str, Any], list[str]] | None:
    """The newest intact checkpoint in ``directory`` as ``(state, meta, warnings)``; ``None`` if there is none.

    A newer checkpoint that is corrupt is skipped (never modified) and named in ``warnings``;
    if every checkpoint is corrupt, :class:`CheckpointError` names them all.
    """
    warnings: list[str] = []
    for path in reversed(checkpoints(directory)):
        try:
            state, meta = load(path, template)
        except CheckpointError as error:
            if "different model" in str(error) or "expected" in str(error):
                raise
            warnings.append(f"{error}; using the checkpoint before it")
            continue
        return state, meta, warnings
    if warnings:
        raise CheckpointError(f"every checkpoint in {directory} is damaged: " + "; ".join(warnings))
    return None
