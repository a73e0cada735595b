"""The PyTorch peers of the bench's sequence models (``TorchGPT``, ``TorchLSTM``) compute the JAX model's loss,
gradients and Adam steps from the same parameters; the attention's peak-memory figures; ``gpt_2k``'s shapes and goals.

Tiny shapes throughout (the bench's own shapes belong to the benchmark): every test skips with the
reason where PyTorch is not installed, except those that need no PyTorch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from manualgrad.bench import memory, models, peers, report
from manualgrad.check.tolerances import relative_l2
from manualgrad.nn import gpt, recurrent
from manualgrad.train import step


def _tiny(kind: str, dtype=jnp.float32) -> models.Model:
    if kind == "gpt":
        return models.Model("tiny GPT", lambda: gpt.gpt(7, 8, 16, 2, 2, dtype), (8,), 3, False, 7, 2)
    return models.Model("tiny LSTM", lambda: recurrent.char_model("lstm", 7, 8, 4, dtype), (5,), 3, False, 7)


TINY = {kind: _tiny(kind) for kind in ("gpt", "lstm")}
# one weight of each model, its JAX path: the first block's query projection, the LSTM's recurrent weight
ONE = {"gpt": lambda tree: tree["blocks"][0]["q"]["w"], "lstm": lambda tree: tree["recurrent"]["w_h"]}


def _needs_torch() -> None:
    if peers.torch_reason() is not None:
        pytest.skip(f"the PyTorch peer cannot run here: {peers.torch_reason()}")


def _peer(kind: str, params):
    from manualgrad.bench import sequence_peers

    if kind == "gpt":
        return sequence_peers.TorchGPT(params, TINY["gpt"].heads, models.LEARNING_RATE)
    return sequence_peers.TorchLSTM(params, models.LEARNING_RATE)


def _batch(kind: str, model: models.Model | None = None):
    """The tiny model's parameters, token rows, and a target mask with some targets left out (the masked mean)."""
    params, tokens, mask = models.inputs(model or TINY[kind], 1)
    return params, tokens, mask.at[0, -3:].set(False).at[2, 1].set(False)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_the_first_loss_and_the_gradients_are_the_hand_rules(kind):
    _needs_torch()
    params, tokens, mask = _batch(kind)
    net = TINY[kind].build()
    loss, grads = jax.value_and_grad(lambda p: gpt.sequence_loss(net, p, tokens, mask)[0])(params)
    peer = _peer(kind, params)
    torch_loss, torch_grads = peer.gradients(*peer.inputs(np.asarray(tokens), np.asarray(mask)))
    # A loss of about log 7 from logits that are sums of at most 4·16 float32 products: the two
    # implementations order those sums differently, a few ulps (6e-8 each) apart, far below 1e-6.
    np.testing.assert_allclose(torch_loss, float(loss), rtol=1e-6)
    assert jax.tree_util.tree_structure(torch_grads) == jax.tree_util.tree_structure(grads)
    # float32 round-off of the same sums over 3 rows and at most 8 positions, relative to the gradient's norm
    assert relative_l2(torch_grads, grads) < 1e-5
    one, expected = ONE[kind](torch_grads), np.asarray(ONE[kind](grads))
    np.testing.assert_allclose(one, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_in_float64_the_peers_are_the_hand_rules_to_1e_12(kind):
    """The same models in float64: a peer that differs from the JAX model anywhere (an ε, a scale, a mask, a
    bias) differs by far more than float64 round-off, which float32's 1e-5 could hide."""
    _needs_torch()
    model = _tiny(kind, jnp.float64)
    params, tokens, mask = _batch(kind, model)
    net = model.build()
    loss, grads = jax.value_and_grad(lambda p: gpt.sequence_loss(net, p, tokens, mask)[0])(params)
    peer = _peer(kind, params)
    torch_loss, torch_grads = peer.gradients(*peer.inputs(np.asarray(tokens), np.asarray(mask)))
    # float64 round-off (1.1e-16 a rounding) over sums of at most 64 terms and a few dozen layers: below 1e-13
    np.testing.assert_allclose(torch_loss, float(loss), rtol=1e-12)
    assert relative_l2(torch_grads, grads) < 1e-12


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_the_peers_take_the_same_adam_steps_as_the_jitted_step(kind):
    """Adam at the bench's rate; for the LSTM also that nn.LSTM's second bias stays 0 and untrained."""
    _needs_torch()
    params, tokens, mask = _batch(kind)
    net, tx = TINY[kind].build(), optax.adam(models.LEARNING_RATE)
    jitted = step.make_step(step.loss_fn(net, "manual", sequences=True), tx)
    state = (params, tx.init(params), net.init_state(params))
    peer = _peer(kind, params)
    inputs = peer.inputs(np.asarray(tokens), np.asarray(mask))
    for _ in range(2):
        *state, _, _, _ = jitted(*state, tokens, mask, models.KEY)
        peer.step(*inputs)
    got = ONE[kind](peer.weights())
    # Adam moves each weight by about lr = 3e-3 per step; float32 round-off stays far below 1e-5.
    np.testing.assert_allclose(got, np.asarray(ONE[kind](state[0])), atol=1e-5, rtol=0)
    if kind == "lstm":
        assert not peer.model["recurrent"].bias_hh_l0.detach().numpy().any()


def test_the_attentions_peak_bytes_hold_what_each_side_must():
    """jax.grad's program holds the T × S probabilities P for its backward; PyTorch holds O and the three
    gradients at the end of its backward (q, k, v of 1 × 64 × 2 × 8 float32)."""
    shape = (1, 64, 2, 8)
    entries = 4 * 1 * 64 * 2 * 8
    nbytes = memory.attention_peak_bytes(shape)
    assert nbytes["jax_grad"] >= 4 * 1 * 2 * 64 * 64
    assert nbytes["manual"] >= 3 * entries  # at least dq, dk, dv
    _needs_torch()
    from manualgrad.bench import sequence_peers

    assert sequence_peers.attention_peak_bytes(shape) >= 4 * entries


def test_gpt_2k_is_gpt_long_s_block_at_2048_positions_with_its_memory_goals():
    model = models.MODELS["gpt_2k"]
    params = jax.eval_shape(lambda: model.build().init(jax.random.PRNGKey(0), (-1, *model.input_shape))[1])
    assert (len(params["blocks"]), params["positions"].shape) == (1, (2048, 64))
    assert (model.batch, model.heads, model.vocab) == (2, 4, models.WORDS_VOCAB)
    assert memory.attention_shape(model) == (2, 2048, 4, 16)
    judged = {
        (model, value): report.judge(report.record("memory_ratio_manual_over_jax_grad", value, "ratio", model=model))
        for model in ("gpt_2k", "gpt_long")
        for value in (0.4, 0.6)
    }
    # gpt_2k's own bound (jax.grad's program holds the T × S probabilities), every other model's ≤ 1
    assert [judged[key]["meets_goal"] for key in sorted(judged)] == [True, False, True, True]
    assert judged["gpt_2k", 0.6]["goal"] == "<= 0.5" and judged["gpt_long", 0.6]["goal"] == "<= 1"
    for figure in ("step_ratio_manual_over_torch", "step_ratio_manual_over_jax_grad"):
        assert report.GOALS[figure] == ("<=", 1.0)  # every model, gpt_2k included


def test_the_table_names_the_models_with_a_goal_of_their_own():
    """A row whose models are judged against different bounds says which bound is whose."""
    records = [
        report.judge(report.record(figure, 0.3, "ratio", model=model))
        for model in ("gpt_long", "gpt_2k")
        for figure in ("memory_ratio_manual_over_jax_grad", "attention_peak_ratio_manual_over_jax_grad")
    ]
    machine = {"cpu": "cpu", "cores": 1, "backend": "cpu", "device": "cpu", "jax": "", "numpy": "", "torch": None}
    settings = {"dtype": "float32", "optimizer": "adam", "repeats": 1, "compile_repeats": 1, "matmul_size": 1}
    result = {
        "machine": {**machine, "host_memory": "", "compiler_options": {}},
        "settings": {**settings, "seconds": 1.0},
        "records": records,
        "models": {"gpt_long": "", "gpt_2k": ""},
    }
    rows = {line.split()[0]: line for line in report.table(result).splitlines() if "_ratio_" in line}
    assert rows["memory_ratio_manual_over_jax_grad"].endswith("<= 1; gpt_2k <= 0.5")
    attention = rows["attention_peak_ratio_manual_over_jax_grad"]  # gpt_2k's goal alone: gpt_long's figure unjudged
    assert attention.endswith(" gpt_2k <= 0.5") and attention.count("✓") == 1 and "<= 1" not in attention
