"""The Gradescope autograder bundle, unpacked into a temporary root as Gradescope lays it out
(``source/``, ``submission/``, ``results/``) and run there, with manualgrad installed from the
bundle's own wheel (offline, without its dependencies, which this machine has)."""

import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest
import test_networks  # its right solutions (pytest puts this folder on the path)

from manualgrad import cli
from manualgrad.teach import autograder, exercise, networks

RIGHT = "    return (g * (residuals > 0),)\n"
WRONG = "    return (g * residuals,)\n"


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """``(root, site)``: the bundle for relu, 12 points, unpacked into root/source; its wheel installed in site."""
    folder = tmp_path_factory.mktemp("autograder")
    weights = folder / "weights.json"
    weights.write_text('{"relu": 12}')
    bundle = folder / "autograder.zip"
    assert cli.main(["autograder", "relu", "--out", str(bundle), "--weights", str(weights), "--timeout", "120"]) == 0
    root = folder / "root"
    with zipfile.ZipFile(bundle) as z:
        z.extractall(root / "source")
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
    assert modes["run_autograder"] & stat.S_IXUSR and modes["setup.sh"] & stat.S_IXUSR
    for name in ("run_autograder", "setup.sh"):  # extractall drops the modes, as Gradescope does not
        (root / "source" / name).chmod(0o755)
    (wheel,) = (root / "source").glob("manualgrad-*-py3-none-any.whl")
    site = folder / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
    )
    return root, site


def test_the_bundle_holds_setup_run_weights_and_a_wheel_of_this_manualgrad(unpacked):
    root, site = unpacked
    names = sorted(p.name for p in (root / "source").iterdir())
    assert names == ["manualgrad-0.1.0-py3-none-any.whl", "run_autograder", "setup.sh", "weights.json"]
    assert "pip install ./manualgrad-0.1.0-py3-none-any.whl" in (root / "source" / "setup.sh").read_text()
    installed = site / "manualgrad" / "teach" / "autograder.py"
    assert installed.read_text() == open(autograder.__file__).read()
    metadata = next(site.glob("manualgrad-0.1.0.dist-info")) / "METADATA"
    assert "Requires-Dist: nbformat>=5.7" in metadata.read_text().splitlines()


@pytest.mark.parametrize("body, score", [(RIGHT, 12.0), (WRONG, 2.0)])
def test_run_autograder_grades_a_submission_into_results_json(unpacked, body, score):
    root, site = unpacked
    submission = root / "submission"
    submission.mkdir(exist_ok=True)
    for old in submission.iterdir():
        old.unlink()
    text = exercise.exercise("relu")
    (submission / "relu_exercise.py").write_text(text[: text.index("    raise NotImplementedError(")] + body)
    (submission / "notes.txt").write_text("not graded")
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHONPATH": str(site)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    done = subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    assert results["score"] == pytest.approx(score), results["output"]
    assert [t["name"] for t in results["tests"]][:2] == ["relu: forward", "relu: vjp"]
    assert sum(t["max_score"] for t in results["tests"]) == pytest.approx(12.0)
    assert "grading your backward for relu (relu_exercise.py)" in results["output"]
    if score < 12:
        assert [t["status"] for t in results["tests"]] == ["passed"] + ["failed"] * 5
        assert "first failure: relu, argument z" in results["output"]


def test_autograder_command_refuses_an_existing_bundle_and_unknown_rules(tmp_path, capsys):
    out = tmp_path / "a.zip"
    out.write_text("mine")
    assert cli.main(["autograder", "relu", "--out", str(out)]) == 2
    assert "exists; remove it" in capsys.readouterr().err and out.read_text() == "mine"
    assert cli.main(["autograder", "relux", "--out", str(tmp_path / "b.zip")]) == 2
    assert "unknown rule relux" in capsys.readouterr().err


def test_a_network_bundle_grades_one_test_per_gradient(unpacked, tmp_path):
    """``autograder --network seed003``: its run_autograder (with the wheel installed above) grades a
    submission whose dW takes one of W's two paths: every gradient but dW passes."""
    _, site = unpacked
    bundle = tmp_path / "network.zip"
    assert cli.main(["autograder", "--network", "seed003", "--out", str(bundle), "--timeout", "120"]) == 0
    root = tmp_path / "root"
    with zipfile.ZipFile(bundle) as z:
        z.extractall(root / "source")
    run = root / "source" / "run_autograder"
    assert "--expect seed003 --format gradescope" in run.read_text()
    (root / "submission").mkdir()
    body = test_networks.SEED003.replace("dW = jnp.outer(dz0, x) + dZ3", "dW = dZ3")
    (root / "submission" / "mine.py").write_text(test_networks._solved("seed003", body))
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHONPATH": str(site)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    done = subprocess.run(["bash", str(run)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads((root / "results" / "results.json").read_text())
    assert [t["name"] for t in results["tests"]] == [f"seed003: d{n}" for n in networks.order(networks.SEED003)]
    assert results["score"] == 9.0 and results["tests"][-1]["status"] == "failed"
    assert "the path through Z₃ = W + V alone" in results["tests"][-1]["output"]


def test_autograder_command_needs_an_exercise(tmp_path, capsys):
    assert cli.main(["autograder", "--out", str(tmp_path / "a.zip")]) == 2
    assert "give the RULEs (or --network NAME)" in capsys.readouterr().err
    assert cli.main(["autograder", "--network", "resnet", "--out", str(tmp_path / "a.zip")]) == 2
    assert "unknown network resnet" in capsys.readouterr().err and not (tmp_path / "a.zip").exists()
