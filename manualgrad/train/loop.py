"""``manualgrad train``: jit-compiled training whose every gradient comes from a hand rule.

One step is one jitted program: the model's forward pass through the registered rules, the
hand-written backward rules (``jax.grad`` of a custom_vjp composition runs exactly those), and
the optax update. ``--grad autodiff`` differentiates the same model built from the rules'
plain-``jnp`` references instead, so the two can be compared run against run.

Data parallelism uses JAX's own sharding: a 1-D ``Mesh`` over ``--devices`` devices with axis
``data``; every batch is split along it (``NamedSharding(mesh, P("data"))``) and parameters and
optimizer state are replicated (``P()``). XLA inserts the all-reduce that the sum over the
batch in each gradient pass (``Oᵀ G``, ``1ᵀ G``) needs, so the step is the same program on one
device or many. With ``jax.distributed`` (``--coordinator``/``--num-processes``/``--process-id``
or ``--distributed auto``) the mesh spans the devices of every process and each feeds its block of
the global batch; process 0 alone writes (:mod:`manualgrad.train.distributed`).

``--norm`` puts a normalisation layer after every hidden convolution and dense layer, before
its ReLU, and ``--dropout`` a :func:`~manualgrad.nn.layers.Dropout` after every dense hidden
ReLU (:func:`~manualgrad.nn.layers.cnn`, :func:`~manualgrad.nn.layers.mlp`). The model's state
(batch norm's running statistics) is a pytree of its own beside the parameters: the jitted
step returns it updated, ``jax.grad`` and optax never see it, evaluation normalises with it.

Checkpoints (:mod:`manualgrad.train.checkpoint`) hold the parameters, the optimizer state, the
model's state, the step, the running sums of the current epoch, every finished epoch's metrics
and the arguments; the data order of epoch ``e`` is a pure function of ``(seed, e)``
(:func:`manualgrad.train.data.epoch_order`) and step ``s``'s dropout key of ``(seed, s)``
(:func:`step_keys`). A run resumed from a checkpoint therefore repeats the uninterrupted run bit for bit.

Nothing is lost or silently overwritten. Without ``--out`` every run gets a folder of its own,
``runs/<start time>`` (``-2``, ``-3``, … within one second; created with an exclusive ``mkdir``,
so two runs never share one), and ``runs/latest`` names the newest: a relative symlink, or where
the file system has none a text file holding the folder's name (``--resume runs/latest`` follows
either). ``--out DIR`` that already holds a run is refused unless ``--overwrite`` (which deletes
that run's files first) or ``--resume DIR``; a resumed run continues in its own folder. Ctrl-C
stops between two steps with a checkpoint of the current state (:class:`Interrupted`); a loss,
parameter or optimizer state that is no longer finite stops the run before anything of it is
saved (:class:`Diverged`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import itertools
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from manualgrad.nn import gpt, layers, recurrent
from manualgrad.train import checkpoint, data
from manualgrad.train import distributed as multiprocess  # `distributed` is also a Config field
from manualgrad.train.step import (
    SCHEDULED,
    cropped,
    cross_check,
    evaluate,
    loss_fn,
    make_step,
    optimizer,
    step_keys,
    targets,
)

METRICS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3, "adamw": 1e-2}  # adamw: tuned on the GPT
# Arguments that must match for --resume to continue the same run.
RUN_DEFINING = (
    "model",
    "dataset",
    "optimizer",
    "lr",
    "batch_size",
    "seed",
    "dtype",
    "grad",
    "norm",
    "dropout",
    "groups",
    "clip",
)
# What every process of a multi-process run must agree on (multiprocess.agree), besides the step.
AGREED = (*RUN_DEFINING, "epochs", "devices", "checkpoint_every", "cross_check_batches")
ADDED_LATER = ("norm", "dropout", "groups", "clip")  # runs saved before these existed had their defaults
DEFAULT_GROUPS = 4  # --norm group's groups: divides every width of the ready-made models
STATE = ("params", "opt_state", "model_state")  # what the jitted step carries from one step to the next
RUNS = Path("runs")  # where runs without --out get their folders, relative to the working directory
LATEST = "latest"
RUN_FILES = ("metrics.csv", "curves.png", "samples.txt")  # with the checkpoints, what marks a folder as holding a run
SEEDS = 2**32  # jax.random.PRNGKey wraps larger seeds around silently


class TrainError(ValueError):
    """A bad training configuration, named in the CLI's words."""


class Diverged(RuntimeError):
    """The loss, the parameters or the optimizer state stopped being finite; nothing of that state was saved."""


class Interrupted(Exception):
    """Ctrl-C: training stopped between two steps after checkpointing the state reached."""

    def __init__(self, step: int, path: Path, directory: Path, arguments: str) -> None:
        super().__init__(
            f"train: interrupted at step {step}; checkpoint saved to {path}; "
            f"resume with --resume {directory}{arguments}"
        )
        self.step, self.path, self.directory = step, path, directory


@dataclasses.dataclass(frozen=True)
class Config:
    """The arguments of ``manualgrad train``; see ``manualgrad train --help``."""

    model: str = "cnn"
    dataset: str = "digits"
    optimizer: str | None = None  # None: the model's (MODEL_DEFAULTS), as batch_size and epochs
    lr: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    seed: int = 0
    dtype: str = "float32"
    grad: str = "manual"
    norm: str = "none"
    dropout: float = 0.0
    groups: int | None = None
    clip: float | None = None
    out: str | None = None
    overwrite: bool = False
    checkpoint_every: int = 0
    resume: str | None = None
    devices: int | None = None
    cross_check_batches: int = 3
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: str | None = None
    process_timeout: float = multiprocess.DEFAULT_TIMEOUT

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def _either(names: Sequence[str]) -> str:
    """``"a, b or c"``."""
    *first, last = names
    return f"{', '.join(first)} or {last}" if first else last


# The arguments left out (None) take the model's values; a model not named here takes "*"'s.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {"optimizer": "adam", "batch_size": 32, "epochs": 10},
    "gpt": {"optimizer": "adamw", "batch_size": 64, "epochs": 10},
    **{
        kind: {"optimizer": d.optimizer, "batch_size": d.batch_size, "lr": d.lr, "clip": d.clip, "epochs": d.epochs}
        for kind, d in recurrent.DEFAULTS.items()
    },
}
DTYPES = ("float32", "float64")


def resolved(config: Config) -> Config:
    """``config`` with the arguments left out (``None``) set to the model's :data:`MODEL_DEFAULTS`."""
    defaults = MODEL_DEFAULTS.get(config.model, MODEL_DEFAULTS["*"])
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


# --norm NAME -> (groups, dtype) -> the layer after every hidden convolution and dense layer (None: none).
NORMS: dict[str, Callable[[int, Any], layers.Layer | None]] = {
    "none": lambda groups, dtype: None,
    "batch": lambda groups, dtype: layers.BatchNorm(dtype=dtype),
    "layer": lambda groups, dtype: layers.LayerNorm(dtype=dtype),
    "group": lambda groups, dtype: layers.GroupNorm(groups, dtype=dtype),
    "rms": lambda groups, dtype: layers.RMSNorm(dtype=dtype),
}


def _norm(config: Config, dtype: Any) -> layers.Layer | None:
    return NORMS[config.norm](_value(dataclasses.asdict(config), "groups"), dtype)


def _cnn(dataset: data.Dataset, config: Config, dtype: Any) -> layers.Layer:
    if not dataset.is_image:
        raise TrainError(
            f"train: --model cnn needs images (N, H, W, C); dataset {dataset.name} has inputs of shape "
            f"{dataset.input_shape}: use --model mlp"
        )
    return layers.cnn(dataset.classes, dtype=dtype, norm=_norm(config, dtype), dropout=config.dropout)


def _mlp(dataset: data.Dataset, config: Config, dtype: Any) -> layers.Layer:
    hidden = (128,) if dataset.is_image else (32, 32)
    return layers.mlp(dataset.classes, hidden, dtype, norm=_norm(config, dtype), dropout=config.dropout)


GPT = {"width": 64, "depth": 2, "heads": 4}  # the default GPT's shape


def _gpt(sequences: data.Sequences, config: Config, dtype: Any) -> layers.Layer:
    return gpt.gpt(len(sequences.vocab), sequences.length, dtype=dtype, **GPT)


def _char_model(kind: str) -> Callable[[data.Sequences, Config, Any], layers.Layer]:
    """``embedding → kind → dense`` of :data:`manualgrad.nn.recurrent.DEFAULTS`'s sizes for ``sequences``."""
    return lambda sequences, config, dtype: recurrent.char_model(kind, len(sequences.vocab), dtype=dtype)


# Sequence models map token ids (N, T) to logits (N, T, V) (manualgrad.nn.gpt's interface) and
# train on data.Sequences; a model named here gets that training path.
SEQUENCE_MODELS: dict[str, Callable[[data.Sequences, Config, Any], layers.Layer]] = {
    "gpt": _gpt,
    **{kind: _char_model(kind) for kind in recurrent.KINDS},
}
MODELS: dict[str, Callable[[Any, Config, Any], layers.Layer]] = {"cnn": _cnn, "mlp": _mlp, **SEQUENCE_MODELS}


def model(config: Config, dataset: data.Dataset | data.Sequences, dtype: Any) -> layers.Layer:
    """The ready-made model ``config.model`` (:data:`MODELS`) for ``dataset``, with ``config``'s norm and dropout."""
    if config.model not in MODELS:
        raise TrainError(f"train: --model must be {_either(tuple(MODELS))}, got {config.model!r}")
    return MODELS[config.model](dataset, config, dtype)


def mesh(devices: int | None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``devices`` local devices (all by default) of every
    process (:func:`~manualgrad.train.distributed.devices`)."""
    available = jax.local_devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise TrainError(
            f"train: --devices must be between 1 and {len(available)} (local {jax.default_backend()} "
            f"devices), got {devices}"
        )
    return Mesh(np.array(multiprocess.devices(n)), ("data",))


def _write_metrics(out: Path, rows: list[dict[str, float]]) -> None:
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "metrics.csv")


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` as floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in rows], marker="o", label=split)
    ax_loss.set(xlabel="epoch", ylabel="softmax cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _progress(total: int, initial: int, description: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=description,
        unit="step",
        leave=False,
        disable=not sys.stderr.isatty() or not multiprocess.is_writer(),
        dynamic_ncols=True,
    )


def validate(config: Config) -> None:
    """Raises :class:`TrainError` naming the flag of the first value that cannot run (``config`` :func:`resolved`)."""
    if config.model not in MODELS:
        raise TrainError(f"train: --model must be {_either(tuple(MODELS))}, got {config.model!r}")
    if config.dtype not in DTYPES:
        raise TrainError(f"train: --dtype must be {_either(DTYPES)}, got {config.dtype!r}")
    if config.epochs < 1 or config.batch_size < 1 or config.checkpoint_every < 0:
        raise TrainError(
            f"train: --epochs and --batch-size must be ≥ 1 and --checkpoint-every ≥ 0 "
            f"(got {config.epochs}, {config.batch_size}, {config.checkpoint_every})"
        )
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise TrainError(f"train: --lr must be a finite number > 0, got {config.lr:g}")
    if not 0 <= config.seed < SEEDS:
        raise TrainError(f"train: --seed must be an integer from 0 to {SEEDS - 1}, got {config.seed}")
    if config.cross_check_batches < 0:
        raise TrainError(
            f"train: --cross-check-batches must be ≥ 0 (0: no cross-check), got {config.cross_check_batches}"
        )
    if config.clip is not None and not (math.isfinite(config.clip) and config.clip > 0):
        raise TrainError(
            f"train: --clip must be a finite number > 0, the largest global gradient norm, got {config.clip:g}"
        )
    _validate_regularisers(config)
    _validate_task(config)
    multiprocess.validate(config)
    if multiprocess.requested(config) and config.out is None and config.resume is None:
        raise TrainError(
            "train: a multi-process run needs --out DIR (or --resume DIR), a folder every process sees at the same "
            f"path: the default {RUNS}/<start time> would differ between processes"
        )


def _is_sequence_spec(spec: str) -> bool:
    return spec == "words" or spec.startswith("text:")


def _validate_task(config: Config) -> None:
    """A sequence model on sequence data without ``--norm``/``--dropout``, any other model on the other data."""
    if config.model in SEQUENCE_MODELS:
        if not _is_sequence_spec(config.dataset):
            raise TrainError(
                f"train: --model {config.model} is a sequence model and needs --dataset "
                f"{_either(data.SEQUENCE_SPECS)}, got {config.dataset!r}"
            )
        if config.norm != "none" or config.dropout:
            raise TrainError(
                f"train: --norm and --dropout act on the hidden layers of cnn and mlp; --model {config.model} "
                f"takes neither{' (it has its own layer norms)' if config.model == 'gpt' else ''}: drop them "
                f"(got --norm {config.norm} --dropout {config.dropout:g})"
            )
    elif _is_sequence_spec(config.dataset):
        raise TrainError(
            f"train: --dataset {config.dataset} is token sequences for a sequence model "
            f"({_either(tuple(SEQUENCE_MODELS))}); --model {config.model} classifies images or feature vectors"
        )


def _validate_regularisers(config: Config) -> None:
    """``--norm``, ``--groups`` and ``--dropout``: each known, in range, and only where it acts."""
    if config.norm not in NORMS:
        raise TrainError(f"train: --norm must be {_either(tuple(NORMS))}, got {config.norm!r}")
    if not (math.isfinite(config.dropout) and 0 <= config.dropout < 1):
        raise TrainError(
            f"train: --dropout must be a number in [0, 1), the probability of dropping a hidden unit, "
            f"got {config.dropout:g}"
        )
    if config.groups is not None and config.norm != "group":
        raise TrainError(
            f"train: --groups is the number of channel groups of --norm group, and this run has --norm "
            f"{config.norm}: drop --groups, or give --norm group"
        )
    if config.groups is not None and config.groups < 1:
        raise TrainError(f"train: --groups must be ≥ 1, got {config.groups}")
    if config.norm == "batch" and config.batch_size < 2:
        raise TrainError(
            f"train: --norm batch normalises every unit over the batch and needs --batch-size ≥ 2, "
            f"got {config.batch_size}"
        )


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


def _directory(config: Config) -> Path | None:
    """Where the run writes: its ``--resume`` folder, ``--out``, or ``None`` for a new folder; refuses clashes.

    Reads the file system only, so that a refused command has touched nothing.
    """
    if config.resume is not None:
        resume = followed(Path(config.resume))
        if config.overwrite:
            raise TrainError(
                "train: --overwrite and --resume contradict each other: --resume continues the run "
                f"in {config.resume}, --overwrite would delete it"
            )
        if config.out is not None and os.path.realpath(followed(Path(config.out))) != os.path.realpath(resume):
            raise TrainError(
                f"train: --resume {config.resume} continues the run in {config.resume}, but --out "
                f"{config.out} names another folder: drop --out (or give --out {config.resume})"
            )
        return resume
    if config.out is None:
        if config.overwrite:
            raise TrainError(
                "train: --overwrite needs --out DIR; without --out every run gets a new folder under "
                f"{RUNS}/ and nothing is overwritten"
            )
        return None
    out = followed(Path(config.out))
    if out.exists() and not out.is_dir():
        raise TrainError(f"train: --out {config.out} is a file, not a folder")
    found = run_files(out)
    if found and not config.overwrite:
        listed = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise TrainError(
            f"train: --out {config.out} already holds a run ({listed}); nothing was written: continue "
            f"it with --resume {config.out}, replace it with --overwrite, or choose another --out"
        )
    return out


def _value(values: dict[str, Any], key: str) -> Any:
    """Argument ``key`` of ``values`` (a :class:`Config` as a dict) as it acts: ``lr`` with its default
    filled in, ``groups`` too under ``--norm group``."""
    if key == "lr" and values["lr"] is None:
        return DEFAULT_LR[values["optimizer"]]
    if key == "groups" and values["groups"] is None and values["norm"] == "group":
        return DEFAULT_GROUPS
    return values[key]


def _flags(values: dict[str, Any], keys: Sequence[str]) -> str:
    """``--model mlp --lr 0.003``: the arguments ``keys`` of ``values`` as the command line spells them
    (those that do not act, ``--groups`` without ``--norm group``, left out)."""
    acting = ((k, _value(values, k)) for k in keys)
    spelled = {k: f"{v:g}" if isinstance(v, float) else v for k, v in acting if v is not None}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in spelled.items())


def _refuse_another_run(config: Config, directory: Path) -> None:
    """Compares the run-defining arguments with those of the newest readable checkpoint in ``directory``."""
    paths = checkpoint.checkpoints(directory)
    if not paths:
        raise TrainError(f"train: --resume {config.resume}: no checkpoint there")
    for path in reversed(paths):
        try:
            saved = checkpoint.read_meta(path).get("config")
        except checkpoint.CheckpointError:
            continue  # checkpoint.latest names it, or all of them
        if not isinstance(saved, dict) or not set(RUN_DEFINING) - set(ADDED_LATER) <= set(saved):
            raise TrainError(
                f"train: --resume {config.resume}: {path.name} was not written by manualgrad train "
                "(it does not record the run's arguments)"
            )
        now = dataclasses.asdict(config)
        saved = {**{k: getattr(Config(), k) for k in ADDED_LATER}, **saved}
        defining = (*RUN_DEFINING, "epochs") if config.optimizer in SCHEDULED else RUN_DEFINING  # the schedule's length
        keys = [k for k in defining if _value(saved, k) != _value(now, k)]
        if keys:
            raise TrainError(
                f"train: --resume {config.resume} holds another run: it was trained with "
                f"{_flags(saved, keys)}, this command asks for {_flags(now, keys)}; give the run's own "
                "arguments to resume it, or start a new run without --resume"
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
    A real folder called ``latest`` (the default ``--out`` of earlier versions) is left as it is.
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


def _say(message: str) -> None:
    """Prints ``message`` on the process that writes the run's files (the only one, or process 0)."""
    if multiprocess.is_writer():
        print(message, flush=True)


def _open_directory(config: Config, directory: Path | None) -> tuple[Path, Path | None]:
    """Creates the run's folder (clearing an old run with ``--overwrite``); returns it and ``runs/latest`` if set.

    Processes other than the writer touch nothing and get ``directory`` (never ``None`` for them: :func:`validate`)."""
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
        print(
            f"run folder {directory}" + (f" (deleted the {len(old)} files of the run it held)" if old else ""),
            flush=True,
        )
    return directory, None


@dataclasses.dataclass(frozen=True, eq=False)
class _Run:
    """What a run is built from: the data, the model, the optimizer, the devices.

    ``(x, y)`` are images or features and their labels, or for a sequence model token rows and their
    target masks (:class:`~manualgrad.train.data.Sequences`)."""

    config: Config
    dataset: data.Dataset | data.Sequences
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    net: layers.Layer
    tx: optax.GradientTransformation
    loss: Callable
    devices: Mesh
    steps: int  # per epoch

    @classmethod
    def build(cls, config: Config) -> _Run:
        if config.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        dtype = jnp.dtype(config.dtype)
        sequences = config.model in SEQUENCE_MODELS
        if sequences:
            dataset = data.load_sequences(config.dataset, seed=config.seed)
            split = (dataset.tokens_train, dataset.mask_train, dataset.tokens_test, dataset.mask_test)
        else:
            dataset = data.load(config.dataset, seed=config.seed)
            split = (dataset.x_train.astype(dtype), dataset.y_train, dataset.x_test.astype(dtype), dataset.y_test)
        net = model(config, dataset, dtype)
        devices = mesh(config.devices)
        if config.batch_size % devices.devices.size:
            raise TrainError(
                f"train: --batch-size {config.batch_size} must be a multiple of the {devices.devices.size} devices of "
                f"the mesh (--devices on each of {jax.process_count()} process(es))"
            )
        steps = data.steps_per_epoch(len(split[0]), config.batch_size)
        return cls(
            config,
            dataset,
            *split,
            net,
            optimizer(config.optimizer, config.learning_rate, steps * config.epochs, config.clip),
            loss_fn(net, config.grad, sequences),
            devices,
            steps,
        )

    @property
    def sequences(self) -> bool:
        return self.config.model in SEQUENCE_MODELS

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's model input: an image's or features' shape, or a row's ``L`` token ids."""
        return (self.dataset.length,) if self.sequences else self.dataset.input_shape

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.devices, spec)


@dataclasses.dataclass(eq=False)
class _Progress:
    """The state of a run between two steps: what a checkpoint holds, and the last checkpoint's path."""

    state: dict[str, Any]
    step: int = 0
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checkpoint: Path | None = None


def _initialised(run: _Run) -> dict[str, Any]:
    """Parameters, optimizer state and model state as :data:`STATE` at step 0; a norm that does not fit
    the model's widths (``--groups``) is refused in the command line's words."""
    config = run.config
    try:
        _, params = run.net.init(jax.random.PRNGKey(config.seed), (-1, *run.input_shape))
    except layers.LayerError as error:
        flags = _flags(dataclasses.asdict(config), ("model", "norm", "groups"))
        raise TrainError(f"train: {flags} cannot be built for dataset {run.dataset.name}: {error}") from error
    return {"params": params, "opt_state": run.tx.init(params), "model_state": run.net.init_state(params)}


def _start(run: _Run, directory: Path | None) -> _Progress:
    """Freshly initialised parameters, optimizer and model state, or with ``--resume`` the newest intact
    checkpoint."""
    config = run.config
    state = _initialised(run)
    if config.resume is None:
        return _Progress(state)
    found = checkpoint.latest(directory, state)
    if found is None:
        raise TrainError(f"train: --resume {config.resume}: no checkpoint there")
    state, meta, warnings = found
    for warning in warnings:
        print(f"manualgrad train: {warning}", file=sys.stderr)
    epoch = meta["step"] // run.steps + 1
    left = "" if epoch <= config.epochs else f": all {config.epochs} epochs are done"
    _say(f"resuming from step {meta['step']} (epoch {epoch}) in {directory}{left}")
    return _Progress(
        state,
        meta["step"],
        meta["epoch_loss"],
        meta["epoch_correct"],
        list(meta["metrics"]),
        checkpoint.path_of(directory, meta["step"]),
    )


def _save(config: Config, out: Path, progress: _Progress) -> None:
    """Checkpoints ``progress`` into ``out`` on the writing process; the others only note the checkpoint's path."""
    if not multiprocess.is_writer():
        progress.checkpoint = checkpoint.path_of(out, progress.step)
        return
    progress.checkpoint = checkpoint.save(
        out,
        progress.step,
        progress.state,
        {
            "config": dataclasses.asdict(config),
            "epoch_loss": progress.epoch_loss,
            "epoch_correct": progress.epoch_correct,
            "metrics": progress.rows,
        },
    )


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[threading.Event]:
    """Within the block, Ctrl-C (SIGINT) sets the event, which the loop checks between steps; a second Ctrl-C raises.

    Only the main thread receives signals; elsewhere the handler is left as it is and the event never set.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def handler(signum: int, frame: Any) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _stop_if_pressed(run: _Run, out: Path, progress: _Progress, pressed: threading.Event) -> None:
    """Checkpoints and raises :class:`Interrupted` once Ctrl-C has reached any process (all stop at this step)."""
    if multiprocess.stop_requested(pressed.is_set(), progress.step):
        _save(run.config, out, progress)
        defaults = resolved(Config(model=run.config.model))
        given = [k for k in (*RUN_DEFINING, "epochs") if getattr(run.config, k) != getattr(defaults, k)]
        arguments = " " + _flags(dataclasses.asdict(run.config), given) if given else ""
        raise Interrupted(progress.step, progress.checkpoint, out, arguments)


def _diverged(progress: _Progress, value: float, epoch: int) -> Diverged:
    what = (
        f"the loss became {value}"
        if not math.isfinite(value)
        else "the parameters, the optimizer state or the model's running statistics became infinite or NaN"
    )
    kept = (
        f"the last finite checkpoint is {progress.checkpoint}"
        if progress.checkpoint
        else "no checkpoint was written before it"
    )
    return Diverged(
        f"train: {what} at step {progress.step + 1} (epoch {epoch + 1}); stopped, and {kept}; try a smaller --lr"
    )


def _train_epoch(
    run: _Run, step_fn: Callable, out: Path, progress: _Progress, epoch: int, pressed: threading.Event
) -> None:
    """The steps of ``epoch`` not yet done; checkpoints every ``--checkpoint-every`` steps."""
    config, split = run.config, run.sharding(PartitionSpec("data"))
    order = data.epoch_order(config.seed, epoch, len(run.x_train))
    done = progress.step - epoch * run.steps
    keys = step_keys(config.seed, range(progress.step, (epoch + 1) * run.steps))
    bar = _progress(run.steps, done, f"epoch {epoch + 1}/{config.epochs}")
    try:
        for (xb, yb), key in zip(
            itertools.islice(data.batches(run.x_train, run.y_train, config.batch_size, order), done, None),
            keys,
        ):
            _stop_if_pressed(run, out, progress, pressed)
            xb, yb = cropped(xb, yb) if run.sequences else (xb, yb)
            *state, value, correct, finite = step_fn(
                *(progress.state[k] for k in STATE),
                multiprocess.global_batch(xb, split),
                multiprocess.global_batch(yb, split),
                key,
            )
            if not finite:
                raise _diverged(progress, float(value), epoch)
            progress.state = dict(zip(STATE, state))
            progress.epoch_loss += float(value) * targets(yb, run.sequences)
            progress.epoch_correct += int(correct)
            progress.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(value):.4f}", acc=f"{int(correct) / len(xb):.3f}")
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0:
                _save(config, out, progress)
    finally:
        bar.close()


def _end_epoch(run: _Run, out: Path, progress: _Progress, epoch: int) -> None:
    """Evaluates on the test split, appends and writes the epoch's metrics, prints them, checkpoints."""
    config = run.config
    trained = data.epoch_order(config.seed, epoch, len(run.x_train))[: run.steps * config.batch_size]
    seen = targets(run.y_train[trained], run.sequences)
    test_loss, test_accuracy = evaluate(
        run.loss, progress.state["params"], progress.state["model_state"], run.x_test, run.y_test, 512, run.sequences
    )
    progress.rows.append(
        {
            "epoch": epoch + 1,
            "train_loss": progress.epoch_loss / seen,
            "train_accuracy": progress.epoch_correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
    )
    progress.epoch_loss, progress.epoch_correct = 0.0, 0
    if multiprocess.is_writer():
        _write_metrics(out, progress.rows)
    row = progress.rows[-1]
    unit = " nats/char" if run.sequences else ""
    _say(
        f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f}{unit} acc {row['train_accuracy']:.4f}  "
        f"test loss {test_loss:.4f}{unit} acc {test_accuracy:.4f}"
    )
    _save(config, out, progress)


def _final_cross_check(run: _Run, params: Any) -> tuple[float | None, int]:
    """The cross-check on the first ``--cross-check-batches`` training batches in order; ``None`` for 0 batches."""
    in_order = data.batches(run.x_train, run.y_train, run.config.batch_size, np.arange(len(run.x_train)))
    batches = list(itertools.islice(in_order, run.config.cross_check_batches))
    key = step_keys(run.config.seed, [0])[0]
    return (cross_check(run.net, params, batches, key, run.sequences) if batches else None), len(batches)


SAMPLES = 10
_SAMPLE_STREAM = 2  # fold_in(PRNGKey(seed), 2): the samples' key


def write_samples(run: _Run, params: Any, path: Path) -> list[str]:
    """:data:`SAMPLES` sequences drawn from the trained model (seeded by ``--seed``), one a line in ``path``
    (written by the writing process).

    Words start after the boundary token and end at the next one (or after ``L`` characters); a text's
    samples are ``L`` characters after the first character of the training text.
    """
    sequences, boundary = run.dataset, run.dataset.boundary
    start = sequences.vocab.index(boundary) if boundary is not None else int(sequences.tokens_train[0, 0])
    stop = None if boundary is None else start
    key = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), _SAMPLE_STREAM)
    ids = np.asarray(gpt.sample(run.net, params, key, SAMPLES, sequences.length, start, stop))
    texts = [sequences.decode(row[1:]) for row in ids]
    if boundary is not None:
        texts = [t.split(boundary)[0] for t in texts]
    if multiprocess.is_writer():
        path.write_text("".join(f"{t}\n" for t in texts))
    return texts


def train(config: Config) -> dict[str, Any]:
    """Runs ``manualgrad train``; returns the summary (final metrics, cross-check, timings, paths).

    Raises :class:`TrainError` for a configuration that cannot run (before writing anything),
    :class:`Diverged` when the loss or the state stops being finite, and :class:`Interrupted` on Ctrl-C.
    """
    started = time.perf_counter()
    config = resolved(config)
    validate(config)
    multiprocess.initialize(config)
    directory = _directory(config)
    if config.resume is not None:
        _refuse_another_run(config, directory)
    run = _Run.build(config)
    progress = _start(run, directory)
    multiprocess.agree(_flags(dataclasses.asdict(config), AGREED) + f" from step {progress.step}")
    progress.state = jax.device_put(progress.state, run.sharding(PartitionSpec()))
    out, latest = _open_directory(config, directory)
    step_fn = make_step(run.loss, run.tx)
    first_step, training = progress.step, time.perf_counter()
    with _ctrl_c_between_steps() as pressed:
        for epoch in range(progress.step // run.steps, config.epochs):
            _train_epoch(run, step_fn, out, progress, epoch, pressed)
            _end_epoch(run, out, progress, epoch)
            _stop_if_pressed(run, out, progress, pressed)
    training = time.perf_counter() - training
    title = f"manualgrad train: {config.model} on {run.dataset.name}, {config.optimizer}, grad {config.grad}"
    curves = out / "curves.png"
    if multiprocess.is_writer():
        plot_curves(progress.rows, curves, title)
    params = jax.device_get(progress.state["params"])
    error, checked = _final_cross_check(run, params)
    samples = write_samples(run, params, out / "samples.txt") if run.sequences else None
    return {
        **progress.rows[-1],
        "samples": samples,
        "cross_check_max_relative_error": error,
        "cross_check_batches": checked,
        "seconds": time.perf_counter() - started,
        "steps_per_second": (progress.step - first_step) / training,  # compiling and evaluating included
        "steps": progress.step,
        "devices": run.devices.devices.size,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "directory": str(out),
        "latest": None if latest is None else str(latest),
        "metrics": str(out / "metrics.csv"),
        "curves": str(curves),
        "checkpoint": str(progress.checkpoint),
        "params": params,
    }
