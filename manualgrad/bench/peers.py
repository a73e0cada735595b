"""The MLP training step as a user would write it without manualgrad: NumPy and PyTorch, hand backward.

Both run seed 004's row form by hand, the way manual gradients are taught: the forward pass
keeps each layer's input ``O_k`` (for ReLU layers that is ``F_k = σ(a_k)``, Remark 8 of seed
002), then ``G ← softmax(z) − onehot`` scaled by ``1/m``, and per layer from the top
``∇W = Oᵀ G``, ``∇b = 1ᵀ G``, ``G ← (G Wᵀ) ⊙ [F > 0]``. The update is Adam with optax's
defaults (``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-8``), so one step does the same arithmetic as
``manualgrad.train.step.make_step`` with ``optax.adam``. The first layer's input needs no
gradient and gets none, as in the jitted step.

The model is :func:`manualgrad.nn.layers.mlp`: ``[(W_1, b_1), …, (W_L, b_L)]`` with ReLU between
the dense layers and logits out; inputs are flattened to ``(m, features)``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from manualgrad import extras
from manualgrad.bench.models import BenchError
from manualgrad.errors import MissingExtraError

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

    def masks(self, x: np.ndarray) -> list[np.ndarray]:
        """Each hidden layer's ReLU mask ``[a_k > 0]`` on ``x`` (the pre-activations as this peer rounds them)."""
        h, out = x.reshape(len(x), -1), []
        for w, b in self.weights[:-1]:
            z = h @ w + b
            out.append(z > 0)
            h = np.maximum(z, 0)
        return out

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


def torch_module() -> Any:
    """PyTorch, imported with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: OpenMP's
    default spin-waiting lets PyTorch's idle threads take the cores its working ones need on a
    shared machine, a cost of the machine rather than of PyTorch (``manualgrad bench``'s
    ``torch_threads`` and ``step_ratio_manual_over_torch`` figures measure the step either way)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return extras.require("torch", "bench", "the PyTorch peer")


def torch_reason() -> str | None:
    """Why the PyTorch peer cannot run here (the extra that installs it), or None when it can."""
    try:
        torch_module()
    except MissingExtraError as error:
        return str(error)
    return None


def torch_version() -> str | None:
    """PyTorch's version, or None where it is not installed."""
    return None if torch_reason() is not None else torch_module().__version__


def fastest_threads(step: Callable[[], Any], calls: int = 3) -> int:
    """1 or :func:`cores` PyTorch threads, whichever runs ``calls`` of ``step`` faster (a loaded
    machine can make one thread faster); PyTorch is left at that count."""
    torch = torch_module()

    seconds = {}
    for threads in sorted({1, cores()}, reverse=True):
        torch.set_num_threads(threads)
        step()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        seconds[threads] = time.perf_counter() - start
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best


def cores() -> int:
    """The CPU cores this process may run on: PyTorch's thread count for the peer."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_device(backend: str) -> str:
    """``cuda`` when JAX runs on a GPU and PyTorch sees one, else ``cpu``."""
    torch = torch_module()

    return "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"


def torch_matmul(n: int, device: str) -> Callable[[], Any]:
    """A closure that multiplies two ``n × n`` float32 matrices with PyTorch on ``device``."""
    torch = torch_module()

    a = torch.randn(n, n, device=device)

    def run():
        c = a @ a
        if device != "cpu":
            torch.cuda.synchronize()
        return c

    return run


@functools.cache
def _torch_functions():
    """The three ``torch.autograd.Function``s with hand backward: dense with bias, ReLU, softmax cross-entropy."""
    torch = torch_module()

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


class TorchPeer:
    """What the PyTorch peers share: PyTorch on all :func:`cores`, and the Adam step on the peer's :meth:`loss`."""

    optimizer: Any

    def __init__(self, device: str) -> None:
        self.torch, self.device = torch_module(), device
        self.torch.set_num_threads(cores())

    def loss(self, x: Any, labels: Any) -> Any:
        """The mean cross-entropy of the model on ``(x, labels)``, as a tensor autograd can differentiate."""
        raise NotImplementedError

    def step(self, x: Any, labels: Any) -> Any:
        """One Adam step; returns the loss (a tensor, synchronised on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, labels)
        loss.backward()
        self.optimizer.step()
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return loss


class TorchMLP(TorchPeer):
    """The MLP step in PyTorch: ``torch.autograd.Function``s with hand backward and ``torch.optim.Adam``."""

    def __init__(self, weights: Weights, lr: float, device: str = "cpu") -> None:
        super().__init__(device)
        torch = self.torch
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

    def masks(self, x: Any) -> list[np.ndarray]:
        """Each hidden layer's ReLU mask ``[a_k > 0]`` on ``x`` (the pre-activations as this peer rounds them)."""
        h, out = x.reshape(len(x), -1), []
        with self.torch.no_grad():
            for w, b in zip(self.params[:-2:2], self.params[1:-2:2]):
                z = self.torch.addmm(b, h, w)
                out.append((z > 0).cpu().numpy())
                h = z.clamp_min(0)
        return out

    def gradients(self, x: Any, labels: Any) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """The loss and ``[(∇W_k, ∇b_k)]`` (no update)."""
        for p in self.params:
            p.grad = None
        loss = self.loss(x, labels)
        loss.backward()
        grads = [p.grad.cpu().numpy() for p in self.params]
        return loss.item(), list(zip(grads[::2], grads[1::2]))


def _torch_conv(torch: Any, w: np.ndarray, b: np.ndarray | None, stride: Any, pads: Sequence[tuple[int, int]]) -> Any:
    """``torch.nn.Conv2d`` holding the HWIO kernel ``w`` as OIHW; XLA's asymmetric SAME padding
    (the extra row at the end) as a ``ZeroPad2d`` in front of it."""
    (top, bottom), (left, right) = pads
    conv = torch.nn.Conv2d(w.shape[2], w.shape[3], w.shape[:2], stride, bias=b is not None)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
        if b is not None:
            conv.bias.copy_(torch.tensor(b))
    if top == bottom and left == right:
        conv.padding = (top, left)
        return [conv]
    return [torch.nn.ZeroPad2d((left, right, top, bottom)), conv]


def _torch_dense(torch: Any, w: np.ndarray, b: np.ndarray | None, image: tuple[int, ...] | None) -> Any:
    """``torch.nn.Linear`` holding ``w`` (in, out) as ``wᵀ``; after an NCHW image (``image`` its HWC
    shape) the rows are reordered from JAX's ``(h, w, c)`` flattening to PyTorch's ``(c, h, w)``."""
    if image is not None:
        w = w.reshape(*image, -1).transpose(2, 0, 1, 3).reshape(w.shape)
    linear = torch.nn.Linear(*w.shape, bias=b is not None)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        if b is not None:
            linear.bias.copy_(torch.tensor(b))
    return linear


class TorchCNN(TorchPeer):
    """A :func:`manualgrad.nn.layers.cnn` step in PyTorch as a user would write it: ``torch.nn.Conv2d``,
    ``BatchNorm2d``/``BatchNorm1d`` (batch statistics, running statistics kept with momentum 0.1),
    ``Linear``, ``F.cross_entropy``, **autograd's own backward** (oneDNN's convolution adjoints) and
    ``torch.optim.Adam``; images ``channels_last`` by default (``memory_format``), which ran the bench's
    CNNs no slower than NCHW (``contiguous_format``): ``manualgrad bench --models digits_cnn,cnn_28,bn_cnn``
    measures the step of the format given here.

    The network is read off ``layers``/``params`` of ``layers.cnn``: conv → [norm] → ReLU per width,
    flatten, dense → [norm] → ReLU, dense. :meth:`gradients` returns the gradients in the JAX
    params' structure and layouts, so they compare leaf by leaf with the hand rules'.
    """

    def __init__(
        self,
        net_layers: Sequence[Any],
        params: Sequence[Any],
        input_shape: tuple[int, ...],
        lr: float,
        memory_format: str = "channels_last",
        device: str = "cpu",
    ) -> None:
        from manualgrad.rules import convolution

        super().__init__(device)
        torch = self.torch
        self.memory_format = getattr(torch, memory_format)
        modules, shape, last = [], tuple(input_shape), len(params) - 1
        self.leaves: list[tuple[Any, tuple[int, ...] | None]] = []  # per JAX param: its module, the image it flattens
        for k, (layer, p) in enumerate(zip(net_layers, params)):
            w, b = (np.asarray(p["w"]), np.asarray(p["b"]) if "b" in p else None) if "w" in p else (None, None)
            image = shape if layer.map == "dense" and len(shape) == 3 else None
            if layer.map == "conv2d":
                geo = convolution.geometry("conv2d", (1, *shape), w.shape, layer.stride, layer.padding, 1)
                modules += _torch_conv(torch, w, b, layer.stride, geo.pads)
                shape = (*geo.output, w.shape[-1])
            elif layer.map == "dense":
                modules += [torch.nn.Flatten()] if image else []
                modules.append(_torch_dense(torch, w, b, image))
                shape = (w.shape[-1],)
            elif layer.map == "batch_norm":
                norm = torch.nn.BatchNorm2d if len(shape) == 3 else torch.nn.BatchNorm1d
                modules.append(norm(shape[-1], eps=layer.eps))
            elif layer.map is not None:
                raise BenchError(f"TorchCNN: no PyTorch peer for {layer.map!r} (only conv2d, batch_norm, dense)")
            self.leaves.append((modules[-1] if layer.map is not None else None, image))
            if layer.map is not None and k < last and net_layers[k + 1].map != "batch_norm":
                modules.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*modules).to(device=device, memory_format=self.memory_format).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(B1, B2), eps=EPS)

    def inputs(self, x: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
        """NHWC ``x`` as an NCHW tensor in this peer's memory format, and the labels."""
        images = self.torch.tensor(np.asarray(x)).permute(0, 3, 1, 2)
        return (
            images.contiguous(memory_format=self.memory_format).to(self.device),
            self.torch.tensor(np.asarray(labels, np.int64), device=self.device),
        )

    def loss(self, x: Any, labels: Any) -> Any:
        return self.torch.nn.functional.cross_entropy(self.model(x), labels)

    def gradients(self, x: Any, labels: Any) -> tuple[float, list[Any]]:
        """The loss and the gradients, as a list like the JAX params (HWIO kernels, ``(in, out)`` dense
        weights in JAX's flattening order). Batch norm's running statistics are left as they were."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(x, labels)
        loss.backward()
        self.model.load_state_dict(saved)
        return loss.item(), [() if module is None else _jax_gradient(module, image) for module, image in self.leaves]


def _jax_gradient(module: Any, image: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    """A PyTorch module's parameter gradients in the layout of its JAX params (:class:`TorchCNN`)."""
    weight = module.weight.grad.detach().cpu().numpy()
    bias = None if module.bias is None else module.bias.grad.detach().cpu().numpy()
    if module.weight.ndim == 1:  # batch norm
        return {"gamma": weight, "beta": bias}
    if module.weight.ndim == 4:
        w = weight.transpose(2, 3, 1, 0)
    else:
        w = weight.T
        if image is not None:
            h, wd, c = image
            w = w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(w.shape)
    return {"w": w} if bias is None else {"w": w, "b": bias}
