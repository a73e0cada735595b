"""The GPT of manualgrad.nn.gpt: the hand rules' gradient is jax.grad's, causality, the masked loss, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manualgrad.check.tolerances import relative_error
from manualgrad.nn import gpt, layers
from manualgrad.rules import activations

VOCAB, CONTEXT = 7, 6
NET = gpt.gpt(VOCAB, CONTEXT, width=16, depth=1, heads=2)  # the tiny GPT of every test here


def _params(net=NET):
    return net.init(jax.random.PRNGKey(0), (-1, CONTEXT))[1]


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (3, CONTEXT + 1)), jnp.int32)
    return tokens, jnp.asarray(rng.random((3, CONTEXT)) < 0.7)


def _grad(params, tokens, mask, reference):
    return jax.grad(lambda p: gpt.sequence_loss(NET, p, tokens, mask, reference=reference)[0])(params)


def test_hand_rule_gradient_is_jax_grad_of_the_references_and_uses_the_rules():
    params, (tokens, mask) = _params(), _batch()
    manual, auto = _grad(params, tokens, mask, False), _grad(params, tokens, mask, True)
    # float32: each leaf's largest error over its largest entry; ~1e-7 per op, 1e-5 leaves ~100 ops of slack
    assert relative_error(manual, auto) < 1e-5
    activations.gelu.defvjp(activations.gelu_forward, lambda *args: (2 * args[-1],))  # plant a wrong gelu backward
    try:
        planted = _grad(params, tokens, mask, False)
    finally:
        activations.gelu.defvjp(activations.gelu_forward, activations._gelu_vjp)
    assert relative_error(planted, auto) > 1e-2
    assert relative_error(_grad(params, tokens, mask, True), auto) == 0  # the references never see the rule


def test_logits_shape_and_causality():
    params, (tokens, _) = _params(), _batch()
    ids = tokens[:, :-1]
    logits = NET.apply(params, ids)
    assert logits.shape == (3, CONTEXT, VOCAB)
    changed = NET.apply(params, ids.at[:, 3].set((ids[:, 3] + 1) % VOCAB))
    np.testing.assert_array_equal(changed[:, :3], logits[:, :3])  # positions before 3 never see token 3
    assert not np.allclose(changed[:, 3:], logits[:, 3:])


def test_loss_is_the_masked_mean_of_minus_log_p():
    params, (tokens, mask) = _params(), _batch()
    loss, correct = gpt.sequence_loss(NET, params, tokens, mask)
    log_p = jax.nn.log_softmax(NET.apply(params, tokens[:, :-1]))
    picked = np.take_along_axis(np.asarray(log_p), np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, -picked[np.asarray(mask)].mean(), rtol=1e-6)  # float32 sums of 18 terms
    right = np.argmax(np.asarray(log_p), -1) == np.asarray(tokens[:, 1:])
    assert int(correct) == int(right[np.asarray(mask)].sum())
    # a masked target does not count: with the last target masked, changing its token leaves the loss
    last = mask.at[:, -1].set(False)
    other = tokens.at[:, -1].set((tokens[:, -1] + 1) % VOCAB)
    assert float(gpt.sequence_loss(NET, params, other, last)[0]) == float(
        gpt.sequence_loss(NET, params, tokens, last)[0]
    )


def test_residual_projections_start_small_and_key_has_no_bias():
    params = _params(gpt.gpt(VOCAB, CONTEXT, width=64, depth=8, heads=4))
    block = params["blocks"][0]
    assert "b" not in block["k"]  # softmax cancels it: its gradient would be 0
    std = {name: float(jnp.std(block[name]["w"])) for name in ("q", "o", "proj")}
    assert std["q"] == pytest.approx(0.02, rel=0.1)  # 4096 draws: std within a few percent
    assert std["o"] == pytest.approx(0.02 / 4, rel=0.1)  # 0.02/√(2·8)
    assert std["proj"] == pytest.approx(0.02 / 4, rel=0.1)


def test_sample_is_seeded_and_stops_at_the_boundary():
    params = _params()
    a = gpt.sample(NET, params, jax.random.PRNGKey(3), 4, CONTEXT, start=0, stop=0)
    b = gpt.sample(NET, params, jax.random.PRNGKey(3), 4, CONTEXT, start=0, stop=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, CONTEXT + 1) and (np.asarray(a[:, 0]) == 0).all()
    for row in np.asarray(a):
        ends = np.flatnonzero(row[1:] == 0)
        if ends.size:
            assert (row[1 + ends[0] :] == 0).all()  # only the boundary after the first one


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: gpt.gpt(VOCAB, CONTEXT, width=10, heads=4), "gpt: width 10 must be a multiple of heads 4"),
        (lambda: gpt.gpt(VOCAB, 0), "gpt: context must be a positive int, got 0"),
        (lambda: NET.apply(_params(), jnp.zeros((2, CONTEXT))), "gpt: ids must be integer token ids of shape (N, T)"),
        (lambda: NET.apply(_params(), jnp.zeros((2, CONTEXT + 1), jnp.int32)), "gpt: sequences of at most 6 tokens"),
        (lambda: NET.init(jax.random.PRNGKey(0), (-1, 3, 2)), "gpt: input must be token ids (N, T) with T ≤ 6"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(build, message):
    with pytest.raises(layers.LayerError) as error:
        build()
    assert str(error.value).startswith(message)


def test_float32_attention_stays_float32_with_x64_enabled():
    """The 1/√H scale was a NumPy float64 scalar, which promotes a float32 attention to float64 under x64
    (conftest enables it), and the next dense layer refused the mix."""
    from manualgrad.rules.attention import attention

    q = jnp.ones((1, 3, 2, 4), jnp.float32)
    out, pull = jax.vjp(lambda q, k, v: attention(q, k, v, True), q, q, q)
    assert out.dtype == jnp.float32
    assert [c.dtype for c in pull(out)] == [jnp.float32] * 3
