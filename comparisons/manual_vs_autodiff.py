"""Training on the hand rules against training on jax.grad: the same run twice, one plot.

``manualgrad train --grad manual`` differentiates the model through the registered custom_vjp
rules; ``--grad autodiff`` differentiates the same model built from the rules' plain-``jnp``
references with JAX's autodiff. Same seed, same data order, same optimizer: the two loss
curves may differ only by float32 round-off, which training then carries forward. The script
trains both, prints the largest relative difference of every metric per epoch, and draws both
curves in one PNG.

Run: ``python comparisons/manual_vs_autodiff.py [--epochs 5] [--model mlp] [--out runs/manual_vs_autodiff]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from manualgrad import text  # noqa: E402
from manualgrad.train import loop, progress  # noqa: E402
from manualgrad.train.config import Config  # noqa: E402

GRADIENTS = {"manual": "the hand rules (custom_vjp)", "autodiff": "jax.grad of the plain-jnp references"}


def main(epochs: int = 5, model: str = "mlp", out: Path = Path("runs/manual_vs_autodiff")) -> list[dict[str, float]]:
    """Trains both ways; returns per epoch the relative differences of the metrics."""
    runs = {}
    for grad in ("manual", "autodiff"):
        print(f"--grad {grad}: {model} trained on {GRADIENTS[grad]}, into {out / grad}")
        # overwrite: the script's own output folder, rewritten on every run
        config = Config(model=model, epochs=epochs, grad=grad, out=str(out / grad), overwrite=True)
        loop.train(config)
        runs[grad] = list(progress.read_metrics(out / grad / "metrics.csv"))
    differences = []
    print(f"both runs, {model} on digits, {epochs} epochs, seed 0: relative difference, hand rules vs jax.grad")
    for m, a in zip(runs["manual"], runs["autodiff"]):
        row = {k: abs(m[k] - a[k]) / max(abs(a[k]), 1e-30) for k in progress.METRICS if k != "epoch"}
        differences.append(row)
        print(f"epoch {int(m['epoch']):2d}  " + "  ".join(f"{k} {v:.1e}" for k, v in row.items()))
    fig, ax = plt.subplots(figsize=(6, 4))
    for grad, style in (("manual", "-o"), ("autodiff", "--x")):
        epochs_axis = [r["epoch"] for r in runs[grad]]
        ax.plot(epochs_axis, [r["train_loss"] for r in runs[grad]], style, label=f"train loss, --grad {grad}")
        ax.plot(epochs_axis, [r["test_loss"] for r in runs[grad]], style, label=f"test loss, --grad {grad}")
    ax.set(
        xlabel="epoch",
        ylabel="softmax cross-entropy",
        yscale="log",
        title=f"{model} on digits: hand rules and jax.grad, same seed",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "manual_vs_autodiff.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return differences


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=text.first_line(__doc__))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--out", type=Path, default=Path("runs/manual_vs_autodiff"))
    args = parser.parse_args()
    main(args.epochs, args.model, args.out)
