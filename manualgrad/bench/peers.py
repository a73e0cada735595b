"""The MLP training step as a user would write it without manualgrad: NumPy and PyTorch, hand backward.

Both run seed 004's row form by hand, the way manual gradients are taught: the forward pass
keeps each layer's input ``O_k`` (for ReLU layers that is ``F_k = σ(a_k)``, Remark 8 of seed
002), then ``G ← softmax(z) − onehot`` scaled by ``1/m``, and per layer from the top
``∇W = Oᵀ G``, ``∇b = 1ᵀ G``, ``G ← (G Wᵀ) ⊙ [F > 0]``. The update is Adam with optax's
defaults (``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-8``), so one step does the same arithmetic as
``manualgrad.train.loop.make_step`` with ``optax.adam``. The first layer's input needs no
gradient and gets none, as in the jitted step.

The model is :func:`manualgrad.nn.layers.mlp`: ``[(W_1, b_1), …, (W_L, b_L)]`` with ReLU between
the dense layers and logits out; inputs are flattened to ``(m, features)``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

B1, B2, EPS = 0.9, 0.999, 1e-8
Weights = Sequence[tuple[Any, Any]]


def dense_weights(params: Any) -> list[tuple[Any, Any]]:
    """The ``(W, b)`` pairs of a :func:`manualgrad.nn.layers.mlp`'s params, in order (parameterless layers skipped)."""
    return [(p["w"], p["b"]) for p in params if isinstance(p, dict)]


class NumpyMLP:
    """The MLP step in NumPy: forward, hand backward, Adam, all in float32 and mostly in place."""

    def __init__(self, weights: Weights, lr: float) -> None:
        self.weights = [(np.array(w, np.float32), np.array(b, np.float32)) for w, b in weights]
        self.moments = [[np.zeros_like(a) for a in pair for _ in range(2)] for pair in self.weights]
        self.lr, self.t = lr, 0

    def gradients(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The loss and ``[(∇W_k, ∇b_k)]``."""
        m = len(x)
        kept = [x.reshape(m, -1)]
        for k, (w, b) in enumerate(self.weights):
            z = kept[-1] @ w
            z += b
            if k < len(self.weights) - 1:
                np.maximum(z, 0, out=z)
            kept.append(z)
        g = kept.pop()
        g -= g.max(axis=1, keepdims=True)
        np.exp(g, out=g)
        g /= g.sum(axis=1, keepdims=True)
        rows = np.arange(m)
        loss = -float(np.mean(np.log(g[rows, labels])))
        g[rows, labels] -= 1
        g *= np.float32(1 / m)
        grads = []
        for k in range(len(self.weights) - 1, -1, -1):
            o = kept[k]
            grads.append((o.T @ g, g.sum(axis=0)))
            if k:
                g = g @ self.weights[k][0].T
                g *= o > 0
        return loss, grads[::-1]

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        """One Adam step on ``(x, labels)``; returns the loss before it."""
        loss, grads = self.gradients(x, labels)
        self.t += 1
        scale = np.float32(self.lr * (1 - B2**self.t) ** 0.5 / (1 - B1**self.t))
        eps = np.float32(EPS * (1 - B2**self.t) ** 0.5)
        for (w, b), (gw, gb), (mw, vw, mb, vb) in zip(self.weights, grads, self.moments):
            for p, g, mu, nu in ((w, gw, mw, vw), (b, gb, mb, vb)):
                mu *= np.float32(B1)
                mu += np.float32(1 - B1) * g
                nu *= np.float32(B2)
                g *= g
                nu += np.float32(1 - B2) * g
                denominator = np.sqrt(nu)
                denominator += eps
                p -= scale * mu / denominator
        return loss


def torch_reason() -> str | None:
    """Why the PyTorch peer cannot run here, or None when it can."""
    try:
        import torch  # noqa: F401
    except ImportError as error:
        return f"torch is not importable ({error}); pip install torch==2.13.0 (or manualgrad[bench])"
    return None


def cores() -> int:
    """The CPU cores this process may run on: PyTorch's thread count for the peer."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_device(backend: str) -> str:
    """``cuda`` when JAX runs on a GPU and PyTorch sees one, else ``cpu``."""
    import torch

    return "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"


@functools.cache
def _torch_functions():
    """The three ``torch.autograd.Function``s with hand backward: dense with bias, ReLU, softmax cross-entropy."""
    import torch

    class Dense(torch.autograd.Function):
        """``Z = O W + 1 b``; backward ``G Wᵀ``, gradient ``Oᵀ G`` and ``1ᵀ G``."""

        @staticmethod
        def forward(ctx, o, w, b):
            ctx.save_for_backward(o, w)
            return torch.addmm(b, o, w)

        @staticmethod
        def backward(ctx, g):
            o, w = ctx.saved_tensors
            d_o = g @ w.T if ctx.needs_input_grad[0] else None
            return d_o, o.T @ g, g.sum(0)

    class Relu(torch.autograd.Function):
        """``F = max(z, 0)``, backward ``G ⊙ [F > 0]`` from the saved output."""

        @staticmethod
        def forward(ctx, z):
            f = z.clamp_min(0)
            ctx.save_for_backward(f)
            return f

        @staticmethod
        def backward(ctx, g):
            (f,) = ctx.saved_tensors
            return g * (f > 0)

    class SoftmaxCrossEntropy(torch.autograd.Function):
        """Mean of ``−log softmax(z)[label]``; backward ``(p − onehot) / m``."""

        @staticmethod
        def forward(ctx, z, labels):
            log_p = torch.log_softmax(z, dim=1)
            ctx.save_for_backward(log_p, labels)
            return -log_p.gather(1, labels[:, None]).mean()

        @staticmethod
        def backward(ctx, g):
            log_p, labels = ctx.saved_tensors
            d = log_p.exp()
            d[torch.arange(len(labels), device=d.device), labels] -= 1
            return d * (g / len(labels)), None

    return Dense, Relu, SoftmaxCrossEntropy


class TorchMLP:
    """The MLP step in PyTorch: ``torch.autograd.Function``s with hand backward and ``torch.optim.Adam``."""

    def __init__(self, weights: Weights, lr: float, device: str = "cpu") -> None:
        import torch

        torch.set_num_threads(cores())
        self.torch, self.device = torch, device
        self.params = [torch.tensor(np.asarray(a), device=device, requires_grad=True) for pair in weights for a in pair]
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(B1, B2), eps=EPS)

    def loss(self, x: Any, labels: Any) -> Any:
        dense, relu, cross_entropy = _torch_functions()
        h = x.reshape(len(x), -1)
        pairs = list(zip(self.params[::2], self.params[1::2]))
        for k, (w, b) in enumerate(pairs):
            h = dense.apply(h, w, b)
            if k < len(pairs) - 1:
                h = relu.apply(h)
        return cross_entropy.apply(h, labels)

    def inputs(self, x: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
        """``(x, labels)`` as tensors on this peer's device."""
        return (
            self.torch.tensor(np.asarray(x), device=self.device),
            self.torch.tensor(np.asarray(labels, np.int64), device=self.device),
        )

    def matmul(self, n: int) -> Callable[[], Any]:
        """A closure that multiplies two ``n × n`` float32 matrices with PyTorch on this peer's device and threads."""
        a = self.torch.randn(n, n, device=self.device)

        def run():
            c = a @ a
            if self.device != "cpu":
                self.torch.cuda.synchronize()
            return c

        return run

    def gradients(self, x: Any, labels: Any) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The loss and ``[(∇W_k, ∇b_k)]`` (no update)."""
        for p in self.params:
            p.grad = None
        loss = self.loss(x, labels)
        loss.backward()
        grads = [p.grad.cpu().numpy() for p in self.params]
        return loss.item(), list(zip(grads[::2], grads[1::2]))

    def step(self, x: Any, labels: Any) -> Any:
        """One Adam step; returns the loss (a tensor, synchronised on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, labels)
        loss.backward()
        self.optimizer.step()
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return loss
