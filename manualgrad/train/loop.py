"""``manualgrad train``: jit-compiled training whose every gradient comes from a hand rule.

One step is one jitted program: the model's forward pass through the registered rules, the
hand-written backward rules (``jax.grad`` of a custom_vjp composition runs exactly those), and
the optax update. ``--grad autodiff`` differentiates the same model built from the rules'
plain-``jnp`` references instead, so the two can be compared run against run.

Data parallelism uses JAX's own sharding: a 1-D ``Mesh`` over ``--devices`` devices with axis
``data``; every batch is split along it (``NamedSharding(mesh, P("data"))``) and parameters and
optimizer state are replicated (``P()``). XLA inserts the all-reduce that the sum over the
batch in each gradient pass (``Oᵀ G``, ``1ᵀ G``) needs, so the step is the same program on one
device or many.

Checkpoints (:mod:`manualgrad.train.checkpoint`) hold the parameters, the optimizer state, the step,
the running sums of the current epoch, every finished epoch's metrics and the arguments; the
data order of epoch ``e`` is a pure function of ``(seed, e)`` (:func:`manualgrad.train.data.epoch_order`).
A run resumed from a checkpoint therefore repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from manualgrad.nn import layers
from manualgrad.train import checkpoint, data

METRICS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3}
# Arguments that must match for --resume to continue the same run.
RUN_DEFINING = ("model", "dataset", "optimizer", "lr", "batch_size", "seed", "dtype", "grad")


class TrainError(ValueError):
    """A bad training configuration, named in the CLI's words."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The arguments of ``manualgrad train``; see ``manualgrad train --help``."""

    model: str = "cnn"
    dataset: str = "digits"
    optimizer: str = "adam"
    lr: float | None = None
    batch_size: int = 32
    epochs: int = 10
    seed: int = 0
    dtype: str = "float32"
    grad: str = "manual"
    out: str = "runs/latest"
    checkpoint_every: int = 0
    resume: str | None = None
    devices: int | None = None
    cross_check_batches: int = 3

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """``sgd``, ``momentum`` (0.9) or ``adam``, from optax."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    if name == "adam":
        return optax.adam(lr)
    raise TrainError(f"train: --optimizer must be sgd, momentum or adam, got {name!r}")


def model(name: str, dataset: data.Dataset, dtype: Any) -> layers.Layer:
    """The ready-made ``cnn`` or ``mlp`` for ``dataset``."""
    if name == "cnn":
        if not dataset.is_image:
            raise TrainError(f"train: --model cnn needs images (N, H, W, C); dataset {dataset.name} has inputs of shape "
                             f"{dataset.input_shape}: use --model mlp")
        return layers.cnn(dataset.classes, dtype=dtype)
    if name == "mlp":
        return layers.mlp(dataset.classes, hidden=(128,) if dataset.is_image else (32, 32), dtype=dtype)
    raise TrainError(f"train: --model must be cnn or mlp, got {name!r}")


def loss_fn(net: layers.Layer, grad: str) -> Callable:
    """``(params, x, labels) -> (loss, correct)`` through the hand rules (``manual``) or the references (``autodiff``)."""
    if grad not in ("manual", "autodiff"):
        raise TrainError(f"train: --grad must be manual or autodiff, got {grad!r}")
    reference = grad == "autodiff"
    return lambda params, x, labels: layers.classifier_loss(net, params, x, labels, reference=reference)


def make_step(loss: Callable, tx: optax.GradientTransformation) -> Callable:
    """One jitted step: ``(params, opt_state, x, labels) -> (params, opt_state, loss, correct)``."""

    def step(params, opt_state, x, labels):
        (value, correct), grads = jax.value_and_grad(loss, has_aux=True)(params, x, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, correct

    return jax.jit(step, donate_argnums=(0, 1))


def mesh(devices: int | None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``devices`` local devices (all by default)."""
    available = jax.local_devices()
    n = len(available) if devices is None else devices
    if not 1 <= n <= len(available):
        raise TrainError(f"train: --devices must be between 1 and {len(available)} (local {jax.default_backend()} "
                         f"devices), got {devices}")
    return Mesh(np.array(available[:n]), ("data",))


def _relative_error(a: Any, b: Any) -> float:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)) for x, y in pairs)


def cross_check(net: layers.Layer, params: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Max relative difference between the hand-rule gradient and ``jax.grad`` of the references."""
    manual = jax.jit(jax.grad(lambda p, x, y: layers.classifier_loss(net, p, x, y)[0]))
    auto = jax.jit(jax.grad(lambda p, x, y: layers.classifier_loss(net, p, x, y, reference=True)[0]))
    return max(_relative_error(manual(params, x, y), auto(params, x, y)) for x, y in batches)


def evaluate(loss: Callable, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over every sample of ``(x, y)``."""
    fn = jax.jit(loss)
    total, correct = 0.0, 0
    for xb, yb in data.evaluation_batches(x, y, batch_size):
        value, right = fn(params, xb, yb)
        total += float(value) * len(xb)
        correct += int(right)
    return total / len(x), correct / len(x)


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

    return tqdm(total=total, initial=initial, desc=description, unit="step", leave=False,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _resume_state(config: Config, template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    found = checkpoint.latest(config.resume, template)
    if found is None:
        raise TrainError(f"train: --resume {config.resume}: no checkpoint there")
    state, meta, warnings = found
    for warning in warnings:
        print(f"manualgrad train: {warning}", file=sys.stderr)
    saved = meta["config"]
    different = [f"--{k.replace('_', '-')} {saved[k]} (saved) vs {getattr(config, k)} (now)"
                 for k in RUN_DEFINING if saved[k] != getattr(config, k)]
    if different:
        raise TrainError(f"train: --resume {config.resume} holds a different run: {'; '.join(different)}")
    return state, meta


def train(config: Config) -> dict[str, Any]:
    """Runs ``manualgrad train``; returns the summary (final metrics, cross-check, timings, paths)."""
    if config.dtype not in ("float32", "float64"):
        raise TrainError(f"train: --dtype must be float32 or float64, got {config.dtype!r}")
    if config.epochs < 1 or config.batch_size < 1 or config.checkpoint_every < 0:
        raise TrainError(f"train: --epochs and --batch-size must be ≥ 1 and --checkpoint-every ≥ 0 "
                         f"(got {config.epochs}, {config.batch_size}, {config.checkpoint_every})")
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(config.dtype)
    started = time.perf_counter()
    dataset = data.load(config.dataset, seed=config.seed)
    x_train, x_test = dataset.x_train.astype(dtype), dataset.x_test.astype(dtype)
    net = model(config.model, dataset, dtype)
    tx = optimizer(config.optimizer, config.learning_rate)
    loss = loss_fn(net, config.grad)
    devices = mesh(config.devices)
    n_devices = devices.devices.size
    if config.batch_size % n_devices:
        raise TrainError(f"train: --batch-size {config.batch_size} must be a multiple of --devices {n_devices}")
    steps = data.steps_per_epoch(len(x_train), config.batch_size)

    _, params = net.init(jax.random.PRNGKey(config.seed), (-1, *dataset.input_shape))
    state = {"params": params, "opt_state": tx.init(params)}
    meta: dict[str, Any] = {"step": 0, "epoch_loss": 0.0, "epoch_correct": 0, "metrics": []}
    if config.resume:
        state, meta = _resume_state(config, state)
    replicated, split = NamedSharding(devices, PartitionSpec()), NamedSharding(devices, PartitionSpec("data"))
    state = jax.device_put(state, replicated)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    step_fn = make_step(loss, tx)
    rows: list[dict[str, float]] = list(meta["metrics"])
    step, epoch_loss, epoch_correct = meta["step"], meta["epoch_loss"], meta["epoch_correct"]

    def save() -> None:
        checkpoint.save(out, step, state, {
            "config": dataclasses.asdict(config), "epoch_loss": epoch_loss,
            "epoch_correct": epoch_correct, "metrics": rows,
        })

    for epoch in range(step // steps, config.epochs):
        order = data.epoch_order(config.seed, epoch, len(x_train))
        done = step - epoch * steps
        bar = _progress(steps, done, f"epoch {epoch + 1}/{config.epochs}")
        for i, (xb, yb) in enumerate(data.batches(x_train, dataset.y_train, config.batch_size, order)):
            if i < done:
                continue
            params, opt_state, value, correct = step_fn(state["params"], state["opt_state"],
                                                        jax.device_put(xb, split), jax.device_put(yb, split))
            state = {"params": params, "opt_state": opt_state}
            epoch_loss += float(value) * len(xb)
            epoch_correct += int(correct)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(value):.4f}", acc=f"{int(correct) / len(xb):.3f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()
        bar.close()
        seen = steps * config.batch_size
        test_loss, test_accuracy = evaluate(loss, state["params"], x_test, dataset.y_test, 512)
        rows.append({"epoch": epoch + 1, "train_loss": epoch_loss / seen, "train_accuracy": epoch_correct / seen,
                     "test_loss": test_loss, "test_accuracy": test_accuracy})
        epoch_loss, epoch_correct = 0.0, 0
        _write_metrics(out, rows)
        print(f"epoch {epoch + 1:3d}  train loss {rows[-1]['train_loss']:.4f} acc {rows[-1]['train_accuracy']:.4f}  "
              f"test loss {test_loss:.4f} acc {test_accuracy:.4f}", flush=True)
        save()

    title = f"manualgrad train: {config.model} on {dataset.name}, {config.optimizer}, grad {config.grad}"
    curves = plot_curves(rows, out / "curves.png", title)
    in_order = data.batches(x_train, dataset.y_train, config.batch_size, np.arange(len(x_train)))
    check_batches = [batch for batch, _ in zip(in_order, range(config.cross_check_batches))]
    error = cross_check(net, jax.device_get(state["params"]), check_batches)
    return {
        **rows[-1],
        "cross_check_max_relative_error": error,
        "seconds": time.perf_counter() - started,
        "steps": step,
        "devices": n_devices,
        "metrics": str(out / "metrics.csv"),
        "curves": str(curves),
        "checkpoint": str(checkpoint.checkpoints(out)[-1]),
        "params": jax.device_get(state["params"]),
    }
