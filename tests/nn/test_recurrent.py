"""The character model embedding → rnn | lstm → dense: hand rules vs jax.grad, initialisation, causality, bad input.

float64 (conftest enables x64); one tiny model per kind: vocabulary 5, E = 3, H = 4, a batch of 2 rows of 6 ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manualgrad.nn import recurrent
from manualgrad.nn.layers import LayerError

F64 = jnp.float64
IDS = jnp.array([[0, 3, 1, 4, 2, 0], [0, 2, 2, 0, 0, 0]])  # the second row a short word padded with 0
KINDS = recurrent.KINDS


def _tiny(kind):
    model = recurrent.char_model(kind, 5, width=4, embed=3, dtype=F64)
    shape, params = model.init(jax.random.PRNGKey(1), (-1, 6))
    return model, shape, params


@pytest.mark.parametrize("kind", KINDS)
def test_hand_rules_agree_with_jax_grad_of_the_references(kind):
    model, shape, params = _tiny(kind)
    assert shape == (-1, 6, 5)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 5), F64)

    def pulled(reference):
        logits, pull = jax.vjp(lambda p: model.apply(p, IDS, reference=reference), params)
        return logits, pull(cotangent)[0]

    (manual, d_manual), (auto, d_auto) = jax.jit(lambda: pulled(False))(), jax.jit(lambda: pulled(True))()
    assert manual.shape == (2, 6, 5)
    np.testing.assert_allclose(manual, auto, rtol=1e-13, atol=1e-14)
    # float64 round-off of sums over 6 steps and 2 rows of order-one terms: 1e-12 leaves two decades to spare;
    # a gradient that stopped after one step or dropped a path is off in the first digits.
    for (path, m), a in zip(jax.tree_util.tree_leaves_with_path(d_manual), jax.tree_util.tree_leaves(d_auto)):
        np.testing.assert_allclose(m, a, rtol=1e-12, atol=1e-13, err_msg=jax.tree_util.keystr(path))
        assert np.abs(np.asarray(a)).max() > 1e-3  # every parameter gets a gradient (the padded ids' rows too)


@pytest.mark.parametrize("kind", KINDS)
def test_initialisation_is_pytorchs_with_the_forget_bias_at_one(kind):
    _, _, params = _tiny(kind)
    rec, out = params["recurrent"], params["output"]
    blocks = recurrent.BLOCKS[kind] * 4
    assert params["embedding"].shape == (5, 3)
    assert (rec["w_x"].shape, rec["w_h"].shape, rec["b"].shape) == ((3, blocks), (4, blocks), (blocks,))
    assert (out["w"].shape, out["b"].shape) == ((4, 5), (5,))
    for w in (rec["w_x"], rec["w_h"], out["w"]):
        assert 0 < np.abs(np.asarray(w)).max() <= 0.5  # U(−1/√H, 1/√H), H = 4
    np.testing.assert_array_equal(out["b"], 0)
    if kind == "lstm":
        np.testing.assert_array_equal(rec["b"][4:8], 1.0)  # the f block of (i, f, g, o)
        others = np.concatenate([rec["b"][:4], rec["b"][8:]])
        assert np.abs(others).max() <= 0.5
    else:
        assert np.abs(np.asarray(rec["b"])).max() <= 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_logits_at_t_do_not_see_later_tokens(kind):
    """The padding after a word changes none of its counted predictions (data.Sequences relies on it)."""
    model, _, params = _tiny(kind)
    changed = IDS.at[1, 3:].set(4)
    a, b = model.apply(params, IDS), model.apply(params, changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert np.abs(np.asarray(a[1, 3:] - b[1, 3:])).max() > 1e-3


def test_bad_arguments_are_refused_in_one_sentence():
    with pytest.raises(LayerError, match="kind must be 'rnn' or 'lstm', got 'gru'"):
        recurrent.char_model("gru", 5)
    with pytest.raises(LayerError, match="width must be a positive int, got 0"):
        recurrent.char_model("lstm", 5, width=0)
    model, _, params = _tiny("lstm")
    with pytest.raises(LayerError, match=r"ids must be integer token ids of shape \(N, T\), got float64 \(2, 6\)"):
        model.apply(params, IDS.astype(F64))
    with pytest.raises(LayerError, match=r"input_shape must be \(N, T\) token ids, got \(-1, 6, 1\)"):
        model.init(jax.random.PRNGKey(0), (-1, 6, 1))
