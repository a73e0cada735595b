"""``manualgrad bench``: the JSON document's structure, finite positive figures, and peers that do the same arithmetic.

Timings are never asserted here (they belong to the benchmark, measured as interleaved ratios);
what is asserted holds on any machine: every figure named by the issue is present and finite,
the gradients of jax.grad, NumPy and PyTorch agree with the hand rules', the FLOP count and
the residual bytes are what the model implies.
"""

import json
import math
import pathlib
import re
import runpy
import sys

import jax
import numpy as np
import optax
import pytest

from manualgrad import cli
from manualgrad.bench import bench, models, peers, report
from manualgrad.bench.memory import norm_residual_bytes
from manualgrad.check.tolerances import relative_l2
from manualgrad.errors import MissingExtraError
from manualgrad.nn import layers, recurrent
from manualgrad.train import step
from manualgrad.train.config import MODEL_DEFAULTS
from manualgrad.train.models import GPT

PER_MODEL = {
    "compile_s_manual",
    "compile_s_jax_grad",
    "compile_ratio_manual_over_jax_grad",
    "compiled_bytes_manual",
    "compiled_bytes_jax_grad",
    "memory_ratio_manual_over_jax_grad",
    "residual_bytes_manual",
    "residual_bytes_jax_grad",
    "residual_ratio_manual_over_jax_grad",
    "step_ms_manual",
    "step_ms_jax_grad",
    "step_ratio_manual_over_jax_grad",
    "gradient_difference_jax_grad_vs_manual",
    "step_flops",
    "flops_per_s_manual",
    "matmul_flops_per_s",
    "flops_fraction_manual_of_matmul",
}
# step_flops counts the dense and conv layers of a serial network: a sequence model gets no FLOP figures
PER_SEQUENCE_MODEL = PER_MODEL - {
    "step_flops",
    "flops_per_s_manual",
    "matmul_flops_per_s",
    "flops_fraction_manual_of_matmul",
}
PER_TORCH = {
    "step_ratio_manual_over_torch",
    "gradient_difference_torch_vs_manual",
    "torch_threads",
}
# and of a model with attention: one attention's peak bytes, forward and backward, beside PyTorch's kernel's
PER_ATTENTION_TORCH = {"attention_peak_bytes_torch", "attention_peak_ratio_manual_over_torch"}
PER_ATTENTION = {
    "attention_peak_bytes_manual",
    "attention_peak_bytes_jax_grad",
    "attention_peak_ratio_manual_over_jax_grad",
}
PER_MLP = {
    "step_ms_numpy",
    "step_ratio_manual_over_numpy",
    "gradient_difference_numpy_vs_manual",
    "relu_flips_numpy_vs_manual",
}


def _measured(records: list[dict]) -> dict[str, float]:
    """The measured figures of one model's records, by name. A figure may be left unmeasured only
    where it needs PyTorch and PyTorch is missing, and then with the reason, which names the extra."""
    reason = peers.torch_reason()
    for rec in records:
        if rec["value"] is None:
            assert rec["figure"] in PER_TORCH | PER_ATTENTION_TORCH, rec
            assert reason is not None and rec["skipped"] == reason, rec
    return {r["figure"]: r["value"] for r in records if r["value"] is not None}


@pytest.fixture(scope="module")
def quick_run():
    """What ``manualgrad bench --quick --json`` prints (digits MLP and CNN, 3 repeats, check of relu)."""
    return json.loads(report.to_json(bench.run(bench.QUICK)))


def test_json_names_every_figure(quick_run):
    figures = {}
    for rec in quick_run["records"]:
        figures.setdefault(rec["model"], set()).add(rec["figure"])
    assert set(figures) == {"digits_mlp", "digits_cnn", None}
    torch = PER_TORCH if peers.torch_reason() is None else set()
    assert PER_MODEL | PER_MLP | torch <= figures["digits_mlp"]
    assert PER_MODEL | torch <= figures["digits_cnn"] and not PER_MLP & figures["digits_cnn"]
    assert figures[None] == {"check_seconds_float64"}
    assert not any(f.startswith("norm_") for f in set().union(*figures.values()))  # no norm layers there
    for figure in set().union(*figures.values()):
        if "ratio" in figure:  # every ratio says both sides, hand rules first
            assert re.fullmatch(
                r"(step|compile|memory|(norm_|attention_)?residual|attention_peak)_ratio_manual_over_(jax_grad|numpy|torch)",
                figure,
            )
    machine = quick_run["machine"]
    assert machine["backend"] == jax.default_backend() and machine["jax"] == jax.__version__
    assert machine["cores"] >= 1 and machine["cpu"]
    assert machine["compiler_options"] == step.compiler_options(jax.default_backend())
    assert quick_run["settings"]["repeats"] == 3


def test_figures_are_finite_and_positive(quick_run):
    for rec in quick_run["records"]:
        if rec["value"] is None:
            # Only the torch peer may be skipped, and only with the reason.
            assert rec["figure"] == "step_ratio_manual_over_torch" and "torch" in rec["skipped"]
            assert peers.torch_reason() is not None
            continue
        assert math.isfinite(rec["value"]) and rec["value"] >= 0, rec
        if not rec["figure"].startswith(("gradient_difference", "relu_flips")):
            assert rec["value"] > 0, rec
        if "goal" in rec:
            assert isinstance(rec["meets_goal"], bool)


def test_gradients_agree_and_counts_are_the_models(quick_run):
    values = {(r["model"], r["figure"]): r["value"] for r in quick_run["records"]}
    # float32 round-off of a 2-layer MLP and a 4-layer CNN, summed over a batch of 32: no ReLU input
    # of the MLP lies within rounding of 0 here, so no mask flips and the difference is round-off.
    assert values["digits_mlp", "relu_flips_numpy_vs_manual"] == 0
    for key, value in values.items():
        if key[1].startswith("gradient_difference"):
            assert value < 1e-5, key
    # 64-128-10 at batch 32: the first layer's input gets no gradient.
    assert values["digits_mlp", "step_flops"] == 4 * 32 * 64 * 128 + 6 * 32 * 128 * 10
    # 8x8x1 → conv 3x3x16 (SAME) → conv 3x3x32 stride 2 (4x4) → dense 64 → dense 10, batch 32.
    assert values["digits_cnn", "step_flops"] == 32 * (
        4 * 64 * 16 * 9 + 6 * 16 * 32 * 9 * 16 + 6 * 64 * 512 + 6 * 10 * 64
    )
    # Remark 8: the hand rules keep F_k only; jax.grad of the references keeps more.
    for model in ("digits_mlp", "digits_cnn"):
        assert values[model, "residual_ratio_manual_over_jax_grad"] < 1
    check = next(r for r in quick_run["records"] if r["figure"] == "check_seconds_float64")
    assert check["passed"] and check["rules"] == "relu"


@pytest.mark.parametrize("peer", ["numpy", "torch"])
def test_peers_take_the_same_adam_steps_as_the_jitted_step(peer):
    if peer == "torch" and peers.torch_reason() is not None:
        pytest.skip(f"the PyTorch peer cannot run here: {peers.torch_reason()}")
    params, x, labels = models.inputs(models.MODELS["digits_mlp"], 1)
    weights = [(np.asarray(w), np.asarray(b)) for w, b in peers.dense_weights(params)]
    tx = optax.adam(models.LEARNING_RATE)
    net = layers.mlp(10, (128,))
    jitted = step.make_step(step.loss_fn(net, "manual"), tx)
    state = (params, tx.init(params), net.init_state(params))
    for _ in range(3):
        *state, _, _, _ = jitted(*state, x, labels, models.KEY)  # loss, correct, finite
    expected = [a for pair in peers.dense_weights(state[0]) for a in map(np.asarray, pair)]
    if peer == "torch":
        model = peers.TorchMLP(weights, models.LEARNING_RATE)
        inputs = model.inputs(np.asarray(x), np.asarray(labels))
    else:
        model = peers.NumpyMLP(weights, models.LEARNING_RATE)
        inputs = (np.asarray(x), np.asarray(labels))
    for _ in range(3):
        model.step(*inputs)
    got = [p.detach().numpy() for p in model.params] if peer == "torch" else [a for pair in model.weights for a in pair]
    # Adam moves each weight by about lr = 3e-3 per step; float32 round-off stays far below 1e-5.
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


def test_the_cnn_peer_takes_the_same_adam_steps_as_the_jitted_step():
    """PyTorch's nn.Conv2d/BatchNorm2d/Linear with autograd, on a digits CNN with batch norm (XLA's
    asymmetric SAME padding of the stride-2 conv, the flatten order, no bias before the norms)."""
    if peers.torch_reason() is not None:
        pytest.skip(f"the PyTorch peer cannot run here: {peers.torch_reason()}")
    net = layers.cnn(10, norm=layers.BatchNorm())
    params, x, labels = models.inputs(models.Model("", lambda: net, (8, 8, 1), 8, False), 1)
    tx = optax.adam(models.LEARNING_RATE)
    jitted = step.make_step(step.loss_fn(net, "manual"), tx)
    model = peers.TorchCNN(net.layers, params, (8, 8, 1), models.LEARNING_RATE)
    inputs = model.inputs(np.asarray(x), np.asarray(labels))
    grads = jax.grad(lambda p: layers.classifier_loss(net, p, x, labels, train=True, key=models.KEY)[0])(params)
    # float32 round-off of two implementations of the same sums, batch of 8.
    assert relative_l2(model.gradients(*inputs)[1], grads) < 1e-5
    state = (params, tx.init(params), net.init_state(params))
    for _ in range(3):
        *state, _, _, _ = jitted(*state, x, labels, models.KEY)
        model.step(*inputs)
    got = {name: p.detach().numpy() for name, p in model.model.named_parameters()}
    conv = next(name for name in got if name.endswith("weight") and got[name].ndim == 4)
    np.testing.assert_allclose(got[conv], np.asarray(state[0][0]["w"]).transpose(3, 2, 0, 1), atol=1e-5, rtol=0)
    # Adam moves each weight by about lr = 3e-3 per step; float32 round-off stays far below 1e-5.
    last = next(name for name in reversed(list(got)) if name.endswith("weight"))
    np.testing.assert_allclose(got[last], np.asarray(state[0][-1]["w"]).T, atol=1e-5, rtol=0)


def test_a_relu_input_on_the_other_side_of_zero_is_counted_and_is_the_gradient_difference():
    """A peer whose pre-activation rounds to the other sign of 0 drops one
    sample's contribution through that unit — a difference far above round-off, which the bench
    explains with ``relu_flips``. Here bias ``b_j`` puts sample 0's unit ``j`` at ``a = ±1e-5``
    (20 float32 ulps of the ``a`` it replaces, so no rounding undoes it)."""
    params, x, labels = models.inputs(models.MODELS["digits_mlp"], 1)
    net = layers.mlp(10, (128,))
    a = np.asarray(x).reshape(32, -1) @ np.asarray(params[1]["w"])
    j = int(np.argmin(np.abs(a[0])))
    shifted = [dict(p) if isinstance(p, dict) else p for p in params]
    shifted[1]["b"] = params[1]["b"].at[j].set(-a[0, j] - 1e-5)
    weights = [(np.array(w), np.array(b)) for w, b in peers.dense_weights(shifted)]
    weights[0][1][j] += 2e-5  # the peer's a[0, j] ≈ +1e-5, the hand rules' ≈ −1e-5
    peer = peers.NumpyMLP(weights, models.LEARNING_RATE)
    manual = bench.relu_masks(net, shifted, x)
    assert bench.relu_flips(peer.masks(np.asarray(x)), manual) == 1
    grads = jax.grad(lambda p: layers.classifier_loss(net, p, x, labels)[0])(shifted)
    difference = relative_l2(peer.gradients(np.asarray(x), np.asarray(labels))[1], peers.dense_weights(grads))
    assert difference > 1e-4  # one of 32 samples' paths through one of 128 units: far above round-off (1e-7)


def test_table_shows_every_record(quick_run):
    text = report.table(quick_run)
    assert all(rec["figure"] in text for rec in quick_run["records"])
    assert quick_run["machine"]["cpu"] in text


def test_bench_rejects_unknown_model(capsys):
    assert cli.main(["bench", "--models", "mlp_1024,resnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("manualgrad bench: --models: unknown model(s) resnet") and "\n" not in err


def test_comparisons_script_runs_the_same_bench(capsys):
    script = pathlib.Path(__file__).resolve().parents[2] / "comparisons" / "performance.py"
    result = runpy.run_path(str(script))["main"](
        [
            "--models",
            "digits_mlp",
            "--repeats",
            "1",
            "--compile-repeats",
            "1",
            "--no-peers",
            "--no-check",
            "--matmul-size",
            "64",
        ]
    )
    assert result["settings"]["models"] == ["digits_mlp"]
    assert {r["figure"] for r in result["records"]} >= {
        "step_ratio_manual_over_jax_grad",
        "flops_fraction_manual_of_matmul",
    }
    assert "step_ratio_manual_over_jax_grad" in capsys.readouterr().out


def test_a_model_with_batch_norm_is_benched_with_its_norms_residuals(monkeypatch):
    """bn_cnn's figures on a small stand-in (digits CNN with batch norm, batch 8): every per-model
    figure, and the norm layers' residuals: the hand rule keeps x̂ and 1/σ per channel, exactly."""
    model = models.Model(
        "digits CNN with batch norm", lambda: layers.cnn(10, norm=layers.BatchNorm()), (8, 8, 1), 8, False
    )
    monkeypatch.setitem(models.MODELS, "tiny_bn", model)
    values = _measured(bench.bench_model("tiny_bn", bench.QUICK))
    assert PER_MODEL <= set(values)
    assert all(math.isfinite(v) and v >= 0 for v in values.values())
    assert values["gradient_difference_jax_grad_vs_manual"] < 1e-5  # float32 round-off, batch of 8
    # x̂ of (8, 8, 8, 16), (8, 4, 4, 32) and (8, 64), and 1/σ with its channel axis, in float32
    expected = 4 * sum(n * c + c for n, c in ((8 * 8 * 8, 16), (8 * 4 * 4, 32), (8, 64)))
    assert values["norm_residual_bytes_manual"] == expected
    assert values["norm_residual_ratio_manual_over_jax_grad"] < 1
    assert ("step_ratio_manual_over_torch" in values) == (peers.torch_reason() is None)  # else skipped, saying why
    assert norm_residual_bytes(layers.cnn(10), *models.inputs(models.MODELS["digits_cnn"], 0)[:2]) is None


def test_a_sequence_model_is_benched_with_its_attentions_residuals(monkeypatch):
    """gpt and gpt_long's figures on a small stand-in (a GPT of width 16, 2 heads, T = 8, batch 4): every
    per-model figure, and one attention's residuals: the hand rule keeps the output and the per-row
    log-sum-exp beyond q, k, v, exactly, where jax.grad keeps T × S probabilities."""
    from manualgrad.nn import gpt

    model = models.Model("tiny GPT", lambda: gpt.gpt(7, 8, width=16, depth=1, heads=2), (8,), 4, False, 7, 2)
    monkeypatch.setitem(models.MODELS, "tiny_gpt", model)
    values = _measured(bench.bench_model("tiny_gpt", bench.QUICK))
    torch = PER_TORCH | PER_ATTENTION_TORCH if peers.torch_reason() is None else set()
    assert PER_SEQUENCE_MODEL | PER_ATTENTION | torch <= set(values)
    assert all(math.isfinite(v) and v >= 0 for v in values.values())
    for peer in ("jax_grad", "torch"):  # float32 round-off, 32 tokens
        assert values.get(f"gradient_difference_{peer}_vs_manual", 0) < 1e-5
    assert values["attention_residual_bytes_manual"] == 4 * (4 * 8 * 2 * 8 + 4 * 2 * 8)  # O (B, T, N, H), lse (B, N, T)
    assert values["attention_residual_ratio_manual_over_jax_grad"] < 1
    assert report.GOALS["gpt_long/residual_ratio_manual_over_jax_grad"] == ("<=", 0.5)


def test_the_character_lstm_is_benched_as_a_sequence_model(monkeypatch):
    """lstm's figures on a small stand-in (H = 8, E = 4, T = 5, batch 4): every per-model figure, the hand
    BPTT's gradient equal to jax.grad of the reference's scan, no attention figures; and the real entry
    is train's default character LSTM at its default batch."""
    model = models.Model("tiny character LSTM", lambda: recurrent.char_model("lstm", 27, 8, 4), (5,), 4, False, 27)
    monkeypatch.setitem(models.MODELS, "tiny_lstm", model)
    values = _measured(bench.bench_model("tiny_lstm", bench.QUICK))
    assert PER_SEQUENCE_MODEL | (PER_TORCH if peers.torch_reason() is None else set()) <= set(values)
    assert not any(f.startswith("attention_") for f in values)
    assert all(math.isfinite(v) and v >= 0 for v in values.values())
    for peer in ("jax_grad", "torch"):  # float32 round-off over 5 steps, batch 4
        assert values.get(f"gradient_difference_{peer}_vs_manual", 0) < 1e-5
    default = models.MODELS["lstm"]
    params = jax.eval_shape(lambda: default.build().init(jax.random.PRNGKey(0), (-1, *default.input_shape))[1])
    width = recurrent.DEFAULTS["lstm"].width
    assert params["recurrent"]["w_h"].shape == (width, 4 * width)
    assert (default.batch, default.vocab) == (MODEL_DEFAULTS["lstm"]["batch_size"], 27)


def test_the_bench_gpt_is_train_s_default_gpt():
    """The bench writes its models' shapes itself; the one it describes as train's default GPT is it."""
    default = models.MODELS["gpt"]
    params = jax.eval_shape(lambda: default.build().init(jax.random.PRNGKey(0), (-1, *default.input_shape))[1])
    assert params["blocks"][0]["q"]["w"].shape == (GPT["width"], GPT["width"])
    assert (len(params["blocks"]), default.heads) == (GPT["depth"], GPT["heads"])
    assert (default.batch, default.vocab) == (MODEL_DEFAULTS["gpt"]["batch_size"], 27)


def test_without_pytorch_its_figures_are_skipped_with_the_extra_that_installs_it(monkeypatch):
    """A machine without PyTorch (the ``test`` extra does not install it): the PyTorch peer's figure
    is reported as skipped with the reason, naming the extra; every other figure is measured."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as where it is not installed
    reason = "the PyTorch peer needs torch: pip install 'manualgrad[bench]'"
    assert peers.torch_reason() == reason and peers.torch_version() is None
    with pytest.raises(MissingExtraError, match=re.escape(reason)):
        peers.TorchMLP([(np.ones((2, 2)), np.ones(2))], models.LEARNING_RATE)
    records = bench.bench_model("digits_mlp", bench.QUICK)
    assert {r["figure"]: r["skipped"] for r in records if r["value"] is None} == {
        "step_ratio_manual_over_torch": reason
    }
    assert PER_MODEL | PER_MLP <= set(_measured(records))
    assert not {"torch_threads", "gradient_difference_torch_vs_manual"} & {r["figure"] for r in records}
