"""The folder a training run writes into.

Without an ``out`` folder every run gets a folder of its own, ``runs/<start time>`` (``-2``,
``-3``, … within one second; created with an exclusive ``mkdir``, so two runs never share one),
and ``runs/latest`` names the newest: a relative symlink, or where the file system has none a text
file holding the folder's name (resuming ``runs/latest`` follows either). An ``out`` folder that
already holds a run is refused unless ``overwrite`` (which deletes that run's files first) or
``resume`` names it; a resumed run continues in its own folder, and only with the arguments it
was started with.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import secrets
import sys
from pathlib import Path

from manualgrad.text import counted
from manualgrad.train import checkpoint
from manualgrad.train import distributed as multiprocess
from manualgrad.train.config import ADDED_LATER, RUN_DEFINING, RUNS, Config, acting, described
from manualgrad.train.errors import ConfigError
from manualgrad.train.step import SCHEDULED

LATEST = "latest"
RUN_FILES = ("metrics.csv", "curves.png", "samples.txt")  # with the checkpoints, what marks a folder as holding a run


def followed(path: Path) -> Path:
    """``runs/latest`` as the folder it names (a symlink, or a text file holding the name); other paths as they are."""
    if path.is_symlink():
        return path.parent / os.readlink(path)
    if path.name == LATEST and path.is_file():
        return path.parent / path.read_text().strip()
    return path


def run_files(directory: Path) -> list[Path]:
    """The files of a training run in ``directory``: metrics, curves, checkpoints, temporaries of either."""
    if not directory.is_dir():
        return []
    named = [directory / name for name in RUN_FILES if (directory / name).is_file()]
    temporary = sorted([*directory.glob(".checkpoint-*.tmp"), *directory.glob("metrics.csv.tmp")])
    return named + checkpoint.checkpoints(directory) + temporary


def directory(config: Config) -> Path | None:
    """Where the run writes: its ``resume`` folder, ``out``, or ``None`` for a new folder; refuses clashes.

    Reads the file system only, so that a refused run has touched nothing.
    """
    if config.resume is not None:
        return _resumed(config)
    if config.out is None:
        if config.overwrite:
            raise ConfigError(
                "{overwrite} needs {out:DIR}; without {out} every run gets a new folder under {runs}/ and nothing "
                "is overwritten",
                runs=RUNS,
            )
        return None
    out = followed(Path(config.out))
    if out.exists() and not out.is_dir():
        raise ConfigError("{out} {path} is a file, not a folder", path=config.out)
    found = run_files(out)
    if found and not config.overwrite:
        listed = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            "{out} {path} already holds a run ({listed}); nothing was written: continue it with {resume} {path}, "
            "replace it with {overwrite}, or choose another {out}",
            path=config.out,
            listed=listed,
        )
    return out


def _resumed(config: Config) -> Path:
    """The folder of the run ``config.resume`` names, which ``out`` may name too and ``overwrite`` may not."""
    resume = followed(Path(config.resume))
    if config.overwrite:
        raise ConfigError(
            "{overwrite} and {resume} contradict each other: {resume} continues the run in {path}, {overwrite} "
            "would delete it",
            path=config.resume,
        )
    if config.out is not None and os.path.realpath(followed(Path(config.out))) != os.path.realpath(resume):
        raise ConfigError(
            "{resume} {path} continues the run in {path}, but {out} {other} names another folder: drop {out} "
            "(or give {out} {path})",
            path=config.resume,
            other=config.out,
        )
    return resume


def refuse_another_run(config: Config, directory: Path) -> None:
    """Compares the run-defining fields with those of the newest readable checkpoint in ``directory``."""
    paths = checkpoint.checkpoints(directory)
    if not paths:
        raise ConfigError("{resume} {path}: no checkpoint there", path=config.resume)
    for path in reversed(paths):
        try:
            saved = checkpoint.read_meta(path).get("config")
        except checkpoint.CheckpointError:
            continue  # checkpoint.latest names it, or all of them
        if not isinstance(saved, dict) or not set(RUN_DEFINING) - set(ADDED_LATER) <= set(saved):
            raise ConfigError(
                "{resume} {path}: {name} was not written by manualgrad train (it does not record the run's arguments)",
                path=config.resume,
                name=path.name,
            )
        now = dataclasses.asdict(config)
        saved = {**{k: getattr(Config(), k) for k in ADDED_LATER}, **saved}
        defining = (*RUN_DEFINING, "epochs") if config.optimizer in SCHEDULED else RUN_DEFINING  # the schedule's length
        keys = [k for k in defining if acting(saved, k) != acting(now, k)]
        if keys:
            raise ConfigError(
                "{resume} {path} holds another run: it was trained with "
                + described(saved, keys)
                + ", this command asks for "
                + described(now, keys)
                + "; give the run's own arguments to resume it, or start a new run without {resume}",
                path=config.resume,
            )
        return


def new_run_folder(root: Path, now: datetime.datetime | None = None) -> Path:
    """Creates and returns ``root/<now>`` (``2026-12-01T08-42-11``, then ``…-2``, ``-3``, … if taken).

    ``mkdir`` without ``exist_ok`` is atomic, so two runs started in the same second never share a folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    for suffix in itertools.chain([""], (f"-{n}" for n in itertools.count(2))):
        folder = root / f"{stamp}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def point_latest(folder: Path) -> str | None:
    """Makes ``latest`` beside ``folder`` name it, atomically; returns a warning instead if ``latest`` is a folder.

    ``latest`` is a relative symlink, or where symlinks cannot be made a text file holding the folder's name.
    A real folder called ``latest`` (the default ``out`` of earlier versions) is left as it is.
    """
    latest = folder.parent / LATEST
    if latest.is_dir() and not latest.is_symlink():
        return (
            f"{latest} is a folder of its own (a run of an earlier manualgrad): left as it is, "
            f"so it does not name {folder}"
        )
    temporary = folder.parent / f".{LATEST}-{secrets.token_hex(4)}"
    try:
        os.symlink(folder.name, temporary, target_is_directory=True)
    except OSError:  # e.g. Windows without the privilege to create symlinks
        temporary.write_text(folder.name + "\n")
    os.replace(temporary, latest)
    return None


def open_directory(config: Config, directory: Path | None) -> tuple[Path, Path | None]:
    """Creates the run's folder (clearing an old run with ``overwrite``); returns it and ``runs/latest`` if set.

    Processes other than the writer touch nothing and get ``directory`` (never ``None`` for them:
    :func:`~manualgrad.train.config.validate`)."""
    if not multiprocess.is_writer():
        return directory, None
    if directory is None:
        out = new_run_folder(RUNS)
        warning = point_latest(out)
        if warning:
            print(f"manualgrad train: {warning}", file=sys.stderr)
        print(f"run folder {out}" + ("" if warning else f" ({RUNS / LATEST} names it)"), flush=True)
        return out, None if warning else RUNS / LATEST
    if config.resume is None:
        old = run_files(directory) if config.overwrite else []
        for path in old:
            path.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        deleted = f" (deleted the {counted(len(old), 'file')} of the run it held)" if old else ""
        print(f"run folder {directory}{deleted}", flush=True)
    return directory, None
