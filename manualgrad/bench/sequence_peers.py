"""The sequence models' training step as a PyTorch user would write it: ``torch.nn`` modules and autograd.

:class:`TorchGPT` is :func:`manualgrad.nn.gpt.gpt` in ``torch.nn``: ``nn.Embedding`` for the tokens and
the positions, per block ``nn.LayerNorm`` → ``nn.Linear`` projections → ``F.scaled_dot_product_attention``
with ``is_causal=True`` (PyTorch's fused kernel: FlashAttention's tiles on CPU and CUDA) →
``nn.Linear``, then ``nn.LayerNorm`` → ``nn.Linear`` → tanh GELU → ``nn.Linear``, each added to the
residual stream; a final ``nn.LayerNorm`` and ``nn.Linear`` head. :class:`TorchLSTM` is
:func:`manualgrad.nn.recurrent.char_model`'s LSTM: ``nn.Embedding`` → ``nn.LSTM`` (batch first, zero
initial state) → ``nn.Linear``. Both train with the masked mean cross-entropy of
:func:`manualgrad.nn.gpt.sequence_loss` (``F.cross_entropy`` per token, weighted by the mask) and
``torch.optim.Adam`` (:class:`~manualgrad.bench.peers.TorchPeer`).

Every parameter starts as the JAX model's, in its dtype (``nn.Linear`` holds ``Wᵀ``), so the first loss
and the gradients agree with the hand rules' to round-off; :meth:`SequencePeer.gradients` returns
them in the JAX params' structure and layouts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from manualgrad.bench.peers import B1, B2, EPS, TorchPeer, torch_module

# A JAX parameter's name → (the torch parameter's name, whether it is stored transposed)
_NAMES = {
    "w": ("weight", True),
    "b": ("bias", False),
    "gamma": ("weight", False),
    "beta": ("bias", False),
    "w_x": ("weight_ih_l0", True),
    "w_h": ("weight_hh_l0", True),
}


def _torch_names(params: Any, renamed: dict[str, str]) -> Any:
    """The JAX ``params`` tree with each leaf replaced by ``(torch name, transposed)``: a dict key or list
    index per module, the leaf's own key by :data:`_NAMES`, an embedding table as its module's
    ``weight``; ``renamed`` maps a JAX dotted name to the torch one where the two differ."""

    def name(path: Any, _: Any) -> tuple[str, bool]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        dotted = ".".join(keys)
        if dotted in renamed:
            return renamed[dotted], False
        if len(keys) == 1:
            return f"{keys[0]}.weight", False
        leaf, transposed = _NAMES[keys[-1]]
        return ".".join([*keys[:-1], leaf]), transposed

    return jax.tree_util.tree_map_with_path(name, params)


def _is_entry(node: Any) -> bool:
    return isinstance(node, tuple) and len(node) == 2 and isinstance(node[0], str)


def _entries(names: Any) -> list[tuple[str, bool]]:
    """The ``(torch name, transposed)`` leaves of :func:`_torch_names`' tree, in the JAX leaves' order."""
    return jax.tree_util.tree_leaves(names, is_leaf=_is_entry)


class SequencePeer(TorchPeer):
    """A sequence model in ``torch.nn`` at the JAX model's parameters: the loss of
    :func:`~manualgrad.nn.gpt.sequence_loss`, Adam, and the gradients in the JAX params' structure."""

    def __init__(self, modules: Any, params: Any, lr: float, device: str, renamed: dict[str, str]) -> None:
        super().__init__(device)
        self.dtype = getattr(self.torch, np.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name)
        self.model, self.names = modules.to(device=device, dtype=self.dtype).train(), _torch_names(params, renamed)
        named = dict(self.model.named_parameters())
        with self.torch.no_grad():
            for (name, transposed), value in zip(_entries(self.names), jax.tree_util.tree_leaves(params)):
                value = np.array(value)  # a writable copy: JAX's arrays are read-only to torch
                named[name].copy_(self.torch.from_numpy(np.ascontiguousarray(value.T if transposed else value)))
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.torch.optim.Adam(trained, lr=lr, betas=(B1, B2), eps=EPS)

    def logits(self, ids: Any) -> Any:
        """Next-token logits ``(N, T, V)`` of ids ``(N, T)``."""
        raise NotImplementedError

    def inputs(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[Any, Any]:
        """Token rows ``(N, T + 1)`` and the target mask ``(N, T)`` as tensors on this peer's device."""
        return (
            self.torch.tensor(np.asarray(tokens, np.int64), device=self.device),
            self.torch.tensor(np.asarray(mask), dtype=self.dtype, device=self.device),
        )

    def loss(self, tokens: Any, mask: Any) -> Any:
        logits = self.logits(tokens[:, :-1])
        nats = self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return (nats * mask.reshape(-1)).sum() / mask.sum()

    def gradients(self, tokens: Any, mask: Any) -> tuple[float, Any]:
        """The loss and the gradients, in the JAX params' structure and layouts (no update)."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(tokens, mask)
        loss.backward()
        return loss.item(), self._as_jax(lambda p: p.grad)

    def weights(self) -> Any:
        """The parameters as they are now, in the JAX params' structure and layouts."""
        return self._as_jax(lambda p: p)

    def _as_jax(self, of: Any) -> Any:
        named = dict(self.model.named_parameters())

        def leaf(entry: tuple[str, bool]) -> np.ndarray:
            name, transposed = entry
            value = of(named[name]).detach().cpu().numpy()
            return value.T if transposed else value

        return jax.tree_util.tree_map(leaf, self.names, is_leaf=_is_entry)


class TorchGPT(SequencePeer):
    """:func:`manualgrad.nn.gpt.gpt` in ``torch.nn`` (the module docstring), at the JAX ``params``."""

    def __init__(self, params: Any, heads: int, lr: float, device: str = "cpu") -> None:
        nn = torch_module().nn
        vocab, width = np.shape(params["tokens"])
        context, eps = np.shape(params["positions"])[0], 1e-5  # manualgrad.nn.gpt's layer_norm ε

        def block() -> Any:
            linear = {name: nn.Linear(width, width, bias=name != "k") for name in "qkvo"}
            norms = {"ln1": nn.LayerNorm(width, eps), "ln2": nn.LayerNorm(width, eps)}
            return nn.ModuleDict(
                {**linear, **norms, "fc": nn.Linear(width, 4 * width), "proj": nn.Linear(4 * width, width)}
            )

        modules = nn.ModuleDict(
            {
                "tokens": nn.Embedding(vocab, width),
                "positions": nn.Embedding(context, width),
                "blocks": nn.ModuleList([block() for _ in params["blocks"]]),
                "ln_f": nn.LayerNorm(width, eps),
                "head": nn.Linear(width, vocab),
            }
        )
        self.heads = heads
        super().__init__(modules, params, lr, device, {})

    def logits(self, ids: Any) -> Any:
        functional, m = self.torch.nn.functional, self.model
        n, t = ids.shape
        x = m["tokens"](ids) + m["positions"](self.torch.arange(t, device=ids.device))
        for block in m["blocks"]:
            h = block["ln1"](x)
            q, k, v = (block[name](h).view(n, t, self.heads, -1).transpose(1, 2) for name in "qkv")
            attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["o"](attended.transpose(1, 2).reshape(n, t, -1))
            x = x + block["proj"](functional.gelu(block["fc"](block["ln2"](x)), approximate="tanh"))
        return m["head"](m["ln_f"](x))


class TorchLSTM(SequencePeer):
    """:func:`manualgrad.nn.recurrent.char_model`'s LSTM in ``torch.nn`` at the JAX ``params``: ``nn.LSTM``
    holds ``w_xᵀ``, ``w_hᵀ`` and ``b`` as ``bias_ih_l0``; its second bias ``bias_hh_l0`` stays 0 and is not
    trained, so that the model and Adam's step are the JAX model's."""

    def __init__(self, params: Any, lr: float, device: str = "cpu") -> None:
        nn = torch_module().nn
        vocab, embed = np.shape(params["embedding"])
        width, outputs = np.shape(params["output"]["w"])
        modules = nn.ModuleDict(
            {
                "embedding": nn.Embedding(vocab, embed),
                "recurrent": nn.LSTM(embed, width, batch_first=True),
                "output": nn.Linear(width, outputs),
            }
        )
        with torch_module().no_grad():
            modules["recurrent"].bias_hh_l0.zero_()
        modules["recurrent"].bias_hh_l0.requires_grad_(False)
        super().__init__(modules, params, lr, device, {"recurrent.b": "recurrent.bias_ih_l0"})

    def logits(self, ids: Any) -> Any:
        hidden, _ = self.model["recurrent"](self.model["embedding"](ids))
        return self.model["output"](hidden)


def attention_peak_bytes(shape: tuple[int, int, int, int], device: str = "cpu") -> int:
    """The most bytes PyTorch's allocator holds at once, beyond ``q, k, v`` and the cotangent ``G``, while
    ``O = F.scaled_dot_product_attention(q, k, v, is_causal=True)`` and ``torch.autograd.grad(O, (q, k, v), G)``
    run, in float32 with ``shape`` ``(B, T, N, H)``: ``O``, what the backward keeps, its temporaries and
    the three gradients.

    On CUDA it is ``torch.cuda.max_memory_allocated`` after a reset, less the bytes held before; on the CPU
    the profiler's allocation and free events (``profile_memory=True``) summed in the order they happened,
    their largest running sum (PyTorch's CPU allocator keeps no peak of its own).
    """
    torch = torch_module()
    b, t, n, h = shape
    q, k, v = (torch.randn(b, n, t, h, device=device, requires_grad=True) for _ in range(3))
    cotangent = torch.randn(b, n, t, h, device=device)

    def run() -> Any:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), cotangent)

    run()  # the kernel's one-time buffers are not the attention's
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        run()
    events = sorted(
        (e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak
