"""The ``shard_map`` check: a rule's VJP inside ``jax.shard_map`` over two devices equals its VJP on one.

Inside ``jax.shard_map`` an argument is either *device-varying* (each device holds its own
value: the batch split ``P("d")``) or *invariant* (one value on every device: the weights
replicated ``P()``); a hand backward must return each argument's cotangent with its
argument's type, the copies of an invariant argument summed over the devices
(:mod:`manualgrad.rules.devices` derives it). This check runs each sample that way, on a mesh
of :data:`DEVICES` devices along the axis :data:`AXIS`, under JAX's type checking of the
varying axes (``check_vma=True``):

* the *data* arguments vary by device: the first argument and every other argument of the
  same leading length (the batch: labels, targets, keys and values, initial states); device 0
  holds the sample's value, device 1 the value reversed along every axis, so that the two
  devices' cotangents differ and their sum is no copy of either;
* every other argument (weights, biases, scales, tables) is replicated.

One device computes the same function of the same values: the rule at device 0's arguments and
at device 1's, the outputs stacked, and ``jax.vjp`` of that under the same output cotangents.
The data arguments' cotangents must equal that VJP's device by device, the replicated ones its
VJP, which sums the two devices' contributions as autodiff sums the uses of one variable (seed
003's variable on several paths). Both sides run the hand rule: the check judges the passage
across devices, the ``vjp`` check the rule itself. Where fewer than :data:`DEVICES` devices
exist the check is not applicable, and says how to get them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from manualgrad.check.comparison import compare
from manualgrad.check.report import Finding
from manualgrad.check.tolerances import ATOL
from manualgrad.check.trees import is_float_tree, random_like
from manualgrad.registry import Rule, Sample
from manualgrad.rules import devices
from manualgrad.text import first_line

CHECK = "shard_map"
DEVICES = devices.SAMPLE_DEVICES
AXIS = devices.SAMPLE_AXIS
# Both sides run the same hand rule on the same values; only the order of the sum over the two
# devices differs (one all-reduce against autodiff's accumulation): round-off, the vjp check's bound.
TOLERANCES = {"float64": 1e-12, "float32": 1e-5}
ON_MESH = "a collective: every check of it runs inside shard_map over the devices"
HOW_TO_GET_DEVICES = (
    f"needs {DEVICES} devices and this process has {{found}}: on the CPU, set "
    f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} before JAX starts"
)


def mesh() -> jax.sharding.Mesh | None:
    """A one-axis mesh (:data:`AXIS`) of the first :data:`DEVICES` devices; ``None`` where fewer exist."""
    devices = jax.devices()
    if len(devices) < DEVICES:
        return None
    return jax.make_mesh((DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:DEVICES])


def not_applicable_reason() -> str | None:
    """Why the check cannot run in this process, or ``None`` where it can."""
    found = len(jax.devices())
    return HOW_TO_GET_DEVICES.format(found=found) if found < DEVICES else None


def data_arguments(rule: Rule, args: tuple[Any, ...]) -> list[int]:
    """The arguments that vary by device: the first (an array or a pytree of them), and every array
    argument of the same leading length as its first leaf; the rule's static arguments never do."""
    static = set(getattr(rule.fn, "nondiff_argnums", ()))
    first = jax.tree_util.tree_leaves(args[0])
    lead = jnp.shape(first[0])[:1] if first else ()
    return [
        i
        for i, a in enumerate(args)
        if i not in static and (i == 0 or (lead and hasattr(a, "shape") and jnp.shape(a)[:1] == lead))
    ]


def on_mesh(rule: Rule) -> bool:
    """Whether ``rule`` is a collective (it has an ``axis_name`` and runs only inside ``shard_map``)
    not yet seen from outside it (:func:`device_rule`)."""
    return "axis_name" in rule.argnames and not getattr(rule.fn, "mesh_view", False)


def device_rule(rule: Rule) -> Rule:
    """A collective ``rule`` seen from outside ``shard_map``, for every check of the checker: its
    function and its reference applied on the mesh to its samples, whose ``Rule.split`` arguments
    hold one block per device on a leading axis (the other arguments are replicated), and the
    outputs' blocks stacked likewise. Its sample inputs and mistakes are the rule's own, which
    see the arguments so."""
    return dataclasses.replace(rule, fn=on_devices(rule, rule.fn), reference=on_devices(rule, rule.reference))


def on_devices(rule: Rule, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a collective ``rule``'s function, its reference, an exercise's forward) on the mesh: its
    ``Rule.split`` arguments given as their blocks stacked, the other arguments replicated, the
    outputs' blocks stacked."""
    static = set(rule.fn.nondiff_argnums)

    def stacked(*args: Any) -> Any:
        inputs = [i for i in range(len(args)) if i not in static]

        def per_device(*values):
            local = dict(zip(inputs, values))
            local = {i: jax.tree_util.tree_map(lambda x: x[0], v) if i in rule.split else v for i, v in local.items()}
            out = fn(*(local.get(i, a) for i, a in enumerate(args)))
            return jax.tree_util.tree_map(lambda y: y[None], out)

        specs = tuple(PartitionSpec(AXIS) if i in rule.split else PartitionSpec() for i in inputs)
        on_devices = jax.shard_map(per_device, mesh=mesh(), in_specs=specs, out_specs=PartitionSpec(AXIS))
        return on_devices(*(args[i] for i in inputs))

    stacked = functools.wraps(fn)(stacked)
    stacked.mesh_view = True  # already seen from outside shard_map: on_mesh is false for the device rule
    return stacked


def _stacked(a: Any) -> Any:
    """Device 0's and device 1's values of a data argument, on a new leading axis."""
    return jax.tree_util.tree_map(lambda x: jnp.stack([x, jnp.flip(x)]), a)


def _at(args: tuple[Any, ...], data: list[int], k: int) -> tuple[Any, ...]:
    return tuple(jax.tree_util.tree_map(lambda x: x[k], a) if i in data else a for i, a in enumerate(args))


def findings(rule: Rule, sample: Sample, key: jax.Array, dtype: str, options: Any = None) -> list[Finding]:
    """The check on one sample: a finding per differentiated argument, or one saying why it cannot run."""
    why = not_applicable_reason()
    if why is not None:
        return [Finding.not_applicable(rule.name, CHECK, dtype, sample.label, why)]
    if on_mesh(rule):
        return [Finding.not_applicable(rule.name, CHECK, dtype, sample.label, ON_MESH)]
    args = sample.args
    diff = [i for i in rule.differentiable if is_float_tree(args[i])]
    if not diff:
        return []
    data = data_arguments(rule, args)
    full = tuple(_stacked(a) if i in data else a for i, a in enumerate(args))
    try:
        u = random_like(key, jax.eval_shape(lambda: _one_device(rule, full, data)))
        received, expected = jax.jit(_program(rule, full, data, diff), compiler_options=options)(
            [full[i] for i in diff], u
        )
    except Exception as error:  # a backward JAX refuses inside shard_map is a failure of this check
        note = f"raised {type(error).__name__}: {first_line(error)}"
        return [Finding.not_run(rule.name, CHECK, dtype, sample.label, note, tolerance=TOLERANCES[dtype])]
    names = rule.argnames
    return [
        compare(rule.name, CHECK, dtype, sample.label, names[i], r, e, TOLERANCES[dtype], ATOL[dtype])
        for i, r, e in zip(diff, received, expected)
    ]


def _one_device(rule: Rule, full: tuple[Any, ...], data: list[int]) -> Any:
    """The rule at each device's arguments, on one device, the outputs stacked."""
    outputs = [rule.fn(*_at(full, data, k)) for k in range(DEVICES)]
    return jax.tree_util.tree_map(lambda *ys: jnp.stack(ys), *outputs)


def _program(rule: Rule, full: tuple[Any, ...], data: list[int], diff: list[int]):
    """``(primals, u) ↦ (cotangents inside shard_map, cotangents on one device)``: the data
    arguments enter ``shard_map`` split along :data:`AXIS`, the differentiated ones replicated
    where they are no data, the rest are constants (invariant)."""
    inputs = sorted(set(data) | set(diff))
    spec = lambda i: PartitionSpec(AXIS) if i in data else PartitionSpec()  # noqa: E731
    block = lambda i, a: jax.tree_util.tree_map(lambda x: x[0], a) if i in data else a  # noqa: E731

    def with_values(base: tuple[Any, ...], positions: list[int], values: list[Any]) -> tuple[Any, ...]:
        replaced = dict(zip(positions, values))
        return tuple(replaced.get(i, a) for i, a in enumerate(base))

    def per_device(values, u):
        args = with_values(full, inputs, [block(i, v) for i, v in zip(inputs, values)])
        primals = [args[i] for i in diff]
        _, pull = jax.vjp(lambda *p: rule.fn(*with_values(args, diff, list(p))), *primals)
        cotangents = pull(jax.tree_util.tree_map(lambda x: x[0], u))
        return [jax.tree_util.tree_map(lambda c: c[None], c) if i in data else c for i, c in zip(diff, cotangents)]

    def program(primals, u):
        values = [dict(zip(diff, primals)).get(i, full[i]) for i in inputs]
        sharded = jax.shard_map(
            per_device,
            mesh=mesh(),
            in_specs=([spec(i) for i in inputs], PartitionSpec(AXIS)),
            out_specs=[spec(i) for i in diff],
        )
        _, pull = jax.vjp(lambda *p: _one_device(rule, with_values(full, diff, list(p)), data), *primals)
        return sharded(values, u), list(pull(u))

    return program
