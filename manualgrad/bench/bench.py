"""``manualgrad bench``: what do the hand rules cost against ``jax.grad``, NumPy and PyTorch?

Every figure comes from one run on one machine. A machine whose speed drifts (a shared CPU's
does, over tens of seconds) makes single timings meaningless, so the contenders of a model
are timed **interleaved** — hand rules, ``jax.grad``, the peers, a large matmul, one after the
other, the order reversed every repetition — and a ratio is the median of the per-repetition
ratios, hand rules first (``step_ratio_manual_over_jax_grad``).

The step is :func:`manualgrad.train.step.make_step`: forward, backward and the optax update in one
jitted program with parameters, optimizer state and model state donated, the model in training
mode (batch norm's running statistics updated). ``manual`` runs the registered hand rules;
``jax_grad`` is the same :mod:`manualgrad.nn.layers` model built from the rules' plain-``jnp``
references and differentiated by JAX (``--grad autodiff`` of ``manualgrad train``). For models
with normalisation layers the bench also reports those layers' own residual bytes, each layer's
VJP taken alone at the activations it sees (:func:`~manualgrad.bench.memory.norm_residual_bytes`); for
models with attention, one attention's residual bytes and its peak bytes forward and backward, beside
PyTorch's ``scaled_dot_product_attention``'s (:func:`~manualgrad.bench.memory.attention_peak_bytes`,
:func:`~manualgrad.bench.sequence_peers.attention_peak_bytes`).

The models are :mod:`~manualgrad.bench.models`', the memory figures
:mod:`~manualgrad.bench.memory`'s, and :mod:`~manualgrad.bench.report` shows the run as text or JSON.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from manualgrad import runtime
from manualgrad.bench import memory, peers, sequence_peers
from manualgrad.bench.memory import backprop_memory, compiled_bytes
from manualgrad.bench.models import KEY, LEARNING_RATE, MODELS, BenchError, Model, inputs
from manualgrad.bench.report import Record, judge, record, table, to_json
from manualgrad.check.tolerances import relative_l2
from manualgrad.nn import layers
from manualgrad.train import step

# The measuring below, and the models, memory figures and report that the command line and the
# comparisons scripts reach as ``bench.NAME``.
__all__ = [
    "MODELS",
    "QUICK",
    "Settings",
    "backprop_memory",
    "bench_model",
    "check_seconds",
    "compile_step",
    "compiled_bytes",
    "interleaved",
    "machine",
    "median_ratio",
    "relu_flips",
    "relu_masks",
    "run",
    "step_flops",
    "table",
    "to_json",
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``manualgrad bench`` runs; ``--quick`` is a smoke test in seconds, not a measurement."""

    models: tuple[str, ...] = tuple(MODELS)
    repeats: int = 10
    warmup: int = 2
    compile_repeats: int = 3
    sample_seconds: float = 0.02
    matmul_size: int | None = None
    peers: bool = True
    check_rules: tuple[str, ...] | None = ()  # rules for `manualgrad check`: () all of them, None no check
    seed: int = 0

    def matmul_n(self) -> int:
        """The side of the square float32 matmul that measures the peak: 2048 on CPU, 8192 on accelerators."""
        if self.matmul_size is not None:
            return self.matmul_size
        return 2048 if jax.default_backend() == "cpu" else 8192


QUICK = Settings(
    models=("digits_mlp", "digits_cnn"),
    repeats=3,
    warmup=1,
    compile_repeats=1,
    sample_seconds=0.0,
    matmul_size=256,
    check_rules=("relu",),
)


# --------------------------------------------------------------------------- timing


def interleaved(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, sample_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each contender, sampled in turn ``repeats`` times after ``warmup`` calls each.

    The order is reversed on every other repetition so that neither side always runs first.
    A sample is ``calls`` calls, the same number for every contender, enough that the slowest
    contender's sample lasts ``sample_seconds`` (steps of microseconds are timed in bulk).
    """
    for run in contenders.values():
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(run())
    slowest = max(_seconds(run, 1) for run in contenders.values())
    calls = max(1, math.ceil(sample_seconds / slowest))
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for i in range(repeats):
        for name in order if i % 2 == 0 else order[::-1]:
            times[name].append(_seconds(contenders[name], calls))
    return times


def _seconds(run: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def median_ratio(times: dict[str, list[float]], top: str, bottom: str) -> float:
    """The median over repetitions of ``times[top][i] / times[bottom][i]``."""
    return statistics.median(a / b for a, b in zip(times[top], times[bottom]))


# --------------------------------------------------------------------------- one model


def compile_step(
    net: layers.Layer, grad: str, params: Any, x: jax.Array, labels: jax.Array, sequences: bool = False
) -> tuple[Any, float]:
    """``step.make_step`` for ``grad`` (``manual`` or ``autodiff``), lowered and compiled; and the seconds that took.
    ``(x, labels)`` are token rows and target mask for a sequence model (``sequences``)."""
    tx = optax.adam(LEARNING_RATE)
    start = time.perf_counter()
    jitted = step.make_step(step.loss_fn(net, grad, sequences), tx)
    compiled = jitted.lower(params, tx.init(params), net.init_state(params), x, labels, KEY).compile()
    return compiled, time.perf_counter() - start


def step_flops(net: layers.Layer, params: Any, x: jax.Array) -> int:
    """Matmul FLOPs of one step of ``net`` on ``x``: per dense or conv layer with ``|Z|`` output
    entries and fan-in ``f`` (every axis of ``W`` but the last: ``in``, or ``kh·kw·C_in``, taps in
    the padding counted), ``2·|Z|·f`` forward, as much for ``∇W = Pᵀ G`` and as much for the
    input's gradient — except in the first layer, whose input gets no gradient (XLA drops it)."""
    flops, first, h = 0, True, jax.ShapeDtypeStruct(x.shape, x.dtype)
    for layer, p in zip(net.layers, params):
        h = jax.eval_shape(lambda p, h, layer=layer: layer.apply(p, h, train=True, key=KEY), p, h)
        if layer.map in ("dense", "conv2d"):
            flops += (4 if first else 6) * math.prod(h.shape) * math.prod(p["w"].shape[:-1])
            first = False
    return flops


def _stepper(compiled: Any, net: layers.Layer, params: Any, x: jax.Array, labels: jax.Array) -> Callable[[], Any]:
    """A closure that runs one donated step and keeps the new parameters, optimizer and model state."""
    tx = optax.adam(LEARNING_RATE)
    state = [jax.tree_util.tree_map(jnp.copy, params), tx.init(params), net.init_state(params)]

    def run():
        out = compiled(*state, x, labels, KEY)
        state[:] = out[:3]
        return out[3]

    return run


def _peer_contenders(
    model: Model, params: Any, x: jax.Array, labels: jax.Array, manual_grads: Any, n: int
) -> tuple[dict, list[Record], str | None]:
    """The NumPy (MLPs) and, when importable, PyTorch steps and PyTorch's ``n × n`` matmul; how far
    their gradients are from the hand rules'; PyTorch's thread count (:func:`peers.fastest_threads`)."""
    host_x, host_labels = np.asarray(x), np.asarray(labels)
    out: dict[str, Callable[[], Any]] = {}
    checks, records, masks = [], [], {}
    if model.mlp:
        weights = [(np.asarray(w), np.asarray(b)) for w, b in peers.dense_weights(params)]
        numpy_peer = peers.NumpyMLP(weights, LEARNING_RATE)
        out["numpy"] = lambda: numpy_peer.step(host_x, host_labels)
        checks.append(("numpy", numpy_peer.gradients(host_x, host_labels)[1]))
        masks["numpy"] = numpy_peer.masks(host_x)
    reason = peers.torch_reason()
    if reason is None:
        device = peers.torch_device(jax.default_backend())
        torch_peer = _torch_peer(model, params, device)
        tx, tl = torch_peer.inputs(host_x, host_labels)
        checks.append(("torch", torch_peer.gradients(tx, tl)[1]))
        if model.mlp:
            masks["torch"] = torch_peer.masks(tx)
        out["torch"] = lambda: torch_peer.step(tx, tl)
        records.append(record("torch_threads", peers.fastest_threads(out["torch"]), "threads"))
        out["torch_matmul"] = peers.torch_matmul(n, device)
    # An MLP's peers return [(∇W, ∇b)] per layer; the CNN peer returns the params' own structure.
    expected = peers.dense_weights(manual_grads) if model.mlp else manual_grads
    records += [
        record(f"gradient_difference_{name}_vs_manual", relative_l2(grads, expected), "relative L2")
        for name, grads in checks
    ]
    if masks:
        manual_masks = relu_masks(model.build(), params, x)
        records += [
            record(f"relu_flips_{name}_vs_manual", relu_flips(peer, manual_masks), "count")
            for name, peer in masks.items()
        ]
    return out, records, reason


def _torch_peer(model: Model, params: Any, device: str) -> Any:
    """The PyTorch peer of ``model`` at ``params``: hand-backward MLP, or ``torch.nn`` and autograd (CNN, GPT, LSTM)."""
    if model.heads:
        return sequence_peers.TorchGPT(params, model.heads, LEARNING_RATE, device)
    if model.sequences:
        return sequence_peers.TorchLSTM(params, LEARNING_RATE, device)
    if model.mlp:
        weights = [(np.asarray(w), np.asarray(b)) for w, b in peers.dense_weights(params)]
        return peers.TorchMLP(weights, LEARNING_RATE, device)
    return peers.TorchCNN(model.build().layers, params, model.input_shape, LEARNING_RATE, device=device)


def relu_masks(net: layers.Layer, params: Any, x: jax.Array) -> list[np.ndarray]:
    """The hand rules' ReLU masks ``[a_k > 0]`` of an MLP (:func:`~manualgrad.nn.layers.mlp`): the
    input of every layer after a dense one, computed layer by layer as the step computes it."""
    out = []
    for k, (layer, p) in enumerate(zip(net.layers, params)):
        if k and net.layers[k - 1].map == "dense":
            out.append(np.asarray(x) > 0)
        x = layer.apply(p, x, train=True, key=KEY)
    return out


def relu_flips(peer: Sequence[np.ndarray], manual: Sequence[np.ndarray]) -> int:
    """How many ReLU inputs fall on the other side of 0 in a peer than in the hand rules.

    A pre-activation within float32 rounding of 0 (about ``fan_in · 2⁻²⁴ · Σ|h||w|``) can
    round to either sign; where it does, that unit's backward ``G ⊙ [a > 0]`` keeps or drops
    one sample's whole contribution, which is no round-off: the ``relu_flips_*`` figures count
    them, so that a ``gradient_difference_*`` far above round-off is explained.
    """
    return int(sum(np.sum(a != b) for a, b in zip(peer, manual)))


def _compile_both(
    net: layers.Layer, params: Any, x: jax.Array, labels: jax.Array, repeats: int, sequences: bool = False
) -> tuple[dict[str, Any], list[Record]]:
    """The step compiled for each side, ``repeats`` times interleaved, and the compile-time figures."""
    compiled: dict[str, Any] = {}
    compile_times: dict[str, list[float]] = {"manual": [], "jax_grad": []}
    for i in range(max(repeats, 1)):
        for side in ("manual", "jax_grad") if i % 2 == 0 else ("jax_grad", "manual"):
            compiled[side], seconds = compile_step(
                net, "autodiff" if side == "jax_grad" else "manual", params, x, labels, sequences
            )
            compile_times[side].append(seconds)
    records = [record(f"compile_s_{side}", statistics.median(compile_times[side]), "s") for side in compile_times]
    records.append(
        record("compile_ratio_manual_over_jax_grad", median_ratio(compile_times, "manual", "jax_grad"), "ratio")
    )
    return compiled, records


def _both_sides(figure: str, ratio: str, values: dict[str, Any], unit: str = "bytes") -> list[Record]:
    """``{figure}_manual``, ``{figure}_jax_grad`` and ``{ratio}_ratio_manual_over_jax_grad``."""
    records = [record(f"{figure}_{side}", values[side], unit) for side in values]
    return records + [record(f"{ratio}_ratio_manual_over_jax_grad", values["manual"] / values["jax_grad"], "ratio")]


def _gradients_and_memory(
    net: layers.Layer, compiled: dict[str, Any], params: Any, x: jax.Array, labels: jax.Array, model: Model
) -> tuple[dict[str, Any], list[Record]]:
    """Each side's gradient, their difference, and the compiled and residual bytes (training mode)."""
    loss = {
        side: (
            lambda p, x, y, grad=grad: step.loss_fn(net, grad, model.sequences)(p, None, x, y, train=True, key=KEY)[0]
        )
        for side, grad in (("manual", "manual"), ("jax_grad", "autodiff"))
    }
    grads = {side: jax.jit(jax.grad(fn))(params, x, labels) for side, fn in loss.items()}
    difference = relative_l2(jax.tree_util.tree_leaves(grads["jax_grad"]), jax.tree_util.tree_leaves(grads["manual"]))
    records = [record("gradient_difference_jax_grad_vs_manual", difference, "relative L2")]
    nbytes = {side: memory.footprint(c) for side, c in compiled.items()}
    if None in nbytes.values():
        records.append(
            record("compiled_bytes", None, "bytes", skipped="memory_analysis() reports nothing on this backend")
        )
    else:
        records += _both_sides("compiled_bytes", "memory", nbytes)
    residuals = {side: memory.residual_bytes(fn, params, x, labels) for side, fn in loss.items()}
    records += _both_sides("residual_bytes", "residual", residuals)
    if model.heads:
        records += _both_sides("attention_residual_bytes", "attention_residual", memory.attention_residual_bytes(model))
    elif not model.sequences and (norms := memory.norm_residual_bytes(net, params, x)) is not None:
        records += _both_sides("norm_residual_bytes", "norm_residual", norms)
    return grads, records


def _attention_peak(model: Model, with_peers: bool) -> list[Record]:
    """One attention's peak bytes beyond its arguments, forward and backward: hand rule, ``jax.grad`` and,
    ``with_peers`` where it is installed, PyTorch's ``scaled_dot_product_attention``
    (:func:`sequence_peers.attention_peak_bytes`)."""
    shape = memory.attention_shape(model)
    nbytes = memory.attention_peak_bytes(shape)
    if None in nbytes.values():
        return [record("attention_peak_bytes", None, "bytes", skipped="memory_analysis() reports nothing here")]
    records = _both_sides("attention_peak_bytes", "attention_peak", nbytes)
    if not with_peers:
        return records
    reason = peers.torch_reason()
    if reason is not None:
        return records + [record("attention_peak_ratio_manual_over_torch", None, "ratio", skipped=reason)]
    torch_bytes = sequence_peers.attention_peak_bytes(shape, peers.torch_device(jax.default_backend()))
    return records + [
        record("attention_peak_bytes_torch", torch_bytes, "bytes"),
        record("attention_peak_ratio_manual_over_torch", nbytes["manual"] / torch_bytes, "ratio"),
    ]


def _contenders(
    model: Model, settings: Settings, compiled: dict[str, Any], params: Any, x: jax.Array, labels: jax.Array, grads: Any
) -> tuple[dict[str, Callable[[], Any]], list[Record], str | None]:
    """What is timed: both steps, the matmul, and the peers (with the peers' gradient checks
    and the reason PyTorch is missing, if it is)."""
    contenders = {side: _stepper(c, model.build(), params, x, labels) for side, c in compiled.items()}
    n = settings.matmul_n()
    a = jax.random.normal(jax.random.PRNGKey(settings.seed), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    contenders["matmul"] = lambda: matmul(a, a)
    if not settings.peers:
        return contenders, [], None
    more, checks, torch_reason = _peer_contenders(model, params, x, labels, grads["manual"], n)
    return {**contenders, **more}, checks, torch_reason


def _step_records(times: dict[str, list[float]], torch_reason: str | None) -> list[Record]:
    """Each step's median time and the hand rules' ratio to every other step."""
    steps = [side for side in times if not side.endswith("matmul")]
    records = [record(f"step_ms_{side}", 1e3 * statistics.median(times[side]), "ms") for side in steps]
    records += [
        record(f"step_ratio_manual_over_{side}", median_ratio(times, "manual", side), "ratio")
        for side in steps
        if side != "manual"
    ]
    if torch_reason is not None:
        records.append(record("step_ratio_manual_over_torch", None, "ratio", skipped=torch_reason))
    return records


def _flops_records(times: dict[str, list[float]], flops: int, settings: Settings) -> list[Record]:
    """A step's FLOPs, its FLOP/s, the matmul's (the peak), and the fraction of the peak reached."""
    n = settings.matmul_n()
    peak_flops = 2 * n**3
    records = [
        record("step_flops", flops, "FLOP"),
        record("flops_per_s_manual", flops / statistics.median(times["manual"]), "FLOP/s"),
        record(
            "matmul_flops_per_s", peak_flops / statistics.median(times["matmul"]), "FLOP/s", matmul=f"{n}x{n} float32"
        ),
        record(
            "flops_fraction_manual_of_matmul", median_ratio(times, "matmul", "manual") * flops / peak_flops, "fraction"
        ),
    ]
    if "torch_matmul" in times:
        records.append(
            record(
                "torch_matmul_flops_per_s",
                peak_flops / statistics.median(times["torch_matmul"]),
                "FLOP/s",
                matmul=f"{n}x{n} float32, torch.mm",
            )
        )
    return records


def bench_model(name: str, settings: Settings) -> list[Record]:
    """Every figure for one model of :data:`MODELS`."""
    model = MODELS[name]
    net = model.build()
    params, x, labels = inputs(model, settings.seed)
    compiled, records = _compile_both(net, params, x, labels, settings.compile_repeats, model.sequences)
    grads, memory = _gradients_and_memory(net, compiled, params, x, labels, model)
    contenders, checks, torch_reason = _contenders(model, settings, compiled, params, x, labels, grads)
    times = interleaved(contenders, settings.repeats, settings.warmup, settings.sample_seconds)
    records += memory + checks + _step_records(times, torch_reason)
    if model.heads:
        records += _attention_peak(model, settings.peers)
    flops = step_flops(net, params, x)
    if flops:  # 0 for a model that is not a serial of dense and conv layers (the sequence models)
        records += _flops_records(times, flops, settings)
    return [{**rec, "model": name} for rec in records]


# --------------------------------------------------------------------------- check, machine, run


def check_seconds(rules: Sequence[str]) -> list[Record]:
    """Wall time of ``python -m manualgrad check --dtype float64 [RULE ...]`` (all rules when empty),
    in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "manualgrad", "check", "--dtype", "float64", *rules], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    what = "all rules" if not rules else " ".join(rules)
    return [record("check_seconds_float64", seconds, "s", rules=what, passed=done.returncode == 0)]


def machine() -> dict[str, Any]:
    """CPU model, cores, backend and device, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "cpu": cpu,
        "cores": peers.cores(),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "numpy": np.__version__,
        "torch": peers.torch_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host_memory": runtime.host_memory(),
        "compiler_options": step.compiler_options(jax.default_backend()),
    }


def run(settings: Settings = Settings(), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure of ``manualgrad bench``: ``{"machine", "settings", "records", "models"}``."""
    unknown = [m for m in settings.models if m not in MODELS]
    if unknown:
        raise BenchError(f"bench: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    started = time.perf_counter()
    records: list[Record] = []
    for name in settings.models:
        if progress:
            progress(f"{name}: {MODELS[name].description}")
        records += bench_model(name, settings)
    if settings.check_rules is not None:
        if progress:
            progress("manualgrad check --dtype float64")
        records += check_seconds(settings.check_rules)
    described = dataclasses.asdict(settings) | {
        "matmul_size": settings.matmul_n(),
        "optimizer": f"adam {LEARNING_RATE}",
        "dtype": "float32",
        "seconds": time.perf_counter() - started,
    }
    return {
        "machine": machine(),
        "settings": described,
        "records": [judge(rec) for rec in records],
        "models": {name: MODELS[name].description for name in settings.models},
    }
