"""``manualgrad bench``: what do the hand rules cost against ``jax.grad``, NumPy and PyTorch?

Every figure comes from one run on one machine. A machine whose speed drifts (a shared CPU can
drift 2× over tens of seconds) makes single timings meaningless, so the contenders of a model
are timed **interleaved** — hand rules, ``jax.grad``, the peers, a large matmul, one after the
other, the order reversed every repetition — and a ratio is the median of the per-repetition
ratios, hand rules first (``step_ratio_manual_over_jax_grad``).

The step is :func:`manualgrad.train.loop.make_step`: forward, backward and the optax update in one
jitted program with parameters, optimizer state and model state donated, the model in training
mode (batch norm's running statistics updated). ``manual`` runs the registered hand rules;
``jax_grad`` is the same :mod:`manualgrad.nn.layers` model built from the rules' plain-``jnp``
references and differentiated by JAX (``--grad autodiff`` of ``manualgrad train``). For models
with normalisation layers the bench also reports those layers' own residual bytes, each layer's
VJP taken alone at the activations it sees (:func:`norm_residual_bytes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from manualgrad import runtime
from manualgrad.bench import peers
from manualgrad.check.tolerances import relative_l2
from manualgrad.nn import backprop, gpt, layers, recurrent
from manualgrad.rules.attention import attention, attention_reference
from manualgrad.train import loop

LEARNING_RATE = 3e-3
KEY = np.zeros(2, np.uint32)  # dropout's key in every benchmarked step: PRNGKey(0)'s data, made without a JAX backend
NORMS = ("batch_norm", "layer_norm", "group_norm", "rms_norm")  # the maps of the normalisation layers


class Model(NamedTuple):
    """A benchmarked model: a :mod:`manualgrad.nn.layers` network, its input shape (no batch) and batch size;
    for a sequence model (:mod:`manualgrad.nn.gpt`) ``vocab`` > 0, ``input_shape`` ``(T,)`` and its attention's
    ``heads``."""

    description: str
    build: Callable[[], layers.Layer]
    input_shape: tuple[int, ...]
    batch: int
    mlp: bool
    vocab: int = 0
    heads: int = 0

    @property
    def sequences(self) -> bool:
        return self.vocab > 0


WORDS_VOCAB, WORDS_LENGTH = 27, 23  # --dataset words: "." and a–z; the longest word, 22 letters, and its "."
LONG = {"width": 64, "depth": 1, "heads": 4, "context": 512}  # gpt_long: one block, attention over 512 positions


MODELS: dict[str, Model] = {
    "digits_mlp": Model(
        "digits MLP 64-128-10 (train --model mlp), batch 32", lambda: layers.mlp(10, (128,)), (8, 8, 1), 32, True
    ),
    "mlp_1024": Model("MLP 784-1024-1024-10, batch 256", lambda: layers.mlp(10, (1024, 1024)), (784,), 256, True),
    "mlp_large": Model("MLP 2048-2048-2048-10, batch 1024", lambda: layers.mlp(10, (2048, 2048)), (2048,), 1024, True),
    "digits_cnn": Model(
        "digits CNN 8x8x1 (train's default cnn), batch 32", lambda: layers.cnn(10), (8, 8, 1), 32, False
    ),
    "cnn_28": Model(
        "CNN 28x28x1: conv3x3x32, conv3x3x64/2, dense 128, dense 10, batch 128",
        lambda: layers.cnn(10, (32, 64), 128),
        (28, 28, 1),
        128,
        False,
    ),
    "bn_cnn": Model(
        "cnn_28 with batch_norm after each conv and the dense 128 (train --norm batch; no bias before it), batch 128",
        lambda: layers.cnn(10, (32, 64), 128, norm=layers.BatchNorm()),
        (28, 28, 1),
        128,
        False,
    ),
    "gpt": Model(
        "the default GPT of train --model gpt --dataset words (width {width}, {depth} blocks, {heads} heads), ".format(
            **loop.GPT
        )
        + f"T = {WORDS_LENGTH}, "
        f"batch {loop.MODEL_DEFAULTS['gpt']['batch_size']}",
        lambda: gpt.gpt(WORDS_VOCAB, WORDS_LENGTH, **loop.GPT),
        (WORDS_LENGTH,),
        loop.MODEL_DEFAULTS["gpt"]["batch_size"],
        False,
        WORDS_VOCAB,
        loop.GPT["heads"],
    ),
    "lstm": Model(
        "the default character LSTM of train --model lstm --dataset words (embedding {embed}, width {width}), ".format(
            **recurrent.DEFAULTS["lstm"]._asdict()
        )
        + f"T = {WORDS_LENGTH}, batch {recurrent.DEFAULTS['lstm'].batch_size}; "
        "jax_grad differentiates the reference's scan",
        lambda: recurrent.char_model("lstm", WORDS_VOCAB),
        (WORDS_LENGTH,),
        recurrent.DEFAULTS["lstm"].batch_size,
        False,
        WORDS_VOCAB,
    ),
    "gpt_long": Model(
        f"a GPT of one block, width 64, 4 heads, T = S = 512, vocabulary {WORDS_VOCAB}, batch 8",
        lambda: gpt.gpt(WORDS_VOCAB, **LONG),
        (LONG["context"],),
        8,
        False,
        WORDS_VOCAB,
        LONG["heads"],
    ),
}
# Goals of issue 7, per figure: (comparison, bound) — applied to every model unless keyed by one.
GOALS: dict[str, tuple[str, float]] = {
    "step_ratio_manual_over_jax_grad": ("<=", 1.0),
    "memory_ratio_manual_over_jax_grad": ("<=", 1.0),
    "step_ratio_manual_over_numpy": ("<=", 1.0),
    "step_ratio_manual_over_torch": ("<=", 1.0),
    "mlp_large/flops_fraction_manual_of_matmul": (">=", 0.90),
    "gpt_long/residual_ratio_manual_over_jax_grad": ("<=", 0.5),  # issue 14: no T×S probabilities kept
    "check_seconds_float64": ("<", 30.0),
}


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


Record = dict[str, Any]


def record(figure: str, value: float | None, unit: str, **extra: Any) -> Record:
    """One figure: ``figure``, ``model`` (None for whole-run figures), ``value``, ``unit``, and extras."""
    return {"figure": figure, "model": None, "value": value, "unit": unit, **extra}


def judge(rec: Record) -> Record:
    """``rec`` with ``goal`` and ``meets_goal`` where issue 7 sets a goal for its figure."""
    goal = GOALS.get(f"{rec['model']}/{rec['figure']}") or GOALS.get(rec["figure"])
    if goal is None or rec["value"] is None:
        return rec
    op, bound = goal
    met = {"<=": rec["value"] <= bound, ">=": rec["value"] >= bound, "<": rec["value"] < bound}[op]
    return {**rec, "goal": f"{op} {bound:g}", "meets_goal": bool(met)}


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


def _inputs(model: Model, seed: int) -> tuple[Any, jax.Array, jax.Array]:
    """Parameters and a batch: images or features and labels below 10, or random token rows (``T + 1`` ids)
    with every target counted."""
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    _, params = model.build().init(kp, (-1, *model.input_shape))
    if model.sequences:
        (length,) = model.input_shape
        tokens = jax.random.randint(kx, (model.batch, length + 1), 0, model.vocab)
        return params, tokens, jnp.ones((model.batch, length), bool)
    x = jax.random.normal(kx, (model.batch, *model.input_shape), jnp.float32)
    return params, x, jax.random.randint(ky, (model.batch,), 0, 10)


def compile_step(
    net: layers.Layer, grad: str, params: Any, x: jax.Array, labels: jax.Array, sequences: bool = False
) -> tuple[Any, float]:
    """``loop.make_step`` for ``grad`` (``manual`` or ``autodiff``), lowered and compiled; and the seconds that took.
    ``(x, labels)`` are token rows and target mask for a sequence model (``sequences``)."""
    tx = optax.adam(LEARNING_RATE)
    start = time.perf_counter()
    step = loop.make_step(loop.loss_fn(net, grad, sequences), tx)
    compiled = step.lower(params, tx.init(params), net.init_state(params), x, labels, KEY).compile()
    return compiled, time.perf_counter() - start


def footprint(compiled: Any) -> int | None:
    """Compiled bytes: temporaries + arguments + outputs − aliased (donated) bytes; None where unreported."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )


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
    """The PyTorch peer of ``model`` at ``params``: hand-backward MLP or autograd CNN."""
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
    one sample's whole contribution, which is no round-off: on ``mlp_1024`` one flip (``a ≈ −2·10⁻⁷``)
    moves the gradients' relative L2 difference from 2·10⁻⁷ to 1.6·10⁻³.
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


def _gradients_and_memory(
    net: layers.Layer, compiled: dict[str, Any], params: Any, x: jax.Array, labels: jax.Array, model: Model
) -> tuple[dict[str, Any], list[Record]]:
    """Each side's gradient, their difference, and the compiled and residual bytes (training mode)."""
    loss = {
        side: (
            lambda p, x, y, grad=grad: loop.loss_fn(net, grad, model.sequences)(p, None, x, y, train=True, key=KEY)[0]
        )
        for side, grad in (("manual", "manual"), ("jax_grad", "autodiff"))
    }
    grads = {side: jax.jit(jax.grad(fn))(params, x, labels) for side, fn in loss.items()}
    records = [
        record(
            "gradient_difference_jax_grad_vs_manual",
            relative_l2(jax.tree_util.tree_leaves(grads["jax_grad"]), jax.tree_util.tree_leaves(grads["manual"])),
            "relative L2",
        )
    ]
    nbytes = {side: footprint(c) for side, c in compiled.items()}
    if None in nbytes.values():
        records.append(
            record("compiled_bytes", None, "bytes", skipped="memory_analysis() reports nothing on this backend")
        )
    else:
        records += [record(f"compiled_bytes_{side}", nbytes[side], "bytes") for side in nbytes]
        records.append(record("memory_ratio_manual_over_jax_grad", nbytes["manual"] / nbytes["jax_grad"], "ratio"))
    residuals = {side: residual_bytes(fn, params, x, labels) for side, fn in loss.items()}
    records += [record(f"residual_bytes_{side}", residuals[side], "bytes") for side in residuals]
    records.append(record("residual_ratio_manual_over_jax_grad", residuals["manual"] / residuals["jax_grad"], "ratio"))
    norms = norm_residual_bytes(net, params, x) if not model.sequences else attention_residual_bytes(model)
    if model.heads:
        records += [record(f"attention_residual_bytes_{side}", norms[side], "bytes") for side in norms]
        records.append(
            record("attention_residual_ratio_manual_over_jax_grad", norms["manual"] / norms["jax_grad"], "ratio")
        )
    elif norms is not None:
        records += [record(f"norm_residual_bytes_{side}", norms[side], "bytes") for side in norms]
        records.append(record("norm_residual_ratio_manual_over_jax_grad", norms["manual"] / norms["jax_grad"], "ratio"))
    return grads, records


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
    if not settings.peers or model.sequences:  # no NumPy or PyTorch peer of a sequence model
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
    params, x, labels = _inputs(model, settings.seed)
    compiled, records = _compile_both(net, params, x, labels, settings.compile_repeats, model.sequences)
    grads, memory = _gradients_and_memory(net, compiled, params, x, labels, model)
    contenders, checks, torch_reason = _contenders(model, settings, compiled, params, x, labels, grads)
    times = interleaved(contenders, settings.repeats, settings.warmup, settings.sample_seconds)
    records += memory + checks + _step_records(times, torch_reason)
    flops = step_flops(net, params, x)
    if flops:  # 0 for a model that is not a serial of dense and conv layers (the sequence models)
        records += _flops_records(times, flops, settings)
    return [{**rec, "model": name} for rec in records]


# --------------------------------------------------------------------------- memory (Remark 8)


def compiled_bytes(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()) -> int:
    """The compiled footprint of ``jax.jit(fn)(*args)``: temporaries + arguments + outputs − aliased bytes."""
    return footprint(jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile())


def residual_bytes(loss: Callable[..., Any], params: Any, *args: Any) -> int:
    """Bytes that reverse mode keeps between forward and backward for ``loss(params, *args)``.

    The residuals are the leaves of the function ``jax.vjp`` returns; leaves that are the
    arguments themselves cost nothing new and are not counted.
    """
    given = {id(leaf) for leaf in jax.tree_util.tree_leaves((params, args))}
    _, pullback = jax.vjp(lambda p: loss(p, *args), params)
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(pullback) if id(leaf) not in given)


def norm_residual_bytes(net: layers.Layer, params: Any, x: jax.Array) -> dict[str, int] | None:
    """The residual bytes (:func:`residual_bytes`) of the normalisation layers of a :func:`~manualgrad.nn.layers.serial`
    ``net``, hand rules and ``jax.grad``: each layer's VJP in its input and params, taken alone at
    the activation it sees in training mode, summed; ``None`` for a model without such layers."""
    seen = []  # (layer, params, input) of each normalisation layer
    for layer, p in zip(net.layers, params):
        if layer.map in NORMS:
            seen.append((layer, p, x))
        x = layer.apply(p, x, train=True, key=KEY)
    if not seen:
        return None

    def alone(layer: layers.Layer, reference: bool) -> Callable[[Any], jax.Array]:
        return lambda args: layer.apply(args[1], args[0], train=True, reference=reference)

    return {
        side: sum(residual_bytes(alone(layer, side == "jax_grad"), (h, p)) for layer, p, h in seen)
        for side in ("manual", "jax_grad")
    }


def attention_residual_bytes(model: Model) -> dict[str, int] | None:
    """The residual bytes (:func:`residual_bytes`) of one causal ``attention`` of a sequence ``model`` alone, in
    ``q, k, v`` of its shape ``(batch, T, heads, width/heads)``, hand rule and ``jax.grad`` of the reference;
    ``None`` for a model without attention (``heads`` 0)."""
    if not model.heads:
        return None
    params = jax.eval_shape(lambda: model.build().init(KEY, (model.batch, *model.input_shape))[1])
    width = params["blocks"][0]["q"]["w"].shape[0]
    q, k, v = jax.random.normal(
        KEY, (3, model.batch, *model.input_shape, model.heads, width // model.heads), jnp.float32
    )
    rules = {"manual": attention, "jax_grad": attention_reference}
    return {side: residual_bytes(lambda qkv, f=f: f(*qkv, True), (q, k, v)) for side, f in rules.items()}


def backprop_memory(widths: tuple[int, ...] = (784, 1024, 1024, 10), batch: int = 256, seed: int = 0) -> dict[str, Any]:
    """Remark 8's storage choices for Algorithm 1 on a ReLU MLP, against ``jax.grad`` (float32).

    For each ``store`` of :func:`manualgrad.nn.backprop.gradients`: the bytes its tape keeps
    and the compiled footprint of the jitted algorithm; for ``jax.grad`` of the custom_vjp
    composition and of the references: the residual bytes and the compiled footprint.
    """
    network = [layers.Dense(w, "relu") for w in widths[1:-1]] + [layers.Dense(widths[-1])]
    kp, kx, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = backprop.init(kp, network, widths[:1], jnp.float32)
    x = jax.random.normal(kx, (batch, widths[0]), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, widths[-1])
    loss = "softmax_cross_entropy"
    result: dict[str, Any] = {"network": f"MLP {'-'.join(map(str, widths))} ReLU, batch {batch}, float32"}
    for store in backprop.STORES:
        result[f"algorithm_{store}_tape_bytes"] = backprop.stored_bytes(network, params, x, store)
        result[f"algorithm_{store}_compiled_bytes"] = compiled_bytes(
            lambda p, x, y, store=store: backprop.gradients(network, p, x, y, loss, store), params, x, labels
        )
    for name, reference in (("custom_vjp", False), ("jax_grad", True)):
        fn = lambda p, x, y, reference=reference: backprop.loss(network, p, x, y, loss, reference=reference)  # noqa: E731
        result[f"{name}_residual_bytes"] = residual_bytes(fn, params, x, labels)
        result[f"{name}_compiled_bytes"] = compiled_bytes(jax.value_and_grad(fn), params, x, labels)
    return result


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
        "torch": _torch_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host_memory": runtime.host_memory(),
        "compiler_options": loop.compiler_options(jax.default_backend()),
    }


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def run(settings: Settings = Settings(), progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure of ``manualgrad bench``: ``{"machine", "settings", "records"}``."""
    unknown = [m for m in settings.models if m not in MODELS]
    if unknown:
        raise ValueError(f"bench: unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
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


def _value(rec: Record) -> str:
    v = rec["value"]
    if v is None:
        return "skipped"
    unit = rec["unit"]
    if unit == "bytes":
        return f"{v / 2**20:.2f} MiB"
    if unit in ("FLOP/s", "FLOP"):
        return f"{v / 1e9:.4g} G{unit}"
    if unit in ("ratio", "fraction"):
        return f"{v:.3f}"
    if unit in ("count", "threads"):
        return f"{v:d}"
    if unit == "relative L2":
        return f"{v:.1e}"
    return f"{v:.2f} {unit}"


def table(result: dict[str, Any]) -> str:
    """The records as a text table — one row per figure, one column per model — under the machine and settings.

    A value that misses its goal is marked ``✗``, one that meets it ``✓``; reasons for skipped
    figures follow the table.
    """
    m, s = result["machine"], result["settings"]
    lines = [
        f"manualgrad bench on {m['cpu']} ({m['cores']} cores), backend {m['backend']} ({m['device']}), "
        f"jax {m['jax']}, numpy {m['numpy']}, torch {m['torch'] or 'not installed'}",
        f"{s['dtype']}, {s['optimizer']}, median of {s['repeats']} interleaved repetitions "
        f"(compile: {s['compile_repeats']}); matmul peak from {s['matmul_size']}x{s['matmul_size']}; "
        f"{s['seconds']:.0f} s in all; malloc: {m['host_memory']}; the step's XLA options: "
        f"{' '.join(f'{k}={v}' for k, v in m['compiler_options'].items()) or 'none'}",
        "",
    ]
    lines += [f"{name:11} {text}" for name, text in result["models"].items()] + [""]
    models = [name for name in result["models"]]
    cells: dict[str, dict[str | None, str]] = {}
    goals: dict[str, str] = {}
    notes = []
    for rec in result["records"]:
        mark = "" if "meets_goal" not in rec else (" ✓" if rec["meets_goal"] else " ✗")
        cells.setdefault(rec["figure"], {})[rec["model"]] = _value(rec) + mark
        goals.setdefault(rec["figure"], rec.get("goal", ""))
        if "skipped" in rec:
            notes.append(f"{rec['model'] or '-'} {rec['figure']} skipped: {rec['skipped']}")
    per_model = [f for f in cells if None not in cells[f]]
    rows = [("figure", *models, "goal")]
    rows += [(f, *(cells[f].get(name, "") for name in models), goals[f]) for f in per_model]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for f in cells:
        if None in cells[f]:
            rec = next(r for r in result["records"] if r["figure"] == f)
            extra = ", ".join(
                f"{k} {v}"
                for k, v in rec.items()
                if k not in ("figure", "model", "value", "unit", "goal", "meets_goal")
            )
            lines.append(
                f"{f}: {cells[f][None]}" + (f" (goal {goals[f]})" if goals[f] else "") + (f"; {extra}" if extra else "")
            )
    return "\n".join(lines + notes)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1)
