"""The forward an exercise file shows, readable on its own and importing only public names.

A rule whose forward uses only public modules (``jax.numpy``, ``lax``, :mod:`manualgrad.validation`,
the standard library) is shown as it is written, less its calls of the library's private argument
checks (``_validate...``). A rule whose forward computes with the library's own helpers is shown
as its ``NAME_forward`` below instead: the same computation, the same output and
the same residuals, in plain ``jax.numpy`` and ``lax`` (``tests/teach/test_exercise_files.py`` holds
each to its rule on every sample) — attention's for whole rows, as its rule computes a row that fits
one tile: bit for bit there, to round-off where the rule tiles the row. These leave out the argument
checks the rule makes.
:func:`source` gives a rule's forward as an exercise file's code, with the helpers below it calls
and the imports it needs.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from manualgrad.errors import ManualgradError
from manualgrad.registry import Rule

# The modules of manualgrad an exercise file may import; every other one may move in a new version.
PUBLIC = ("manualgrad", "manualgrad.validation")
# Imported by every exercise file, whether its forward names them or not.
GIVEN = ("import jax", "import jax.numpy as jnp", "import numpy as np")


class ForwardSourceError(ManualgradError, ValueError):
    """A rule's forward that an exercise file cannot show: it needs a name no public module gives."""


# Convolution and pooling: strides, dilation and zero padding of the spatial axes.
def spatial(value: Any, n: int) -> tuple[int, ...]:
    """An int as ``n`` equal ints, a sequence of ``n`` ints as a tuple."""
    return (value,) * n if isinstance(value, int) else tuple(value)


def zero_padding(padding: Any, size: tuple[int, ...], window: tuple[int, ...], strides, dilation) -> tuple:
    """The ``(lo, hi)`` zeros around each spatial axis of the input: ``"VALID"`` (none), ``"SAME"``
    (XLA's rule: ``ceil(size / stride)`` outputs, an odd extra row at the end), an int for every side,
    or the pairs themselves."""
    if isinstance(padding, str):
        dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
        return tuple(tuple(p) for p in lax.padtype_to_pads(tuple(size), dilated, strides, padding.upper()))
    if isinstance(padding, int):
        return ((padding, padding),) * len(size)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv2d_forward(x, w, stride=1, padding="VALID", dilation=1):
    """``y[b, o, co] = Σ_{k, ci} x[b, o·s + k·d − lo, ci] · w[k, ci, co]``, channels last (NHWC, HWIO)."""
    strides, dilation = spatial(stride, 2), spatial(dilation, 2)
    pads = zero_padding(padding, x.shape[1:3], w.shape[:2], strides, dilation)
    y = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y, (x, w)


def conv1d_forward(x, w, stride=1, padding="VALID", dilation=1):
    """``y[b, o, co] = Σ_{k, ci} x[b, o·s + k·d − lo, ci] · w[k, ci, co]``, channels last (NWC, WIO)."""
    strides, dilation = spatial(stride, 1), spatial(dilation, 1)
    pads = zero_padding(padding, x.shape[1:2], w.shape[:1], strides, dilation)
    y = lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation, dimension_numbers=("NWC", "WIO", "NWC"))
    return y, (x, w)


def pooled(x, init, op, window, stride, padding):
    """``op`` over each window of the H and W axes of ``x`` (NHWC), starting from ``init``; the
    stride is the window's where it is ``None``. Also the window, as a tuple."""
    window = spatial(window, 2)
    strides = window if stride is None else spatial(stride, 2)
    pads = zero_padding(padding, x.shape[1:3], window, strides, (1, 1))
    # A NumPy constant as init: a traced one would make a reduction JAX cannot differentiate twice.
    out = lax.reduce_window(x, np.array(init, x.dtype), op, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0)))
    return out, window


def avg_pool2d_forward(x, window, stride=None, padding="VALID"):
    """The mean of each window; the padding counts as zeros."""
    total, window = pooled(x, 0, lax.add, window, stride, padding)
    return total / math.prod(window), x[:0]


def max_pool2d_forward(x, window, stride=None, padding="VALID"):
    """The largest entry of each window; the padding never wins."""
    out, _ = pooled(x, -jnp.inf, lax.max, window, stride, padding)
    return out, (x, out)


# The 1-D signal rules: numpy.correlate and numpy.convolve.
def signal_window(n: int, k: int, mode: str, swapped: bool) -> tuple[int, int]:
    """``(length, offset)`` of numpy's ``mode`` for ``n = len(x)``, ``k = len(w)``: output ``i`` is
    the shift ``i + offset`` of the correlation ``(x ⋆ w)_s = Σ_j x_{s+j} w_j``. ``swapped``:
    numpy.correlate with ``k > n``, which swaps its arguments and reverses the result."""
    length = {"valid": abs(n - k) + 1, "same": max(n, k), "full": n + k - 1}[mode]
    start = {"full": 0, "valid": min(n, k) - 1, "same": (min(n, k) - 1) // 2}[mode]
    if mode == "same" and swapped:
        start = n - 1 - (n - 1) // 2
    return length, start - (k - 1)


def signal(x, w, mode, swapped):
    """``valid(x̃ ⋆ w)`` along the last axis of ``x`` ((N,) or (batch, N)), ``x̃`` the zero-padded
    (or cropped) ``x`` whose valid correlation is numpy's ``mode``."""
    n, k = x.shape[-1], w.shape[0]
    length, offset = signal_window(n, k, mode, swapped)
    config = [(0, 0, 0)] * (x.ndim - 1) + [(-offset, length + offset + k - 1 - n, 0)]
    padded = lax.pad(x, jnp.zeros((), jnp.result_type(x)), config)
    lead = padded.shape[:-1]
    out = lax.conv_general_dilated(
        jnp.reshape(padded, (math.prod(lead), 1, padded.shape[-1])),
        jnp.reshape(w, (1, 1, k)),
        window_strides=(1,),
        padding="VALID",
        dimension_numbers=("NCH", "OIH", "NCH"),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.reshape(out, (*lead, out.shape[-1]))


def correlate1d_forward(x, w, mode="valid"):
    """numpy.correlate(x, w, mode), row by row: ``y_i = Σ_j x_{i+offset+j} w_j``."""
    return signal(x, w, mode, swapped=w.shape[0] > x.shape[-1]), (x, w)


def convolve1d_forward(x, w, mode="valid"):
    """numpy.convolve(x, w, mode), row by row: the correlation with the flipped filter."""
    return signal(x, jnp.flip(w), mode, swapped=False), (x, w)


def gelu_forward(z, approximate=True):
    """``z Φ(z)``, or its tanh form ``z · ½(1 + tanh(u))`` with ``u = √(2/π) (z + 0.044715 z³)``."""
    if approximate:
        u = math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)
        return z * (0.5 * (1 + jnp.tanh(u))), z
    return 0.5 * z * lax.erfc(-z * math.sqrt(0.5)), z


# Normalisation: x̂ = (x − mean) / √(var + ε) over some axes, then a scale and shift per channel.
@functools.partial(jax.jit, static_argnums=(1, 2))
def normalised(x, axes, eps):
    """``x̂`` and ``1/√(var + ε)`` over ``axes`` (kept as axes of size 1), the variance biased."""
    centred = x - jnp.mean(x, axis=axes, keepdims=True)
    inv = lax.rsqrt(jnp.mean(centred * centred, axis=axes, keepdims=True) + eps)
    return centred * inv, inv


def per_channel(v, ndim):
    """A ``(C,)`` vector shaped ``(1, ..., 1, C)``, to scale the last axis of an ``ndim``-axis array."""
    return jnp.reshape(v, (1,) * (ndim - 1) + v.shape)


def batch_norm_forward(x, gamma, beta, eps=1e-5):
    """Each channel normalised over the batch and every other axis, then scaled and shifted."""
    xhat, inv = normalised(x, tuple(range(x.ndim - 1)), eps)
    y = per_channel(gamma, x.ndim) * xhat + per_channel(beta, x.ndim)
    return y, (xhat, inv, gamma)


def layer_norm_forward(x, gamma, beta, eps=1e-5):
    """Each row normalised over its last axis, then scaled and shifted per channel."""
    xhat, inv = normalised(x, (x.ndim - 1,), eps)
    y = per_channel(gamma, x.ndim) * xhat + per_channel(beta, x.ndim)
    return y, (xhat, inv, gamma)


def group_norm_forward(x, gamma, beta, groups, eps=1e-5):
    """The channels of each sample in ``groups`` groups, each normalised over its channels and the
    spatial axes, then scaled and shifted per channel."""
    shape = x.shape
    grouped = jnp.reshape(x, (*shape[:-1], groups, shape[-1] // groups))  # (N, *S, G, C/G)
    xhat, inv = normalised(grouped, (*range(1, len(shape) - 1), len(shape)), eps)
    xhat = jnp.reshape(xhat, shape)
    y = per_channel(gamma, x.ndim) * xhat + per_channel(beta, x.ndim)
    return y, (xhat, inv, gamma)


@functools.partial(jax.jit, static_argnums=1)
def root_mean_square(x, eps):
    """``x̂ = x / r`` and ``1/r``, ``r = √(mean(x²) + ε)`` along the last axis (kept)."""
    inv = lax.rsqrt(jnp.mean(x * x, axis=(x.ndim - 1,), keepdims=True) + eps)
    return x * inv, inv


def rms_norm_forward(x, gamma, eps=1e-6):
    """Each row divided by its root mean square, then scaled per channel."""
    xhat, inv = root_mean_square(x, eps)
    return per_channel(gamma, x.ndim) * xhat, (xhat, inv, gamma)


@functools.partial(jax.jit, static_argnums=2)
def masked(x, key, rate):
    """``M ⊙ x / (1 − rate)``: each entry kept with probability ``1 − rate``, drawn from ``key``
    in float32 whatever ``x``'s dtype, so that one key gives one mask."""
    kept = jax.random.bernoulli(key, np.float32(1 - rate), x.shape)
    return jnp.where(kept, x / (1 - rate), jnp.zeros_like(x))


def dropout_forward(x, key, rate):
    """Inverted dropout; the key is the residual, so that the backward draws the same mask."""
    return masked(x, key, rate), key


# Recurrence: lax.scan runs over the leading axis, so the states are time-major (T, N, ...).
@jax.jit
def rnn_states(x, h0, w_x, w_h, b):
    """``h_t = tanh(x_t w_x + b + h_{t−1} w_h)`` for ``t = 1 … T``, time-major ``(T, N, H)``."""

    def step(h, xw_t):
        h = jnp.tanh(xw_t + h @ w_h)
        return h, h

    return lax.scan(step, h0, jnp.swapaxes(x, 0, 1) @ w_x + b[None, None, :])[1]


def rnn_forward(x, h0, w_x, w_h, b):
    """Every hidden state of an Elman RNN over ``x`` ``(N, T, D)``, as ``(N, T, H)``."""
    hs = rnn_states(x, h0, w_x, w_h, b)
    return jnp.swapaxes(hs, 0, 1), (x, h0, hs, w_x, w_h)


@jax.jit
def lstm_states(x, h0, c0, w_x, w_h, b):
    """``h_1 … h_T``, ``c_1 … c_T`` and every step's gates ``(i, f, g, o)``, time-major."""

    def step(carry, x_t):
        h, c = carry
        zi, zf, zg, zo = jnp.split(x_t @ w_x + h @ w_h + b[None, :], 4, axis=-1)
        i, f, g, o = gates = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), (h, c, gates)

    return lax.scan(step, (h0, c0), jnp.swapaxes(x, 0, 1))[1]


def lstm_forward(x, h0, c0, w_x, w_h, b):
    """Every hidden state of an LSTM over ``x`` ``(N, T, D)``, as ``(N, T, H)``."""
    hs, cs, gates = lstm_states(x, h0, c0, w_x, w_h, b)
    return jnp.swapaxes(hs, 0, 1), (x, h0, c0, hs, cs, gates, w_x, w_h)


def embedding_forward(ids, table):
    """Row ``ids[...]`` of ``table``; NaN for an id outside ``[0, vocab)``."""
    vocab = table.shape[0]
    valid = (ids >= 0) & (ids < vocab)
    return jnp.where(valid[..., None], table[jnp.clip(ids, 0, vocab - 1)], jnp.nan), (ids, table)


def scores(q, k, causal):
    """``S = q kᵀ / √H`` per batch entry and head, ``(B, N, T, S)``; with ``causal`` the keys after
    each query (``s > t``) set to ``−∞``."""
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * float(1 / np.sqrt(q.shape[-1]))  # a Python float keeps float32
    if not causal:
        return s
    visible = jnp.tril(jnp.ones(s.shape[-2:], bool))[None, None]
    return jnp.where(visible, s, -jnp.inf)


def attention_forward(q, k, v, causal=False):
    """``o = softmax(S) v`` row by row (``q, k, v``: ``(B, T, N, H)``). Residuals: the inputs,
    ``o`` and the log-sum-exp ``ℓ`` of each row of scores.

    The rule computes rows longer than its tile in tiles of keys (FlashAttention's online softmax),
    never holding a whole row of scores; shown here for whole rows, the form the backward is
    derived in, which the rule computes where a row fits one tile."""
    s = scores(q, k, causal)
    top = jnp.max(s, axis=-1, keepdims=True)
    lse = (top + jnp.log(jnp.sum(jnp.exp(s - top), axis=-1, keepdims=True)))[..., 0]
    o = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), v)
    return o, (q, k, v, o, lse)


def plain_forward(rule: Rule) -> Callable[..., Any] | None:
    """This module's forward of ``rule``, or ``None`` where the file shows the rule's own."""
    return vars(sys.modules[__name__]).get(f"{rule.name}_forward")


def source(rule: Rule) -> tuple[list[str], str]:
    """``(import lines, code)`` of ``rule``'s forward as an exercise file shows it: the imports
    by section, a blank line between sections; ``def forward`` and, above it, the helpers of this
    module it calls. :class:`ForwardSourceError` where it needs a name no public module gives."""
    forward = plain_forward(rule) or rule.fn.fwd
    functions, imports = _closure(rule, forward)
    code = "\n\n".join(_source(f) for f in functions[1:][::-1])
    code += ("\n\n" if code else "") + _source(forward).replace(f"def {forward.__name__}(", "def forward(", 1)
    lines: list[str] = []
    for line in sorted(imports | set(GIVEN), key=_import_order):
        if lines and _import_order(line)[0] != _import_order(lines[-1])[0]:
            lines.append("")  # a blank line between the sections
        lines.append(line)
    return lines, code


def _import_order(line: str) -> tuple[int, bool, str]:
    """Standard library, then other packages, then manualgrad; ``import`` before ``from``."""
    module = line.split()[1]
    top = module.split(".")[0]
    return (0 if top in sys.stdlib_module_names else 2 if top == "manualgrad" else 1, line.startswith("from"), module)


def _source(f: Callable[..., Any]) -> str:
    """``f``'s source as an exercise file shows it: without the statements that only call one of
    the library's private argument checks (``_validate...``), which a file cannot import."""
    lines = textwrap.dedent(inspect.getsource(f)).splitlines()
    body = ast.parse("\n".join(lines)).body[0].body
    checks = {i for stmt in body if _is_private_check(stmt) for i in range(stmt.lineno - 1, stmt.end_lineno)}
    return "\n".join(line for i, line in enumerate(lines) if i not in checks).strip() + "\n"


def _is_private_check(statement: ast.stmt) -> bool:
    call = statement.value if isinstance(statement, ast.Expr) else None
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id.startswith("_validate")


def _closure(rule: Rule, forward: Callable[..., Any]) -> tuple[list[Callable[..., Any]], set[str]]:
    """The functions an exercise file defines (``forward`` first, then the helpers of this module
    it calls, each after those that call it) and the import lines of the modules they name."""
    functions, imports, todo = [], set(), [forward]
    while todo:
        f = todo.pop(0)
        if f in functions:
            functions.remove(f)  # shown above every function that calls it
        functions.append(f)
        for name in sorted(_free_names(f)):
            value = f.__globals__.get(name, getattr(builtins, name, None))
            helper = inspect.unwrap(value) if callable(value) else None
            if value is not None and value is getattr(builtins, name, None):
                continue
            if isinstance(value, types.ModuleType):
                imports.add(_import_line(rule, name, value))
            elif getattr(typing, name, None) is value:
                imports.add(f"from typing import {name}")
            elif inspect.isfunction(helper) and helper.__module__ == __name__:
                todo.append(helper)
            elif f.__module__.split(".")[0] != "manualgrad" and not name.startswith("_"):
                imports.add(f"from {f.__module__} import {name}")  # a rule registered by its user: their module
            else:
                ours = f.__module__.startswith("manualgrad.")
                raise ForwardSourceError(
                    f"the forward of {rule.name} uses {name}, which an exercise file cannot import"
                    + (f": give it a {rule.name}_forward in {__name__}" if ours else "")
                )
    return functions, imports


def _free_names(f: Callable[..., Any]) -> set[str]:
    """The global names ``f``'s shown code (:func:`_source`), decorators and annotations read."""
    tree = ast.parse(_source(f)).body[0]
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.FunctionDef) and node is not tree:
            bound.add(node.name)
    return read - bound


def _import_line(rule: Rule, name: str, module: types.ModuleType) -> str:
    """The import that binds ``name`` to ``module``; :class:`ForwardSourceError` for a private module."""
    full = module.__name__
    if any(part.startswith("_") for part in full.split(".")) or (
        full.split(".")[0] == "manualgrad" and full not in PUBLIC
    ):
        raise ForwardSourceError(f"the forward of {rule.name} uses the private module {full} as {name}")
    if full == name:
        return f"import {name}"
    parent, _, last = full.rpartition(".")
    return f"from {parent} import {name}" if last == name and parent else f"import {full} as {name}"
