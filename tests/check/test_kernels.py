"""Real kernels checked as their authors would: JAX's Pallas GPU kernels in interpret mode, in
float32, judged against a float64 golden of their own references (``check(dtype=None)``); copies
whose backward carries one planted mistake; a bfloat16 network of rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manualgrad as mg
from manualgrad.check import golden
from manualgrad.check.report import NOT_APPLICABLE


def _pallas():
    """The Pallas GPU ops, or a skip naming why they cannot run in interpret mode here."""
    try:
        from jax.experimental.pallas.ops.gpu import attention, layer_norm, rms_norm

        x = jnp.ones((1, 1, 8), jnp.float32)
        layer_norm.layer_norm(x, x[0, 0], x[0, 0], interpret=True).block_until_ready()
    except Exception as error:  # an older or trimmed jax: the kernels' own import or interpret mode fails
        pytest.skip(f"jax.experimental.pallas cannot run its GPU kernels in interpret mode here: {error}")
    return attention, layer_norm, rms_norm


attention, layer_norm, rms_norm = _pallas()

SM_SCALE = 0.25  # 1/√H for H = 16: a scale other than 1, so that leaving it out shows
# Every block 16 rows: T = 32 is two query blocks and two key blocks, so that the causal mask
# crosses a block boundary and a zeroed block is one of several.
BLOCKS = attention.BlockSizes(**{name: 16 for name in attention.BlockSizes.__dataclass_fields__})


def _norm_args(seed: int):
    """(B, T, C) = (2, 4, 32) as the kernels' two vmaps expect; weights away from 1."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    x, w, b = (
        jax.random.normal(k[0], (2, 4, 32)),
        1 + 0.5 * jax.random.normal(k[1], (32,)),
        jax.random.normal(k[2], (32,)),
    )
    return x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32)  # the suite runs in 64-bit mode


def _attention_args(seed: int):
    """(B, T, N, H) = (1, 32, 2, 16)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(k, (1, 32, 2, 16), jnp.float32) for k in keys)


def _norm_copy(module, forward: str, backward: str, change):
    """A copy of a Pallas norm whose backward is the kernel's, then ``change(res, g, (dx, dw, db))``."""
    fwd = functools.partial(getattr(module, forward), interpret=True)
    bwd = functools.partial(getattr(module, backward), None, 3, 1e-5, "triton", True)

    @jax.custom_vjp
    def norm(x, weight, bias):
        return fwd(x, weight, bias)[0]

    norm.defvjp(fwd, lambda res, g: change(res, g, bwd(res, g)))
    return norm


def _attention_copy(change):
    """A copy of Pallas ``mha`` (causal, :data:`BLOCKS`) whose backward is then ``change``d."""
    options = dict(sm_scale=SM_SCALE, causal=True, block_sizes=BLOCKS, backward_pass_impl="triton")
    options |= dict(num_warps=None, num_stages=2, grid=None, interpret=True, debug=False, return_residuals=False)

    def fwd(q, k, v):
        return attention._mha_forward(q, k, v, None, **options)

    @jax.custom_vjp
    def mha(q, k, v):
        return fwd(q, k, v)[0]

    def bwd(res, g):
        dq, dk, dv, _ = attention._mha_backward(*list(options.values()), res, g)
        return change(res, g, (dq, dk, dv))

    mha.defvjp(fwd, bwd)
    return mha


def _ln_mean_term_dropped(res, g, grads):
    """dx without ``−rstd · mean(w · g)``: the gradient through the mean left out."""
    x, weight, _, _, rstd = res
    dx, dw, db = grads
    return dx + rstd[..., None] * jnp.mean(weight[None, None] * g, axis=-1, keepdims=True), dw, db


def _rms_normalisation_dropped(res, g, grads):
    """dx as ``rstd · w · g``: the gradient through the root mean square left out."""
    x, weight, _, rstd = res
    return (rstd[..., None] * weight[None, None] * g).astype(x.dtype), *grads[1:]


def _scaled(i, factor=1.01):
    def change(res, g, grads):
        return tuple(d * factor if j == i else d for j, d in enumerate(grads))

    return change


def _first_query_block_zeroed(res, g, grads):
    dq, dk, dv = grads
    return dq.at[:, : BLOCKS.block_q_dq].set(0), dk, dv


def _scale_left_out_of_dk(res, g, grads):
    dq, dk, dv = grads
    return dq, dk / SM_SCALE, dv


KERNELS = {
    "layer_norm": (
        functools.partial(layer_norm.layer_norm, interpret=True),
        layer_norm.layer_norm_reference,
        _norm_args,
    ),
    "rms_norm": (functools.partial(rms_norm.rms_norm, interpret=True), rms_norm.rms_norm_reference, _norm_args),
    "mha": (
        functools.partial(attention.mha, segment_ids=None, sm_scale=SM_SCALE, causal=True, block_sizes=BLOCKS,
                          interpret=True),
        functools.partial(attention.mha_reference, segment_ids=None, sm_scale=SM_SCALE, causal=True),
        _attention_args,
    ),
}  # fmt: skip
# Per kernel, each planted mistake: the wrong copy and the argument it must be named by.
MISTAKES = {
    "layer_norm": {
        "dweight scaled by 1.01": (
            _norm_copy(layer_norm, "layer_norm_forward", "layer_norm_backward", _scaled(1)),
            "weight",
        ),
        "dx's mean term dropped": (
            _norm_copy(layer_norm, "layer_norm_forward", "layer_norm_backward", _ln_mean_term_dropped),
            "x",
        ),
    },
    "rms_norm": {
        "dx scaled by 1.01": (_norm_copy(rms_norm, "rms_norm_forward", "rms_norm_backward", _scaled(0)), "x"),
        "dx's normalisation term dropped": (
            _norm_copy(rms_norm, "rms_norm_forward", "rms_norm_backward", _rms_normalisation_dropped),
            "x",
        ),
    },
    "mha": {
        "dv scaled by 1.01": (_attention_copy(_scaled(2)), "v"),
        "dq's first query block zeroed": (_attention_copy(_first_query_block_zeroed), "q"),
        "softmax scale left out of dk": (_attention_copy(_scale_left_out_of_dk), "k"),
    },
}
CHECKED = ("forward", "vjp")  # the compared values; jit and vmap are the same comparisons again


def _check(fn, reference, args, checks=CHECKED, seed=0):
    """``mg.check`` in a kernel author's setting, 64-bit mode off (the suite's is on): Pallas
    ``mha``'s index arithmetic is int32 and breaks in 64-bit mode, which the check never switches."""
    with jax.enable_x64(False):
        return mg.check(fn, reference=reference, args=args, checks=checks, seed=seed)


@pytest.mark.parametrize("name", KERNELS)
def test_pallas_kernel_passes_against_its_own_reference_in_float32(name):
    fn, reference, make = KERNELS[name]
    report = _check(fn, reference, make(0), (*CHECKED, "grad_of_grad", "finite_diff"))
    assert report.passed, report.table()
    assert report.dtype == "float32" and all(f.dtype == "float32" for f in report.findings)
    judged = [f for f in report.findings if f.golden]
    assert {f.argument for f in judged} == {"output", *(["q", "k", "v"] if name == "mha" else ["x", "weight", "bias"])}
    # Really float32 against a float64 golden: errors of float32's round-off, the kernel within
    # twice the reference's (FlashAttention's factor) plus the floor.
    assert all(1e-9 < f.max_abs_error < 1e-4 and f.max_abs_error <= f.allowed for f in judged)
    # JAX cannot differentiate a pallas_call, so the kernel's backward has no second order: not
    # applicable, with the reason. Finite differences run in float32, coarse (check/coarse).
    na = {f.check: f.note for f in report.not_applicable()}
    assert list(na) == ["grad_of_grad"] and "JAX cannot differentiate" in na["grad_of_grad"]
    assert all(
        f.note.startswith("coarse finite differences in float32") for f in report.findings if f.check == "finite_diff"
    )
    assert report.counts() == {"passed": 3, "failed": 0, NOT_APPLICABLE: 1}


def test_a_reference_that_computes_in_float32_is_detected_and_said():
    """Pallas's mha_reference pins its einsums to float32 (preferred_element_type): its float64
    output is float32-accurate. The report says so and widens the allowance by its rounding."""
    fn, reference, make = KERNELS["mha"]
    report = _check(fn, reference, make(0))
    assert any("does not resolve float64" in note for note in report.notes), report.notes
    assert all("golden's own rounding" in f.note for f in report.findings if f.golden)
    _, layer_norm_reference, make = KERNELS["layer_norm"]
    plain = _check(KERNELS["layer_norm"][0], layer_norm_reference, make(0))
    assert not any("does not resolve" in note for note in plain.notes)


@pytest.mark.parametrize(
    "name, mistake", [(name, mistake) for name, mistakes in MISTAKES.items() for mistake in mistakes]
)
def test_planted_mistake_in_a_kernels_backward_fails_naming_the_argument(name, mistake):
    _, reference, make = KERNELS[name]
    wrong, argument = MISTAKES[name][mistake]
    report = _check(wrong, reference, make(0), (*CHECKED, "finite_diff"))
    # Against the golden, and by the coarse differences in float32, the reference not involved.
    assert {(f.check, f.argument) for f in report.failures()} == {("vjp", argument), ("finite_diff", argument)}
    worst = next(f for f in report.failures() if f.check == "vjp")
    assert worst.ratio > 10 and f"argument {argument}" in worst.describe()  # far beyond round-off


def _net(relu=mg.relu):
    """dense → relu → dense → softmax cross-entropy, from the rules."""

    def net(p, x, labels):
        h = relu(mg.bias_add(mg.dense(x, p["w1"]), p["b1"]))
        return mg.softmax_cross_entropy(mg.bias_add(mg.dense(h, p["w2"]), p["b2"]), labels)

    return net


def _net_reference(p, x, labels):
    h = jnp.maximum(x @ p["w1"] + p["b1"][None], 0)
    logits = h @ p["w2"] + p["b2"][None]
    log_p = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def _net_args(dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    p = {
        "w1": jax.random.normal(k[0], (8, 16)) / 8**0.5,
        "b1": 0.1 * jax.random.normal(k[1], (16,)),
        "w2": jax.random.normal(k[2], (16, 4)) / 4,
        "b2": 0.1 * jax.random.normal(k[3], (4,)),
    }
    cast = jax.tree_util.tree_map(lambda a: a.astype(dtype), (p, jax.random.normal(k[4], (8, 8))))
    return *cast, jax.random.randint(k[5], (8,), 0, 4)


def test_bfloat16_network_of_rules_checks_in_bfloat16():
    report = mg.check(_net(), reference=_net_reference, args=_net_args(jnp.bfloat16))
    assert report.passed, report.table()
    judged = [f for f in report.findings if f.golden]
    assert judged and all(f.dtype == "bfloat16" for f in judged)
    # bfloat16's round-off against the float64 golden, not float32's.
    assert max(f.err_ref for f in judged) > 1e-4
    assert "bfloat16" in {f.check: f.note for f in report.not_applicable()}["finite_diff"]

    relu = jax.custom_vjp(lambda z: mg.relu(z))  # the mask taken from the cotangent, not the input
    relu.defvjp(lambda z: (mg.relu(z), None), lambda _, g: (jnp.where(g > 0, g, 0),))
    wrong = mg.check(_net(relu), reference=_net_reference, args=_net_args(jnp.bfloat16), checks=CHECKED)
    assert {f.argument for f in wrong.failures()} == {"p", "x"}, wrong.table()


def test_the_criterion_is_flash_attentions():
    eps32 = float(np.finfo(np.float32).eps)
    assert golden.judge(2.0, 1.0, "float32", 0.0) == (True, 2.0)
    assert golden.judge(2.1, 1.0, "float32", 1.0)[1] == pytest.approx(2 + 2 * eps32)


def test_a_kernel_that_cannot_run_in_64_bit_mode_is_pointed_to_its_own_dtype():
    """dtype="float32" checks in 64-bit mode, where mha's int32 index arithmetic meets int64."""
    fn, reference, make = KERNELS["mha"]
    report = mg.check(fn, reference=reference, args=make(0), dtype="float32", checks=("forward",))
    assert not report.passed and "int32, int64" in report.failures()[0].describe()
    assert "with dtype=None" in report.notes[0]


def test_float32_network_gets_coarse_differences_per_leaf():
    report = mg.check(_net(), reference=_net_reference, args=_net_args(jnp.float32), checks=("finite_diff",))
    assert report.passed, report.table()
    found = {f.argument: f for f in report.findings}
    assert set(found) == {"p['b1']", "p['b2']", "p['w1']", "p['w2']", "x"}
    # Where the differences are too coarse to judge a leaf, the golden judges it: said, not passed.
    assert all(f.note.endswith("judged against the float64 golden instead") for f in report.not_applicable())
