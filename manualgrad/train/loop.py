"""``manualgrad train``: jit-compiled training whose every gradient comes from a hand rule.

:func:`train` runs a :class:`~manualgrad.train.config.Config`: it builds the data, the model
(:mod:`~manualgrad.train.models`) and the jitted step (:mod:`~manualgrad.train.step`), then runs
the epochs, writing into the run's folder (:mod:`~manualgrad.train.runs`) the metrics and the plot
(:mod:`~manualgrad.train.progress`), checkpoints, and a sequence model's samples
(:mod:`~manualgrad.train.sampling`).

Data parallelism uses JAX's own sharding: a 1-D ``Mesh`` over ``devices`` devices with axis
``data``; every batch is split along it (``NamedSharding(mesh, P("data"))``) and parameters and
optimizer state are replicated (``P()``). XLA inserts the all-reduce that the sum over the
batch in each gradient pass (``Oᵀ G``, ``1ᵀ G``) needs, so the step is the same program on one
device or many. With ``jax.distributed`` the mesh spans the devices of every process and each
feeds its block of the global batch; process 0 alone writes (:mod:`manualgrad.train.distributed`).

The model's state (batch norm's running statistics) is a pytree of its own beside the
parameters: the jitted step returns it updated, ``jax.grad`` and optax never see it, evaluation
normalises with it. Checkpoints (:mod:`manualgrad.train.checkpoint`) hold the parameters, the
optimizer state, the model's state, the step, the running sums of the current epoch, every
finished epoch's metrics and the configuration; the data order of epoch ``e`` is a pure function
of ``(seed, e)`` (:func:`manualgrad.train.data.epoch_order`) and step ``s``'s dropout key of
``(seed, s)`` (:func:`~manualgrad.train.step.step_keys`). A run resumed from a checkpoint therefore
repeats the uninterrupted run bit for bit.

Ctrl-C stops between two steps with a checkpoint of the current state
(:class:`~manualgrad.train.errors.Interrupted`); a loss, parameter or optimizer state that is no
longer finite stops the run before anything of it is saved (:class:`~manualgrad.train.errors.Diverged`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from manualgrad.nn import layers
from manualgrad.text import counted
from manualgrad.train import checkpoint, data, models, progress, runs, sampling
from manualgrad.train import distributed as multiprocess
from manualgrad.train.config import AGREED, RUN_DEFINING, Config, arguments, described, resolved, validate
from manualgrad.train.errors import ConfigError, Diverged, Interrupted
from manualgrad.train.step import cropped, cross_check, evaluate, loss_fn, make_step, optimizer, step_keys, targets

STATE = ("params", "opt_state", "model_state")  # what the jitted step carries from one step to the next


def mesh(devices: int | None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``devices`` local devices (all by default) of every
    process (:func:`~manualgrad.train.distributed.devices`)."""
    available = jax.local_devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise ConfigError(
            "{devices} must be between 1 and {n} (local {backend} devices), got {got}",
            n=len(available),
            backend=jax.default_backend(),
            got=devices,
        )
    return Mesh(np.array(multiprocess.devices(n)), ("data",))


def _load(config: Config, dtype: Any) -> tuple[data.Dataset | data.Sequences, tuple[np.ndarray, ...]]:
    """The data set of ``config`` and its ``(x_train, y_train, x_test, y_test)``: images or features in
    ``dtype`` and labels, or token rows and target masks for a sequence model."""
    if config.model in models.SEQUENCE_MODELS:
        dataset = data.load_sequences(config.dataset, seed=config.seed)
        return dataset, (dataset.tokens_train, dataset.mask_train, dataset.tokens_test, dataset.mask_test)
    dataset = data.load(config.dataset, seed=config.seed)
    return dataset, (dataset.x_train.astype(dtype), dataset.y_train, dataset.x_test.astype(dtype), dataset.y_test)


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
        dataset, split = _load(config, dtype)
        options = {"norm": config.norm, "groups": config.groups, "dropout": config.dropout}
        net = models.model(config.model, dataset, dtype, **options)
        devices = mesh(config.devices)
        if config.batch_size % devices.devices.size:
            raise ConfigError(
                "{batch_size} {b} must be a multiple of the {n} devices of the mesh ({devices} on each of {p})",
                b=config.batch_size,
                n=devices.devices.size,
                p=counted(jax.process_count(), "process", "processes"),
            )
        steps = data.steps_per_epoch(len(split[0]), config.batch_size)
        tx = optimizer(config.optimizer, config.learning_rate, steps * config.epochs, config.clip)
        sequences = config.model in models.SEQUENCE_MODELS
        return cls(config, dataset, *split, net, tx, loss_fn(net, config.grad, sequences), devices, steps)

    @property
    def sequences(self) -> bool:
        return self.config.model in models.SEQUENCE_MODELS

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's model input: an image's or features' shape, or a row's ``L`` token ids."""
        return (self.dataset.length,) if self.sequences else self.dataset.input_shape

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.devices, spec)


@dataclasses.dataclass(eq=False)
class _Reached:
    """The state of a run between two steps: what a checkpoint holds, and the last checkpoint's path."""

    state: dict[str, Any]
    step: int = 0
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    rows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    checkpoint: Path | None = None


def _initialised(run: _Run) -> dict[str, Any]:
    """Parameters, optimizer state and model state as :data:`STATE` at step 0; a norm that does not fit
    the model's widths (``groups``) is refused in the configuration's words."""
    config = run.config
    try:
        _, params = run.net.init(jax.random.PRNGKey(config.seed), (-1, *run.input_shape))
    except layers.LayerError as error:
        raise ConfigError(
            described(dataclasses.asdict(config), ("model", "norm", "groups"))
            + " cannot be built for dataset {name}: {error}",
            name=run.dataset.name,
            error=error,
        ) from error
    return {"params": params, "opt_state": run.tx.init(params), "model_state": run.net.init_state(params)}


def _start(run: _Run, directory: Path | None) -> _Reached:
    """Freshly initialised parameters, optimizer and model state, or when resuming the newest intact checkpoint."""
    config = run.config
    state = _initialised(run)
    if config.resume is None:
        return _Reached(state)
    found = checkpoint.latest(directory, state)
    if found is None:
        raise ConfigError("{resume} {path}: no checkpoint there", path=config.resume)
    state, meta, warnings = found
    for warning in warnings:
        print(f"manualgrad train: {warning}", file=sys.stderr)
    epoch = meta["step"] // run.steps + 1
    left = "" if epoch <= config.epochs else f": all {counted(config.epochs, 'epoch')} are done"
    progress.say(f"resuming from step {meta['step']} (epoch {epoch}) in {directory}{left}")
    return _Reached(
        state,
        meta["step"],
        meta["epoch_loss"],
        meta["epoch_correct"],
        list(meta["metrics"]),
        checkpoint.path_of(directory, meta["step"]),
    )


def _save(config: Config, out: Path, reached: _Reached) -> None:
    """Checkpoints ``reached`` into ``out`` on the writing process; the others only note the checkpoint's path."""
    if not multiprocess.is_writer():
        reached.checkpoint = checkpoint.path_of(out, reached.step)
        return
    meta = {
        "config": dataclasses.asdict(config),
        "epoch_loss": reached.epoch_loss,
        "epoch_correct": reached.epoch_correct,
        "metrics": reached.rows,
    }
    reached.checkpoint = checkpoint.save(out, reached.step, reached.state, meta)


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


def _stop_if_pressed(run: _Run, out: Path, reached: _Reached, pressed: threading.Event) -> None:
    """Checkpoints and raises :class:`Interrupted` once Ctrl-C has reached any process (all stop at this step)."""
    if multiprocess.stop_requested(pressed.is_set(), reached.step):
        _save(run.config, out, reached)
        defaults = resolved(Config(model=run.config.model))
        given = [k for k in (*RUN_DEFINING, "epochs") if getattr(run.config, k) != getattr(defaults, k)]
        raise Interrupted(reached.step, reached.checkpoint, out, arguments(dataclasses.asdict(run.config), given))


def _diverged(reached: _Reached, value: float, epoch: int) -> Diverged:
    what = (
        f"the loss became {value}"
        if not math.isfinite(value)
        else "the parameters, the optimizer state or the model's running statistics became infinite or NaN"
    )
    kept = (
        f"the last finite checkpoint is {reached.checkpoint}"
        if reached.checkpoint
        else "no checkpoint was written before it"
    )
    return Diverged(
        "{what} at step {step} (epoch {epoch}); stopped, and {kept}; try a smaller {lr}",
        what=what,
        step=reached.step + 1,
        epoch=epoch + 1,
        kept=kept,
    )


def _train_epoch(
    run: _Run, step_fn: Callable, out: Path, reached: _Reached, epoch: int, pressed: threading.Event
) -> None:
    """The steps of ``epoch`` not yet done; checkpoints every ``checkpoint_every`` steps."""
    config, split = run.config, run.sharding(PartitionSpec("data"))
    order = data.epoch_order(config.seed, epoch, len(run.x_train))
    done = reached.step - epoch * run.steps
    keys = step_keys(config.seed, range(reached.step, (epoch + 1) * run.steps))
    shown = progress.progress(run.steps, done, f"epoch {epoch + 1}/{config.epochs}")
    try:
        for (xb, yb), key in zip(
            itertools.islice(data.batches(run.x_train, run.y_train, config.batch_size, order), done, None),
            keys,
        ):
            _stop_if_pressed(run, out, reached, pressed)
            xb, yb = cropped(xb, yb) if run.sequences else (xb, yb)
            *state, value, correct, finite = step_fn(
                *(reached.state[k] for k in STATE),
                multiprocess.global_batch(xb, split),
                multiprocess.global_batch(yb, split),
                key,
            )
            if not finite:
                raise _diverged(reached, float(value), epoch)
            reached.state = dict(zip(STATE, state))
            reached.epoch_loss += float(value) * targets(yb, run.sequences)
            reached.epoch_correct += int(correct)
            reached.step += 1
            shown.step(float(value), int(correct) / len(xb))
            if config.checkpoint_every and reached.step % config.checkpoint_every == 0:
                _save(config, out, reached)
    finally:
        shown.close()


def _end_epoch(run: _Run, out: Path, reached: _Reached, epoch: int) -> None:
    """Evaluates on the test split, appends and writes the epoch's metrics, prints them, checkpoints."""
    config = run.config
    trained = data.epoch_order(config.seed, epoch, len(run.x_train))[: run.steps * config.batch_size]
    seen = targets(run.y_train[trained], run.sequences)
    test_loss, test_accuracy = evaluate(
        run.loss, reached.state["params"], reached.state["model_state"], run.x_test, run.y_test, 512, run.sequences
    )
    reached.rows.append(
        {
            "epoch": epoch + 1,
            "train_loss": reached.epoch_loss / seen,
            "train_accuracy": reached.epoch_correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
        }
    )
    reached.epoch_loss, reached.epoch_correct = 0.0, 0
    if multiprocess.is_writer():
        progress.write_metrics(out, reached.rows)
    row = reached.rows[-1]
    unit = " nats/char" if run.sequences else ""
    progress.say(
        f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f}{unit} acc {row['train_accuracy']:.4f}  "
        f"test loss {test_loss:.4f}{unit} acc {test_accuracy:.4f}"
    )
    _save(config, out, reached)


def _final_cross_check(run: _Run, params: Any) -> tuple[float | None, int]:
    """The cross-check on the first ``cross_check_batches`` training batches in order; ``None`` for 0 batches."""
    in_order = data.batches(run.x_train, run.y_train, run.config.batch_size, np.arange(len(run.x_train)))
    batches = list(itertools.islice(in_order, run.config.cross_check_batches))
    key = step_keys(run.config.seed, [0])[0]
    return (cross_check(run.net, params, batches, key, run.sequences) if batches else None), len(batches)


def _prepared(config: Config) -> tuple[_Run, _Reached, Path, Path | None]:
    """Everything before the first step: the checks, the processes joined, the run built and started,
    its folder opened. Nothing is written before the last of these."""
    validate(config)
    progress.require_extras()
    multiprocess.initialize(config)
    directory = runs.directory(config)
    if config.resume is not None:
        runs.refuse_another_run(config, directory)
    run = _Run.build(config)
    reached = _start(run, directory)
    multiprocess.agree(described(dataclasses.asdict(config), AGREED) + f" from step {reached.step}")
    reached.state = jax.device_put(reached.state, run.sharding(PartitionSpec()))
    return run, reached, *runs.open_directory(config, directory)


def train(config: Config) -> dict[str, Any]:
    """Runs ``manualgrad train``; returns the summary (final metrics, cross-check, timings, paths).

    Raises :class:`~manualgrad.train.errors.ConfigError` for a configuration that cannot run, before
    writing anything (as do a data set's :class:`~manualgrad.train.data.DataError`, a checkpoint's
    :class:`~manualgrad.train.checkpoint.CheckpointError`, the processes'
    :class:`~manualgrad.train.distributed.DistributedError` and a missing extra's
    :class:`~manualgrad.errors.MissingExtraError`: all :class:`~manualgrad.errors.ManualgradError`),
    :class:`~manualgrad.train.errors.Diverged` when the loss or the state stops being finite, and
    :class:`~manualgrad.train.errors.Interrupted` on Ctrl-C.
    """
    started = time.perf_counter()
    config = resolved(config)
    run, reached, out, latest = _prepared(config)
    step_fn = make_step(run.loss, run.tx)
    first_step, training = reached.step, time.perf_counter()
    with _ctrl_c_between_steps() as pressed:
        for epoch in range(reached.step // run.steps, config.epochs):
            _train_epoch(run, step_fn, out, reached, epoch, pressed)
            _end_epoch(run, out, reached, epoch)
            _stop_if_pressed(run, out, reached, pressed)
    training = time.perf_counter() - training
    title = f"manualgrad train: {config.model} on {run.dataset.name}, {config.optimizer}, grad {config.grad}"
    curves = out / "curves.png"
    if multiprocess.is_writer():
        progress.plot_curves(reached.rows, curves, title)
    params = jax.device_get(reached.state["params"])
    error, checked = _final_cross_check(run, params)
    samples = None
    if run.sequences:
        samples = sampling.write_samples(run.net, params, run.dataset, config.seed, out / "samples.txt")
    return {
        **reached.rows[-1],
        "samples": samples,
        "cross_check_max_relative_error": error,
        "cross_check_batches": checked,
        "seconds": time.perf_counter() - started,
        "steps_per_second": (reached.step - first_step) / training,  # compiling and evaluating included
        "steps": reached.step,
        "devices": run.devices.devices.size,
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "directory": str(out),
        "latest": None if latest is None else str(latest),
        "metrics": str(out / "metrics.csv"),
        "curves": str(curves),
        "checkpoint": str(reached.checkpoint),
        "params": params,
    }
