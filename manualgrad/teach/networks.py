"""Whole-network exercises ("backprop ninja"): the gradient of every intermediate, by hand.

A :class:`Network` is a forward written intermediate by intermediate, as named :class:`Step`\\ s
(each a ``jax.numpy`` expression of the inputs and earlier steps, the last the scalar loss), its
fixed inputs (data, constants, parameters) and the parameters whose gradients are graded.
:func:`exercise_text` writes a file whose ``backward(values)`` the student fills in: one line per
gradient, named ``d`` + the forward's name, in backward order (:func:`order`).
:func:`manualgrad.teach.network_grading.grade` runs it on the network's values and compares each
gradient with the reference, ``jax.vjp`` of the forward itself (:func:`gradients`; never
manualgrad's own backward): one row per gradient, with *exact* (bit-equal), *close* (every entry
within the checker's ``vjp`` tolerance, :mod:`manualgrad.check.tolerances`), the max abs
difference and the diagnosis of a wrong one (:func:`manualgrad.check.diagnose.diagnose_array`,
and the network's own :class:`NetworkMistake`\\ s).

Backward order is the order in which a backward pass completes the gradients: a value's is
complete once every step that uses it has been differentiated, that is after the first of those
steps (in forward order); ties in the order that step names them. So the first wrong row is
where the student's backward first goes wrong.

The forward and the student's backward run with NumPy's broadcasting allowed
(``jax_numpy_rank_promotion="allow"``): ``h @ W2 + b2`` is how the classic exercise writes a
bias; a gradient of the wrong shape is still caught, row by row.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from manualgrad import registry, text
from manualgrad.check.tolerances import fast_compile_options
from manualgrad.teach import exercise

WRAP = 96  # the docstring's paragraphs, refilled after their numbers are put in


@dataclasses.dataclass(frozen=True)
class Step:
    """One intermediate: ``name = code``, a ``jax.numpy`` expression (``jnp``, ``jax``) of earlier names."""

    name: str
    code: str

    @functools.cached_property
    def operands(self) -> tuple[str, ...]:
        """The names ``code`` reads, in the order it first names them."""
        names = sorted(
            (n for n in ast.walk(ast.parse(self.code, mode="eval")) if isinstance(n, ast.Name)),
            key=lambda n: n.col_offset,
        )
        return tuple(dict.fromkeys(n.id for n in names if n.id not in ("jnp", "jax")))

    @functools.cached_property
    def compiled(self) -> types.CodeType:
        return compile(self.code, f"<step {self.name}>", "eval")


@dataclasses.dataclass(frozen=True)
class NetworkMistake:
    """A usual mistake in the gradient of ``name``: ``wrong(values, right gradients)`` is what it gives."""

    name: str
    text: str
    wrong: Callable[[dict[str, Any], dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Network:
    """A small network, its forward step by step: ``inputs()`` gives its data, constants and
    parameters (NumPy, float64 or integer; Python numbers for constants), ``params`` names the
    inputs whose gradients are graded, ``steps`` the intermediates (the last is the loss)."""

    name: str
    title: str
    about: str  # the derivation's setting, in the docstrings' notation
    seeds: tuple[tuple[str, str], ...]
    inputs: Callable[[], dict[str, Any]]
    params: tuple[str, ...]
    steps: tuple[Step, ...]
    mistakes: tuple[NetworkMistake, ...] = ()

    @property
    def loss(self) -> str:
        return self.steps[-1].name

    @property
    def seed_text(self) -> str:
        return "; ".join(registry.cite(s, section) for s, section in self.seeds)


# seed001: the 2-2-1 sigmoid network of seed 001, every weight and bias a scalar.
def _seed001_inputs() -> dict[str, Any]:
    r = np.random.default_rng(1)
    names = ["x0", "x1", "y", *(f"w{i}" for i in range(6)), *(f"b{i}" for i in range(3))]
    out = {n: np.asarray(v) for n, v in zip(names, r.normal(size=len(names)))}  # arrays of shape (), not constants
    out["y"] = np.asarray(0.8)
    return out


SEED001 = Network(
    "seed001",
    "the 2-2-1 sigmoid network of seed 001, every ∂L/∂wᵢ and ∂L/∂bᵢ a scalar",
    """Inputs ``x₀, x₁``, target ``y``; two sigmoid units ``a₀ = σ(z₀)``, ``a₁ = σ(z₁)`` with
``z₀ = w₀x₀ + w₁x₁ + b₀`` and ``z₁ = w₂x₀ + w₃x₁ + b₁``; the output ``a₂ = σ(z₂)`` with
``z₂ = w₄a₀ + w₅a₁ + b₂``; the loss ``L = ½(a₂ − y)²``, as the seed's equations (3)–(8) and its
part ③ write them. ``σ'(z) = σ(z)(1 − σ(z))`` (the seed's part ①). Every value is a scalar.
Beware: the seed's scalar answers have index typos (it writes ``∂L/∂z₁`` with ``w₄``, and
``∂L/∂w₀ = ∂L/∂z₀ · a₀``); derive each gradient from the equations, not from its answers.""",
    (("001", "③ the partial derivatives ∂L/∂bᵢ, ∂L/∂wⱼ"), ("001", "① σ'(x) = σ(x)(1 − σ(x))")),
    _seed001_inputs,
    tuple(f"w{i}" for i in range(6)) + tuple(f"b{i}" for i in range(3)),
    (
        Step("z0", "w0 * x0 + w1 * x1 + b0"),
        Step("a0", "jax.nn.sigmoid(z0)"),
        Step("z1", "w2 * x0 + w3 * x1 + b1"),
        Step("a1", "jax.nn.sigmoid(z1)"),
        Step("z2", "w4 * a0 + w5 * a1 + b2"),
        Step("a2", "jax.nn.sigmoid(z2)"),
        Step("L", "0.5 * (a2 - y) ** 2"),
    ),
    (
        NetworkMistake(
            "z1",
            "∂L/∂z₂ · w₄ · σ'(z₁): the seed's typo, z₁ reaches z₂ through w₅",
            lambda v, d: d["z2"] * v["w4"] * v["a1"] * (1 - v["a1"]),
        ),
        NetworkMistake(
            "w0", "∂L/∂z₀ · a₀: the seed's typo, z₀ = w₀x₀ + w₁x₁ + b₀ takes x₀", lambda v, d: d["z0"] * v["a0"]
        ),
    ),
)


# seed003: W used twice, y = cᵀ Ψ((W + V) Φ(Wx + b)), with Φ = tanh and Ψ = sigmoid.
def _seed003_inputs() -> dict[str, Any]:
    r = np.random.default_rng(3)
    n = 4
    return {
        "x": r.normal(size=n),
        "b": 0.1 * r.normal(size=n),
        "c": r.normal(size=n),
        "W": r.normal(size=(n, n)) / np.sqrt(n),
        "V": r.normal(size=(n, n)) / np.sqrt(n),
    }


SEED003 = Network(
    "seed003",
    "the shared weight of seed 003: y = cᵀ Ψ((W + V) Φ(Wx + b))",
    """``y = cᵀ Ψ((W + V) Φ(Wx + b))`` with ``x, b, c ∈ Rⁿ``, ``W, V ∈ Rⁿˣⁿ`` (n = 4, column
vectors as 1-D arrays), ``Φ = tanh`` and ``Ψ = σ`` (the seed leaves them any element-wise
functions, whose Jacobian is ``diag(φ'(x))``), and the auxiliary variables ``z₀ … z₅, Z₃`` the
seed defines. ``W`` appears twice, in ``z₀ = Wx`` and in ``Z₃ = W + V``: its gradient is the sum
of both paths, ``g = Ψ'(z₄) c z₂ᵀ + Φ'(z₁) Z₃ᵀ Ψ'(z₄) c xᵀ`` in the seed's words.""",
    (("003", "Question 1: y = cᵀΨ((W + V)Φ(Wx + b))"), ("003", "Element-wise Function: J = diag(φ'(x))")),
    _seed003_inputs,
    ("W", "V", "b", "c"),
    (
        Step("z0", "W @ x"),
        Step("z1", "z0 + b"),
        Step("z2", "jnp.tanh(z1)"),
        Step("Z3", "W + V"),
        Step("z4", "Z3 @ z2"),
        Step("z5", "jax.nn.sigmoid(z4)"),
        Step("y", "c @ z5"),
    ),
    (
        NetworkMistake(
            "W",
            "the path through Z₃ = W + V alone: W is used twice, add the path through z₀ = Wx",
            lambda v, d: d["Z3"],
        ),
        NetworkMistake(
            "W",
            "the path through z₀ = Wx alone: W is used twice, add the path through Z₃ = W + V",
            lambda v, d: jnp.outer(d["z0"], v["x"]),
        ),
    ),
)


# mlp_bn: the classic exercise on a batch of character contexts from the words dataset.
BLOCK, EMBED, HIDDEN, BATCH = 3, 4, 16, 16
VOCAB = ".abcdefghijklmnopqrstuvwxyz"  # "." starts and ends a word, as in manualgrad.train.data.words
BATCH_SEED = 4
# (context, next character, the word it is from): what draw_batch(load_sequences("words")) gives on
# Debian's wamerican (tests/teach/test_networks.py draws it again), written out so that grading
# needs no word list and gives every student the same numbers.
CONTEXTS = (
    (".be", "s", "bestial"),
    ("let", "e", "completer"),
    ("ded", ".", "elided"),
    ("mor", "r", "gomorrah"),
    ("ons", ".", "insinuations"),
    ("ist", "e", "listens"),
    ("..n", "a", "nailed"),
    (".om", "a", "oman"),
    ("alm", "i", "palming"),
    ("reg", "u", "regulated"),
    ("sho", "w", "sideshows"),
    ("tar", "r", "tarries"),
    ("pin", ".", "unpin"),
    (".un", "s", "unsightly"),
    ("ast", "e", "wasted"),
    ("...", "w", "wetwares"),
)


def draw_batch(sequences: Any, batch: int = BATCH, block: int = BLOCK, seed: int = BATCH_SEED) -> tuple:
    """``batch`` training words of ``sequences`` (a :class:`manualgrad.train.data.Sequences` with a
    boundary token) drawn without replacement by a generator seeded with ``seed``, in their order,
    and one position of each drawn by the same generator: ``(block characters before it, the
    character there, the word)``, the context padded with the boundary before the word's start."""
    r = np.random.default_rng(seed)
    drawn = []
    for row in np.sort(r.choice(len(sequences.tokens_train), batch, replace=False)):
        word = sequences.decode(sequences.tokens_train[row, 1 : int(sequences.mask_train[row].sum())])
        at = int(r.integers(len(word) + 1))
        padded = sequences.boundary * block + word + sequences.boundary
        drawn.append((padded[at : at + block], padded[at + block], word))
    return tuple(drawn)


def _mlp_bn_inputs() -> dict[str, Any]:
    r = np.random.default_rng(4)
    fan_in = EMBED * BLOCK
    return {
        "Xb": np.array([[VOCAB.index(c) for c in context] for context, _, _ in CONTEXTS], np.int32),
        "Yb": np.array([VOCAB.index(following) for _, following, _ in CONTEXTS], np.int32),
        "n": BATCH,
        "C": r.normal(size=(len(VOCAB), EMBED)),
        "W1": r.normal(size=(fan_in, HIDDEN)) * (5 / 3) / fan_in**0.5,
        "b1": 0.1 * r.normal(size=HIDDEN),
        "bngain": 1 + 0.1 * r.normal(size=(1, HIDDEN)),
        "bnbias": 0.1 * r.normal(size=(1, HIDDEN)),
        "W2": 0.1 * r.normal(size=(HIDDEN, len(VOCAB))),
        "b2": 0.1 * r.normal(size=len(VOCAB)),
    }


MLP_BN = Network(
    "mlp_bn",
    "embedding → dense → batch_norm → tanh → dense → softmax cross-entropy",
    f"""The classic whole-network exercise (A. Karpathy, "Building makemore Part 4: Becoming a
Backprop Ninja", 2022): a character-level MLP predicting the next character of a name from the
{BLOCK} before it, on a fixed batch of {BATCH} contexts drawn from the training words of
``--dataset words`` (Debian's wamerican: {", ".join(w for _, _, w in CONTEXTS)}; vocabulary ``.``
and ``a``–``z``, ``.`` before a word's start and at its end). Embedding ``C`` ({len(VOCAB)} × {EMBED}),
a dense layer ``W1, b1`` to {HIDDEN} units, batch normalisation over the batch with Bessel's
correction (``bnvar`` divides by ``n − 1``) and ``ε = 1e−5``, ``tanh``, a dense layer ``W2, b2``
to the {len(VOCAB)} logits, and the softmax cross-entropy written out step by step. Batched
rows as in seed 004: ``Z = O W + 1 b`` gives ``∇_W = Oᵀ G``, ``∇_b = 1ᵀ G``, ``∇_O = G Wᵀ``. A
value used twice (``logits``, ``counts``, ``bndiff``, ``hprebn``) sums the gradients of its uses;
a broadcast one (``bnmeani``, ``counts_sum_inv``, ``bngain``) sums over the axis it was broadcast
along.""",
    (
        ("004", "batched backprop: ∇_W = Oᵀ G, ∇_b = 1ᵀ G, ∇_O = G Wᵀ"),
        ("003", "Element-wise Function: J = diag(φ'(x))"),
    ),
    _mlp_bn_inputs,
    ("C", "W1", "b1", "bngain", "bnbias", "W2", "b2"),
    (
        Step("emb", "C[Xb]"),
        Step("embcat", "emb.reshape(emb.shape[0], -1)"),
        Step("hprebn", "embcat @ W1 + b1"),
        Step("bnmeani", "1 / n * hprebn.sum(0, keepdims=True)"),
        Step("bndiff", "hprebn - bnmeani"),
        Step("bndiff2", "bndiff**2"),
        Step("bnvar", "1 / (n - 1) * bndiff2.sum(0, keepdims=True)"),
        Step("bnvar_inv", "(bnvar + 1e-5) ** -0.5"),
        Step("bnraw", "bndiff * bnvar_inv"),
        Step("hpreact", "bngain * bnraw + bnbias"),
        Step("h", "jnp.tanh(hpreact)"),
        Step("logits", "h @ W2 + b2"),
        Step("logit_maxes", "logits.max(1, keepdims=True)"),
        Step("norm_logits", "logits - logit_maxes"),
        Step("counts", "jnp.exp(norm_logits)"),
        Step("counts_sum", "counts.sum(1, keepdims=True)"),
        Step("counts_sum_inv", "counts_sum**-1"),
        Step("probs", "counts * counts_sum_inv"),
        Step("logprobs", "jnp.log(probs)"),
        Step("loss", "-logprobs[jnp.arange(n), Yb].mean()"),
    ),
    (
        NetworkMistake(
            "bndiff2",
            "the right one with Bessel's correction dropped: 1/n where bnvar divides by n − 1",
            lambda v, d: d["bndiff2"] * (v["n"] - 1) / v["n"],
        ),
    ),
)


# gpt_block: one pre-LN transformer block, single-head causal attention, on one sequence.
SEQ, WIDTH, MLP = 4, 8, 16


def _gpt_block_inputs() -> dict[str, Any]:
    r = np.random.default_rng(5)

    def dense(fan_in, fan_out):
        return r.normal(size=(fan_in, fan_out)) / fan_in**0.5

    return {
        "x": r.normal(size=(SEQ, WIDTH)),
        "target": r.normal(size=(SEQ, WIDTH)),
        "mask": np.tril(np.ones((SEQ, SEQ), bool)),
        "scale": WIDTH**-0.5,
        "g1": 1 + 0.1 * r.normal(size=WIDTH),
        "be1": 0.1 * r.normal(size=WIDTH),
        "Wq": dense(WIDTH, WIDTH),
        "Wk": dense(WIDTH, WIDTH),
        "Wv": dense(WIDTH, WIDTH),
        "Wo": dense(WIDTH, WIDTH),
        "g2": 1 + 0.1 * r.normal(size=WIDTH),
        "be2": 0.1 * r.normal(size=WIDTH),
        "W1": dense(WIDTH, MLP),
        "c1": 0.1 * r.normal(size=MLP),
        "W2": dense(MLP, WIDTH),
        "c2": 0.1 * r.normal(size=WIDTH),
    }


def _layer_norm(i: int, x: str) -> tuple[Step, ...]:
    """Layer norm ``i`` of ``x`` over its last axis, step by step (``ε = 1e−5``, no Bessel correction)."""
    return (
        Step(f"mu{i}", f"{x}.mean(-1, keepdims=True)"),
        Step(f"xc{i}", f"{x} - mu{i}"),
        Step(f"var{i}", f"(xc{i} ** 2).mean(-1, keepdims=True)"),
        Step(f"rstd{i}", f"(var{i} + 1e-5) ** -0.5"),
        Step(f"xhat{i}", f"xc{i} * rstd{i}"),
        Step(f"ln{i}", f"xhat{i} * g{i} + be{i}"),
    )


GPT_BLOCK = Network(
    "gpt_block",
    "one pre-LN transformer block: layer_norm → causal attention → add, layer_norm → dense → gelu → dense → add",
    f"""One pre-LN transformer block on a sequence ``x`` of {SEQ} tokens of width {WIDTH}:
``x₁ = x + attention(LN₁(x))`` with one causal head (``q, k, v = ln₁ Wq, ln₁ Wk, ln₁ Wv``,
scores ``q kᵀ / √{WIDTH}``, the future masked to ``−∞``, a row-wise softmax, ``att v``, then
``Wo``), and ``out = x₁ + W₂ gelu(LN₂(x₁) W₁ + c₁) + c₂`` with {MLP} hidden units and the exact
``gelu(u) = u Φ(u)`` (``Φ`` the standard normal CDF, ``Φ'(u) = exp(−u²/2)/√(2π)``;
``jax.scipy.special.erf`` gives ``Φ(u) = ½(1 + erf(u/√2))``). Each layer norm is written out:
mean, centred, variance (divided by the width, no Bessel correction), ``1/√(var + ε)`` with
``ε = 1e−5``, normalised, scaled and shifted. The loss is the mean squared error against a fixed
``target``. A residual ``a + b`` passes its gradient to both terms; ``x`` and ``x₁`` are each
used by their layer norm and by their residual. Softmax: ``ds = a ⊙ (da − Σⱼ da ⊙ a)`` row by row;
a masked entry gets no gradient.""",
    (
        ("004", "batched backprop: ∇_W = Oᵀ G, ∇_b = 1ᵀ G, ∇_O = G Wᵀ"),
        ("000", "§5 Add: dx = dy, dw = dy"),
        ("003", "Element-wise Function: J = diag(φ'(x))"),
    ),
    _gpt_block_inputs,
    ("x", "g1", "be1", "Wq", "Wk", "Wv", "Wo", "g2", "be2", "W1", "c1", "W2", "c2"),
    (
        *_layer_norm(1, "x"),
        Step("q", "ln1 @ Wq"),
        Step("k", "ln1 @ Wk"),
        Step("v", "ln1 @ Wv"),
        Step("scores", "q @ k.T * scale"),
        Step("masked", "jnp.where(mask, scores, -jnp.inf)"),
        Step("att", "jax.nn.softmax(masked, axis=-1)"),
        Step("y", "att @ v"),
        Step("attn", "y @ Wo"),
        Step("x1", "x + attn"),
        *_layer_norm(2, "x1"),
        Step("hid", "ln2 @ W1 + c1"),
        Step("act", "jax.nn.gelu(hid, approximate=False)"),
        Step("mlp", "act @ W2 + c2"),
        Step("out", "x1 + mlp"),
        Step("loss", "jnp.mean((out - target) ** 2)"),
    ),
)

NETWORKS = {net.name: net for net in (SEED001, SEED003, MLP_BN, GPT_BLOCK)}


def network(name: str) -> Network:
    """The network called ``name``; ``KeyError`` with the names known."""
    if name not in NETWORKS:
        raise KeyError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")
    return NETWORKS[name]


@contextlib.contextmanager
def numerics() -> Iterator[None]:
    """float64 available, NumPy's broadcasting allowed: how the forward and the student's backward run."""
    with jax.enable_x64(True), jax.numpy_rank_promotion("allow"):
        yield


def inputs(net: Network, dtype: str = "float64") -> dict[str, Any]:
    """The network's inputs as device arrays, floating ones in ``dtype`` (constants stay Python numbers)."""
    with numerics():
        return {
            k: v
            if isinstance(v, (int, float))
            else jnp.asarray(v, dtype if np.issubdtype(v.dtype, np.floating) else None)
            for k, v in net.inputs().items()
        }


def run(net: Network, given: dict[str, Any], shifts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every value of the forward by name: ``given`` (the inputs) and each step, each step's value
    plus ``shifts[step]`` where given (zeros, whose cotangents are the steps' gradients)."""
    out = dict(given)
    for step in net.steps:
        out[step.name] = eval(step.compiled, {"jnp": jnp, "jax": jax}, out)
        if shifts is not None and step.name in shifts:
            out[step.name] = out[step.name] + shifts[step.name]
    return out


def values(name: str, dtype: str = "float64") -> dict[str, Any]:
    """Every input and intermediate of network ``name``'s forward by name, to look at and to call your backward on."""
    return dict(reference(name, dtype)[0])


@functools.cache
def reference(name: str, dtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(values, gradients)`` of network ``name`` in ``dtype``: the forward's every value
    (:func:`run`) and the reference gradients (:func:`gradients`), in one compiled program."""
    net = network(name)
    given = inputs(net, dtype)
    constants = {k: v for k, v in given.items() if isinstance(v, (int, float))}

    def both(arrays):
        forward = run(net, {**constants, **arrays})
        return forward, gradients(net, forward)

    with numerics():
        arrays = {k: v for k, v in given.items() if k not in constants}
        forward, grads = jax.jit(both, compiler_options=fast_compile_options())(arrays)
    return {**forward, **constants}, grads


def gradients(net: Network, given: dict[str, Any]) -> dict[str, Any]:
    """The reference for the forward's values ``given``: ``∂loss/∂name`` for every graded name
    (:func:`order`), by ``jax.vjp`` of the forward in the parameters and in a zero shift of each
    step's value (whose cotangent is that step's gradient)."""
    steps = {s.name for s in net.steps}
    with numerics():
        fixed = {k: v for k, v in given.items() if k not in steps and k not in net.params}
        params = {p: given[p] for p in net.params}
        shifts = {s.name: jnp.zeros_like(given[s.name]) for s in net.steps[:-1]}

        def loss(params, shifts):
            return run(net, {**fixed, **params}, shifts)[net.loss]

        out, pullback = jax.vjp(loss, params, shifts)
        dparams, dshifts = pullback(jnp.ones_like(out))
        return {**dparams, **dshifts}


def order(net: Network) -> list[str]:
    """The graded names (every step but the loss, and the parameters) in backward order: by the
    first step that uses each, latest first; ties in the order that step names them."""
    first: dict[str, tuple[int, int]] = {}
    for i, step in enumerate(net.steps):
        for j, name in enumerate(step.operands):
            first.setdefault(name, (-i, j))
    graded = [s.name for s in net.steps[:-1]] + list(net.params)
    return sorted(graded, key=first.__getitem__)


def users(net: Network, name: str) -> list[Step]:
    """The steps that use ``name``."""
    return [s for s in net.steps if name in s.operands]


def _shape(value: Any) -> str:
    shape = tuple(np.shape(value))
    return "scalar" if not shape else f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"


@dataclasses.dataclass(frozen=True)
class Parts:
    """A network exercise's pieces, which the file (:func:`exercise`) and the notebook put together."""

    net: Network
    forward: str  # the steps as code, each with its value's shape
    task: str
    seeds: list[str]
    imports: str
    backward: str  # the backward to fill in


def parts(name: str, grading: tuple[str, str] = exercise.FILE_GRADING) -> Parts:
    """The pieces of network ``name``'s exercise; ``grading`` says how to get graded, in the task
    and in the backward's docstring."""
    net = network(name)
    vals = values(name)
    width = max(len(f"{s.name} = {s.code}") for s in net.steps)
    forward = "\n".join(f"{f'{s.name} = {s.code}':<{width}}  # {_shape(vals[s.name])}" for s in net.steps)
    graded = order(net)
    task = _fill(
        f"""Your task: write ``backward(values)``. ``values`` maps every name of the forward (its
inputs, parameters and intermediates) to its value on the fixed inputs; ``backward`` returns the
gradient of ``{net.loss}`` with respect to each of the {len(graded)} names in its return
statement, each shaped like that value. Fill them in in the order given, backward order: each
needs only those above it; one left as None fails alone. Use jax.numpy or NumPy, not autodiff.
To try it: ``import manualgrad as mg`` and ``backward(mg.network_values("{name}"))``.
Then {grading[0]}: one row per gradient, in backward order, says exact (bit-equal), close (within
float round-off), the max abs difference and the diagnosis, so that the first wrong one shows
where your backward first goes wrong."""
    )
    imports = "from __future__ import annotations\n\nimport jax\nimport jax.numpy as jnp\nimport numpy as np\n"
    return Parts(
        net, forward, task, [registry.cite(s, sec) for s, sec in net.seeds], imports, _template(net, vals, grading)
    )


def _fill(text: str) -> str:
    """``text`` refilled to :data:`WRAP` columns, never breaking a ````span````."""
    kept = re.sub(r"``.+?``", lambda m: m[0].replace(" ", "\0"), " ".join(text.split()), flags=re.S)
    return textwrap.fill(kept, WRAP, break_on_hyphens=False).replace("\0", " ")


def _template(net: Network, vals: dict[str, Any], grading: tuple[str, str]) -> str:
    """``def backward(values)``: the values unpacked by name (inputs, then steps), one ``dNAME =
    None`` per graded name in backward order, and the dict it returns."""
    known = [*net.inputs(), *(s.name for s in net.steps[:-1])]
    unpack = "\n".join(f'    {k} = values["{k}"]' for k in known)
    blanks = "\n".join(
        f"    d{n} = None  # {_shape(vals[n])}, used by {', '.join(s.name for s in users(net, n))}" for n in order(net)
    )
    returned = "\n".join(f'        "{n}": d{n},' for n in order(net))
    return f'''def backward(values):
    """∂{net.loss}/∂(every intermediate and parameter) of {net.name}, by hand: fill in each d... below,
    {grading[1]}."""
{unpack}
    d{net.loss} = 1.0  # where the backward pass starts
{blanks}
    return {{
{returned}
    }}
'''


def exercise_text(name: str) -> str:
    """The exercise file for network ``name``."""
    p = parts(name)

    def indented(block: str, by: str = "    ") -> str:
        return "\n".join((by + line).rstrip() for line in text.plain(block).splitlines())

    seeds = "\n".join(f"    {s}" for s in p.seeds)
    return f'''{header(name)}
"""Exercise: backpropagate {name} by hand, every intermediate: {p.net.title}.

{indented(_fill(p.net.about))}

    The forward, on fixed inputs (the grader computes it, and passes every value to backward):

{indented(p.forward, "        ")}

{indented(p.task)}

    Reread:
{seeds}
"""

{p.imports}

{p.backward}'''


def header(name: str) -> str:
    """The first two lines of network ``name``'s exercise file (:func:`manualgrad.teach.exercise.header`)."""
    return exercise.header(f"{exercise.NETWORK}{name}")
