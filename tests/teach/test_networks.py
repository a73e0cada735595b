"""Whole-network exercises: for each network a right solution, derived by hand, grades every
gradient exact or close; a planted mistake fails at its gradient, with its diagnosis, and every
gradient before it in backward order stays right; the rows feed the formats; the notebooks validate."""

import json
import re
import xml.etree.ElementTree as ET

import nbformat
import numpy as np
import pytest

from manualgrad import cli, registry
from manualgrad.teach import exercise, grading, networks, notebook, results
from manualgrad.train import data

# Right solutions, derived by hand: the body of backward that replaces its `dNAME = None` lines.
SEED001 = """    da2 = a2 - y
    dz2 = da2 * a2 * (1 - a2)
    dw4 = dz2 * a0
    da0 = dz2 * w4
    dw5 = dz2 * a1
    da1 = dz2 * w5
    db2 = dz2
    dz1 = da1 * a1 * (1 - a1)
    dw2 = dz1 * x0
    dw3 = dz1 * x1
    db1 = dz1
    dz0 = da0 * a0 * (1 - a0)
    dw0 = dz0 * x0
    dw1 = dz0 * x1
    db0 = dz0
"""
SEED003 = """    dc = z5
    dz5 = c
    dz4 = dz5 * z5 * (1 - z5)
    dZ3 = jnp.outer(dz4, z2)
    dz2 = Z3.T @ dz4
    dV = dZ3
    dz1 = dz2 * (1 - z2**2)
    dz0 = dz1
    db = dz1
    dW = jnp.outer(dz0, x) + dZ3
"""
MLP_BN = """    dlogprobs = jnp.zeros_like(logprobs).at[jnp.arange(n), Yb].set(-1.0 / n)
    dprobs = dlogprobs / probs
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdims=True)
    dcounts_sum = -(counts_sum**-2) * dcounts_sum_inv
    dcounts = counts_sum_inv * dprobs + jnp.ones_like(counts) * dcounts_sum
    dnorm_logits = counts * dcounts
    dlogit_maxes = -dnorm_logits.sum(1, keepdims=True)
    dlogits = dnorm_logits + jax.nn.one_hot(logits.argmax(1), logits.shape[1], dtype=logits.dtype) * dlogit_maxes
    dh = dlogits @ W2.T
    dW2 = h.T @ dlogits
    db2 = dlogits.sum(0)
    dhpreact = (1.0 - h**2) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdims=True)
    dbnraw = bngain * dhpreact
    dbnbias = dhpreact.sum(0, keepdims=True)
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdims=True)
    dbnvar = -0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv
    dbndiff2 = 1.0 / (n - 1) * jnp.ones_like(bndiff2) * dbnvar
    dbndiff = bnvar_inv * dbnraw + 2 * bndiff * dbndiff2
    dbnmeani = -dbndiff.sum(0, keepdims=True)
    dhprebn = dbndiff + 1.0 / n * jnp.ones_like(hprebn) * dbnmeani
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)
    demb = dembcat.reshape(emb.shape)
    dC = jnp.zeros_like(C).at[Xb].add(demb)
"""
GPT_BLOCK = """    dout = 2 * (out - target) / out.size
    dmlp = dout
    dact = dmlp @ W2.T
    dW2 = act.T @ dmlp
    dc2 = dmlp.sum(0)
    cdf = 0.5 * (1 + jax.scipy.special.erf(hid / jnp.sqrt(2.0)))
    dhid = dact * (cdf + hid * jnp.exp(-0.5 * hid**2) / jnp.sqrt(2 * jnp.pi))
    dln2 = dhid @ W1.T
    dW1 = ln2.T @ dhid
    dc1 = dhid.sum(0)
    dxhat2 = dln2 * g2
    dg2 = (dln2 * xhat2).sum(0)
    dbe2 = dln2.sum(0)
    drstd2 = (dxhat2 * xc2).sum(-1, keepdims=True)
    dvar2 = -0.5 * (var2 + 1e-5) ** -1.5 * drstd2
    dxc2 = dxhat2 * rstd2 + 2 * xc2 / xc2.shape[-1] * dvar2
    dmu2 = -dxc2.sum(-1, keepdims=True)
    dx1 = dout + dxc2 + dmu2 / x1.shape[-1]
    dattn = dx1
    dy = dattn @ Wo.T
    dWo = y.T @ dattn
    datt = dy @ v.T
    dv = att.T @ dy
    dmasked = att * (datt - (datt * att).sum(-1, keepdims=True))
    dscores = jnp.where(mask, dmasked, 0.0)
    dq = dscores @ k * scale
    dk = dscores.T @ q * scale
    dWv = ln1.T @ dv
    dWk = ln1.T @ dk
    dln1 = dq @ Wq.T + dk @ Wk.T + dv @ Wv.T
    dWq = ln1.T @ dq
    dxhat1 = dln1 * g1
    dg1 = (dln1 * xhat1).sum(0)
    dbe1 = dln1.sum(0)
    drstd1 = (dxhat1 * xc1).sum(-1, keepdims=True)
    dvar1 = -0.5 * (var1 + 1e-5) ** -1.5 * drstd1
    dxc1 = dxhat1 * rstd1 + 2 * xc1 / xc1.shape[-1] * dvar1
    dmu1 = -dxc1.sum(-1, keepdims=True)
    dx = dx1 + dxc1 + dmu1 / x.shape[-1]
"""
RIGHT = {"seed001": SEED001, "seed003": SEED003, "mlp_bn": MLP_BN, "gpt_block": GPT_BLOCK}
# (network, the right line, the planted wrong one, the gradient it breaks, its diagnosis)
PLANTED = [
    ("seed001", "dw0 = dz0 * x0", "dw0 = dz0 * a0", "w0", "∂L/∂z₀ · a₀: the seed's typo"),
    ("seed001", "dz1 = da1 * a1 * (1 - a1)", "dz1 = dz2 * w4 * a1 * (1 - a1)", "z1", "through w₅"),
    ("seed003", "dW = jnp.outer(dz0, x) + dZ3", "dW = dZ3", "W", "the path through Z₃ = W + V alone"),
    ("mlp_bn", "1.0 / (n - 1) * jnp.ones_like(bndiff2)", "1.0 / n * jnp.ones_like(bndiff2)", "bndiff2", "Bessel"),
    ("mlp_bn", "db2 = dlogits.sum(0)", "db2 = dlogits", "b2", "with axis 0 not summed"),
    (
        "mlp_bn",
        "dlogprobs = jnp.zeros_like(logprobs).at[jnp.arange(n), Yb].set(-1.0 / n)",
        "dlogprobs = jnp.zeros_like(logprobs).at[jnp.arange(n), Yb].set(-1.0)",
        "logprobs",
        "a missing mean over the batch (1/16)",
    ),
    ("gpt_block", "dWo = y.T @ dattn", "dWo = dattn.T @ y", "Wo", "the right one transposed"),
    ("gpt_block", "dv = att.T @ dy", "dv = -(att.T @ dy)", "v", "the sign flipped"),
]


def _solved(name, body):
    """Network ``name``'s exercise text with its `dNAME = None` lines replaced by ``body``."""
    lines = networks.exercise_text(name).splitlines(keepends=True)
    blanks = [i for i, line in enumerate(lines) if re.match(r"    d\w+ = None  # ", line)]
    assert len(blanks) == len(networks.order(networks.network(name)))
    return "".join(lines[: blanks[0]] + [body] + lines[blanks[-1] + 1 :])


def _write(tmp_path, name, body, file=None):
    path = tmp_path / (file or f"{name}_exercise.py")
    path.write_text(_solved(name, body))
    return path


def _table(report):
    """The graded lines of a report: ``{dNAME: (exact, close, max abs diff)}``, in the report's order."""
    out = {}
    for line in report.splitlines():
        cells = line.split()
        if line.startswith("  d") and len(cells) >= 4 and cells[1] in ("yes", "no"):
            out[cells[0]] = tuple(cells[1:4])
    return out


def test_mlp_bn_grades_on_contexts_drawn_from_the_words_dataset():
    """The batch written out in networks.CONTEXTS is the one draw_batch draws from --dataset words."""
    if not data.WORDS.is_file():
        pytest.skip(f"no word list at {data.WORDS} (apt install wamerican): mlp_bn's batch cannot be drawn again")
    assert networks.draw_batch(data.load_sequences("words")) == networks.CONTEXTS
    values = networks.inputs(networks.network("mlp_bn"))
    assert ["".join(networks.VOCAB[i] for i in row) for row in values["Xb"]] == [c for c, _, _ in networks.CONTEXTS]
    assert "".join(networks.VOCAB[i] for i in values["Yb"]) == "".join(y for _, y, _ in networks.CONTEXTS)


def test_the_networks_are_well_formed():
    rules = {r.name for r in registry.rules()}
    assert set(networks.NETWORKS) == {"seed001", "seed003", "mlp_bn", "gpt_block"} and not rules & set(
        networks.NETWORKS
    )
    for net in networks.NETWORKS.values():
        known = set(net.inputs())
        for step in net.steps:
            assert set(step.operands) <= known, (net.name, step.name)
            known.add(step.name)
        assert len(known) == len(net.inputs()) + len(net.steps) and set(net.params) <= set(net.inputs())
    assert len(networks.order(networks.MLP_BN)) == 26  # the classic exercise's 26 gradients
    assert len(networks.order(networks.SEED001)) == 15  # 6 intermediates, the 6 weights and 3 biases


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_floating_value_and_gradient_is_in_the_dtype_graded(dtype):
    for name in networks.NETWORKS:
        vals, grads = networks.reference(name, dtype)
        arrays = {k: v for k, v in {**vals, **grads}.items() if hasattr(v, "dtype")}  # not the Python constants
        floating = {k: v.dtype for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)}
        assert set(floating.values()) == {np.dtype(dtype)}, (name, floating)


def test_backward_order_completes_each_gradient_before_it_is_needed():
    assert networks.order(networks.MLP_BN)[:12] == [
        "logprobs",
        "probs",
        "counts_sum_inv",
        "counts_sum",
        "counts",
        "norm_logits",
        "logit_maxes",
        "logits",
        "h",
        "W2",
        "b2",
        "hpreact",
    ]
    assert networks.order(networks.SEED003) == ["c", "z5", "z4", "Z3", "z2", "V", "z1", "z0", "b", "W"]
    for net in networks.NETWORKS.values():
        done = {net.loss}
        for name in networks.order(net):
            assert {s.name for s in networks.users(net, name)} <= done, (net.name, name)
            done.add(name)


def test_the_reference_is_jax_vjp_of_the_forward():
    """Against an independent derivative: central finite differences of the forward in float64
    (step 1e-6: the truncation error is ~1e-12 × the third derivative, the round-off ~1e-10)."""
    net = networks.SEED001
    vals, grads = networks.reference("seed001", "float64")
    given = {k: v for k, v in vals.items() if k in net.inputs()}
    for p in net.params:
        up, down = (networks.run(net, {**given, p: given[p] + h})[net.loss] for h in (1e-6, -1e-6))
        assert float(grads[p]) == pytest.approx((float(up) - float(down)) / 2e-6, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", list(RIGHT))
def test_a_right_solution_grades_every_gradient_exact_or_close(name, tmp_path, capsys):
    path = _write(tmp_path, name, RIGHT[name])
    assert cli.main(["grade", "--in-process", str(path)]) == 0
    out = capsys.readouterr().out
    table = _table(out)
    order = [f"d{n}" for n in networks.order(networks.network(name))]
    assert list(table) == order and all(close == "yes" for _, close, _ in table.values()), out
    assert all((exact == "yes") == (diff == "0") for exact, _, diff in table.values()), out
    assert f"score: {len(order)}/{len(order)} gradients right" in out


@pytest.mark.parametrize("name, right, wrong, broken, diagnosis", PLANTED)
def test_a_planted_mistake_fails_at_its_gradient_and_not_before(name, right, wrong, broken, diagnosis, tmp_path):
    assert right in RIGHT[name]
    result = grading.grade_file(_write(tmp_path, name, RIGHT[name].replace(right, wrong)))
    assert result.status == results.GRADED and not result.passed
    tests = [r.test for r in result.rows]
    first = tests.index(f"d{broken}")
    assert all(r.passed for r in result.rows[:first]), result.report
    assert not result.rows[first].passed and diagnosis in result.rows[first].output, result.rows[first].output
    assert f"first wrong: d{broken}, the gradient of {broken}" in result.report


def test_what_cannot_be_graded_fails_its_rows_in_one_sentence(tmp_path):
    (tmp_path / "template.py").write_text(networks.exercise_text("seed003"))
    template = grading.grade_file(tmp_path / "template.py")
    assert template.status == results.GRADED and not any(r.passed for r in template.rows)
    assert (
        template.rows[0].output == "dc is None: not computed yet" and "score: 0/10 gradients right" in template.report
    )
    raising = grading.grade_file(_write(tmp_path, "seed003", SEED003.replace("Z3.T @ dz4", "Z3 @ x[:2]"), "r.py"))
    assert all(not r.passed for r in raising.rows)
    assert re.match(r"not run: your backward raised TypeError at line \d+: ", raising.rows[0].output), raising.rows[0]
    cheat = SEED003 + "    dW = jax.grad(lambda w: 0.0)(W)\n"
    autodiff = grading.grade_file(_write(tmp_path, "seed003", cheat, "cheat.py"))
    assert not any(r.passed for r in autodiff.rows) and "jax.grad (JAX's autodiff)" in autodiff.rows[0].output
    peek = (
        SEED003
        + "    from manualgrad.teach import networks\n    dW = networks.reference('seed003', 'float64')[1]['W']\n"
    )
    peeked = grading.grade_file(_write(tmp_path, "seed003", peek, "peek.py"))
    assert "manualgrad's reference gradients" in peeked.rows[0].output
    unknown = tmp_path / "unknown.py"
    unknown.write_text("# manualgrad exercise: network resnet\n")
    result = grading.grade_file(unknown)
    assert result.status == results.ERROR and "unknown network 'resnet'" in result.rows[0].output


def test_grading_in_its_own_process_and_in_float32(tmp_path):
    """A process of its own does not have the tests' float64 setting: the network still grades in float64."""
    path = _write(tmp_path, "mlp_bn", MLP_BN.replace("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h"))
    result = grading.grade_isolated(path, "float64", 600)
    assert result.status == results.GRADED and result.rule == "mlp_bn" and len(result.rows) == 26
    assert [r.passed for r in result.rows][:11] == [True] * 9 + [False, True]
    assert (
        result.rows[9].output
        == "wrong shape (27, 16), expected (16, 27): your gradient equals the right one transposed"
    )
    single = grading.grade_file(_write(tmp_path, "mlp_bn", MLP_BN, "single.py"), "float32")
    assert single.passed and "float32" in single.report


def test_the_formats_carry_one_test_per_gradient(tmp_path):
    right = grading.grade_file(_write(tmp_path, "seed003", SEED003, "right.py"))
    wrong = grading.grade_file(
        _write(tmp_path, "seed003", SEED003.replace("dW = jnp.outer(dz0, x) + dZ3", "dW = dZ3"), "w.py")
    )
    doc = results.gradescope([wrong], {"seed003": 18, "seed003: dW": 2})
    assert [t["name"] for t in doc["tests"]] == [f"seed003: d{n}" for n in networks.order(networks.SEED003)]
    assert [t["max_score"] for t in doc["tests"]] == [2.0] * 9 + [2.0] and doc["score"] == 18.0
    assert doc["tests"][-1]["status"] == "failed" and "the path through Z₃ = W + V alone" in doc["tests"][-1]["output"]
    mine = json.loads(results.document([right, wrong], "json", {}, "float64"))
    assert [s["rule"] for s in mine["submissions"]] == ["seed003", "seed003"] and mine["score"] == 19.0
    assert mine["submissions"][1]["tests"][0] == {
        "name": "seed003: dc",
        "group": "seed003",
        "test": "dc",
        "passed": True,
        "score": 1.0,
        "max_score": 1.0,
        "output": mine["submissions"][1]["tests"][0]["output"],
    }
    root = ET.fromstring(results.junit([wrong]))
    assert (root.get("tests"), root.get("failures")) == ("10", "1")
    assert root.find("testsuite/testcase[@name='dW']/failure") is not None
    assert root.find("testsuite/testcase[@name='dc']").get("classname") == "seed003"


def test_failed_and_missing_network_submissions_have_a_row_per_gradient():
    missing = grading.missing("gpt_block")
    assert len(missing.rows) == 38 and missing.rows[0].name == "gpt_block: dout"
    assert "write it with `manualgrad exercise --network gpt_block`" in missing.rows[0].output
    assert {"mlp_bn", "mlp_bn: dbndiff2", "seed001: dw0"} <= grading.test_names()


def test_exercise_command_writes_a_network_file_and_a_notebook(tmp_path, capsys):
    out = tmp_path / "net.py"
    assert cli.main(["exercise", "--network", "seed003", "--out", str(out)]) == 0
    assert out.read_text() == networks.exercise_text("seed003") and out.read_text().startswith(
        networks.header("seed003")
    )
    capsys.readouterr()
    for argv, message in [
        (["exercise", "--network", "seed003", "--out", str(out)], "exists"),
        (["exercise", "--network", "resnet"], "unknown network resnet; known: seed001, seed003, mlp_bn, gpt_block"),
        (["exercise", "relu", "--network", "seed003"], "give a RULE or --network NAME (one of them)"),
        (["exercise"], "give a RULE or --network NAME"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    book = tmp_path / "net.ipynb"
    assert cli.main(["exercise", "--network", "mlp_bn", "--notebook", "--out", str(book)]) == 0
    nbformat.validate(nbformat.read(str(book), as_version=4))


@pytest.mark.parametrize("name", list(RIGHT))
def test_every_network_has_a_valid_notebook(name):
    nb = notebook.network_notebook(name)
    nbformat.validate(nb)
    assert [c.metadata[notebook.KEY] for c in nb.cells] == ["derivation", "forward", "backward", "grade"]
    assert nb.metadata[notebook.KEY] == {"network": name, "format": exercise.FORMAT, "version": exercise.version()}
    text = nb.cells[0].source
    assert text.count("$") % 2 == 0 and "```python\n" in text and "`backward`" in text
    assert f"mg.grade_network_here({name!r}, globals())" in nb.cells[-1].source


def test_a_network_notebook_grades_saved_and_in_place(tmp_path, capsys):
    nb = notebook.network_notebook("seed003")
    cell = next(c for c in nb.cells if c.metadata[notebook.KEY] == "backward")
    cell.source = _solved("seed003", SEED003)[_solved("seed003", SEED003).index("def backward(") :]
    saved = tmp_path / "seed003.ipynb"
    nbformat.write(nb, str(saved))
    assert cli.main(["grade", "--in-process", str(saved)]) == 0
    assert "score: 10/10 gradients right" in capsys.readouterr().out
    assert grading.rule_name(saved) == "seed003"
    script = tmp_path / "cells.py"  # the cells run in order, from a file, as IPython's cells can be read
    script.write_text(
        "\n\n".join(c.source for c in nb.cells if c.cell_type == "code").replace(
            "dW = jnp.outer(dz0, x) + dZ3", "dW = dZ3"
        )
        + "\n"
    )
    namespace = {}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    out = capsys.readouterr().out
    assert "grading your backward for network seed003 (this notebook)" in out and "score: 9/10" in out
    assert np.shape(namespace["values"]["W"]) == (4, 4)
