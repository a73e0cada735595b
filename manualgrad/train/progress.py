"""What a training run shows and keeps of its progress: the metrics CSV, the curves' plot, and the
progress of an epoch (a bar on a terminal, a plain line at an interval elsewhere)."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from manualgrad import extras
from manualgrad.train import distributed as multiprocess

METRICS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
# Seconds between two progress lines where stderr is not a terminal (a CI log, a file): often enough
# to show that a long epoch is alive, rarely enough to keep the log short.
LINE_EVERY = 20.0


def say(message: str) -> None:
    """Prints ``message`` on the process that writes the run's files (the only one, or process 0)."""
    if multiprocess.is_writer():
        print(message, flush=True)


def write_metrics(out: Path, rows: list[dict[str, float]]) -> None:
    """``out/metrics.csv`` holding ``rows`` (one per epoch, :data:`METRICS`), replaced atomically."""
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


def require_plotting() -> Any:
    """matplotlib, or a :class:`~manualgrad.errors.MissingExtraError` naming the ``train`` extra."""
    return extras.require("matplotlib", "train", "plotting the curves")


def require_extras() -> None:
    """Raises :class:`~manualgrad.errors.MissingExtraError` before a run starts if what shows its progress
    is missing (the plot; the bar on a terminal), rather than after it trained. Every process asks, before
    it joins the others (which of them writes is known only after)."""
    require_plotting()
    if sys.stderr.isatty():
        _require_tqdm()


def _require_tqdm() -> Any:
    return extras.require("tqdm", "train", "the progress bar")


def plot_curves(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train and test, as a PNG."""
    matplotlib = require_plotting()
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


class Progress(Protocol):
    """An epoch's progress: one :meth:`step` per training step, :meth:`close` at the end."""

    def step(self, loss: float, accuracy: float) -> None: ...

    def close(self) -> None: ...


class _Bar:
    """tqdm's bar on a terminal."""

    def __init__(self, total: int, initial: int, description: str) -> None:
        tqdm = _require_tqdm().tqdm
        self._bar = tqdm(total=total, initial=initial, desc=description, unit="step", leave=False, dynamic_ncols=True)

    def step(self, loss: float, accuracy: float) -> None:
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}")

    def close(self) -> None:
        self._bar.close()


class _Lines:
    """A plain line on stderr every :data:`LINE_EVERY` seconds, for a log that is not a terminal."""

    def __init__(self, total: int, initial: int, description: str) -> None:
        self.total, self.done, self.description = total, initial, description
        self._last = time.monotonic()

    def step(self, loss: float, accuracy: float) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= LINE_EVERY and self.done < self.total:
            self._last = now
            print(
                f"{self.description}: step {self.done} of {self.total}, loss {loss:.4f} acc {accuracy:.3f}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        pass


class _Silent:
    """Nothing: the processes that do not write the run's files."""

    def step(self, loss: float, accuracy: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int, description: str) -> Progress:
    """The progress of an epoch of ``total`` steps, ``initial`` of them done: a tqdm bar where stderr is
    a terminal, a plain line every :data:`LINE_EVERY` seconds elsewhere, nothing on the other processes."""
    if not multiprocess.is_writer():
        return _Silent()
    return _Bar(total, initial, description) if sys.stderr.isatty() else _Lines(total, initial, description)
