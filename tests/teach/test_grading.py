"""Grading many submissions: a process each with a time limit, the summary, the points and the
Gradescope, JSON and JUnit documents. The submissions are relu exercises (the cheapest rule to grade)."""

import json
import xml.etree.ElementTree as ET

import pytest

from manualgrad import cli
from manualgrad.teach import exercise, grading, results

RIGHT = "    return (g * (residuals > 0),)\n"
WRONG = "    return (g * residuals,)\n"  # the output for the indicator: right only where relu(z) is 0 or 1


def _write(path, body):
    text = exercise.exercise("relu")
    path.write_text(text[: text.index("    raise NotImplementedError(")] + body)
    return path


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Each kind of submission graded once, each in its own process."""
    folder = tmp_path_factory.mktemp("submissions")
    right, wrong = _write(folder / "right.py", RIGHT), _write(folder / "wrong.py", WRONG)
    looping = _write(folder / "looping.py", RIGHT)
    looping.write_text(looping.read_text() + "\nwhile True:\n    pass\n")
    crashing = _write(folder / "crashing.py", RIGHT)
    crashing.write_text(crashing.read_text() + "\nimport os\nos._exit(3)\n")
    plain = folder / "plain.py"
    plain.write_text("print('hello')\n")
    out = {name: grading.grade_isolated(path, "float64", 600) for name, path in [("right", right), ("wrong", wrong)]}
    out["looping"] = grading.grade_isolated(looping, "float64", 3)
    out |= {name: grading.grade_isolated(p, "float64", 60) for name, p in [("crashing", crashing), ("plain", plain)]}
    return out


def test_each_submission_gets_a_result_and_the_grader_goes_on(graded):
    assert graded["right"].passed and graded["right"].status == results.GRADED
    assert [r.test for r in graded["right"].rows] == ["forward", "vjp", "finite_diff", "jit", "vmap", "grad_of_grad"]
    wrong = graded["wrong"]
    assert wrong.status == results.GRADED and not wrong.passed
    assert {r.test: r.passed for r in wrong.rows}["forward"] and not {r.test: r.passed for r in wrong.rows}["vjp"]
    assert "score: 1/6 checks passed" in wrong.report
    for name, status, reason in [
        ("looping", results.TIMEOUT, "timed out after 3 s"),
        ("crashing", results.CRASHED, "the grading process exited with status 3 before grading finished"),
    ]:
        result = graded[name]
        assert result.status == status and result.rule == "relu" and not result.passed
        assert len(result.rows) == 6 and all(not r.passed and r.output.startswith(reason) for r in result.rows)
    assert graded["looping"].seconds < 30
    plain = graded["plain"]
    assert plain.status == results.ERROR and plain.rule == "" and "is not an exercise file" in plain.rows[0].output


def test_gradescope_document(graded):
    subs = [graded["right"], graded["wrong"], graded["looping"]]
    doc = results.gradescope(subs, {"relu": 12, "relu: vjp": 3})
    assert set(doc) == {"score", "execution_time", "output", "tests"}
    assert len(doc["tests"]) == 18
    first = doc["tests"][:6]
    assert {t["name"]: t["max_score"] for t in first} == {
        "relu: forward": 2.4,
        "relu: vjp": 3.0,
        "relu: finite_diff": 2.4,
        "relu: jit": 2.4,
        "relu: vmap": 2.4,
        "relu: grad_of_grad": 2.4,
    }
    assert all(set(t) == {"name", "score", "max_score", "status", "output", "visibility"} for t in doc["tests"])
    # right: 15 of 15; wrong: only the forward's 2.4; looping: nothing.
    assert doc["score"] == pytest.approx(15 + 2.4)
    assert [t["status"] for t in doc["tests"][6:8]] == ["passed", "failed"]
    assert doc["execution_time"] == pytest.approx(sum(r.seconds for r in subs), abs=1e-3)


def test_json_document(graded):
    doc = json.loads(results.document([graded["right"], graded["wrong"]], "json", {}, "float64"))
    assert doc["schema"] == results.SCHEMA and doc["passed"] is False
    assert (doc["score"], doc["max_score"]) == (7.0, 12.0)
    right, wrong = doc["submissions"]
    assert right["passed"] and right["status"] == "graded" and right["score"] == right["max_score"] == 6.0
    assert wrong["tests"][1] == {
        "name": "relu: vjp",
        "group": "relu",
        "test": "vjp",
        "passed": False,
        "score": 0.0,
        "max_score": 1.0,
        "output": wrong["tests"][1]["output"],
    }
    assert wrong["tests"][1]["output"].startswith("fails on")


def test_junit_document(graded):
    subs = [graded["right"], graded["wrong"], graded["crashing"]]
    root = ET.fromstring(results.junit(subs))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("18", "5", "6")
    suites = root.findall("testsuite")
    assert [s.get("failures") for s in suites] == ["0", "5", "0"] and suites[2].get("errors") == "6"
    vjp = suites[1].find("testcase[@name='vjp']")
    assert vjp.get("classname") == "relu" and vjp.find("failure") is not None
    assert suites[0].find("testcase/failure") is None and "score: 6/6" in suites[0].find("system-out").text


def test_points_of_rows():
    rows = tuple(results.Row("relu", c, True, "") for c in ("forward", "vjp", "jit"))
    result = results.Result("f.py", "relu", results.GRADED, rows, "", 0.0)
    assert results.points(result, {}) == [1.0, 1.0, 1.0]
    assert results.points(result, {"relu": 6}) == [2.0, 2.0, 2.0]
    assert results.points(result, {"relu": 6, "relu: jit": 0.5}) == [3.0, 3.0, 0.5]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "is not JSON"),
        ('["relu"]', "must be one JSON object of names to points ≥ 0"),
        ('{"relu": -1}', "must be one JSON object"),
        ('{"relu": true}', "must be one JSON object"),
    ],
)
def test_bad_weights_are_one_sentence(text, message, tmp_path):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(results.WeightsError, match=message):
        results.load_weights(path)


def test_grade_command_many_files_summary_and_document(tmp_path, capsys):
    right, wrong = _write(tmp_path / "right.py", RIGHT), _write(tmp_path / "wrong.py", WRONG)
    out = tmp_path / "results.json"
    argv = ["grade", "--in-process", str(right), str(wrong), "--format", "gradescope", "--out", str(out)]
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    summary = printed[printed.index("file ") :].splitlines()
    assert summary[0].split() == ["file", "rule", "score", "seconds", "status"]
    assert summary[1].split()[:3] == [str(right), "relu", "6/6"] and summary[1].split()[-1] == "passed"
    assert summary[2].split()[:3] == [str(wrong), "relu", "1/6"] and summary[2].split()[-1] == "failed"
    assert summary[3] == "1 of 2 submissions passed every test" and f"wrote {out} (gradescope)" in printed
    assert json.loads(out.read_text())["score"] == 7.0
    assert cli.main(argv) == 2  # the document is there: never overwritten
    assert "exists; remove it" in capsys.readouterr().err


def test_grade_command_expects_rules_and_fails_the_missing(tmp_path, capsys):
    plain = tmp_path / "notes.py"
    plain.write_text("x = 1\n")
    out = tmp_path / "results.xml"
    assert cli.main(["grade", "--expect", "relu", "--format", "junit", "--out", str(out), str(plain)]) == 1
    printed = capsys.readouterr().out
    assert f"ignored {plain}: not an exercise for relu" in printed
    root = ET.fromstring(out.read_text())
    assert root.get("errors") == "6" and "no file is for relu" in root.find("testsuite/testcase/error").text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grade"], "give the FILEs to grade"),
        (["grade", "x.py", "--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),
        (["grade", "x.py", "--in-process", "--timeout", "5"], "give --timeout or --in-process, not both"),
        (["grade", "x.py", "--out", "r.json"], "--out writes a document: give --format"),
        (["grade", "x.py", "--expect", "relux"], "unknown rule relux"),
    ],
)
def test_grade_command_bad_input_is_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_grade_command_refuses_weights_that_name_nothing(tmp_path, capsys):
    weights = tmp_path / "w.json"
    weights.write_text('{"relu": 3, "rellu": 1, "relu: vpj": 2}')
    assert cli.main(["grade", "x.py", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "--weights: 'rellu', 'relu: vpj' name no rule, network or test of one (RULE: CHECK, NETWORK: dNAME)" in err


def test_grade_command_in_its_own_process_says_why_a_file_cannot_be_graded(tmp_path, capsys):
    plain = tmp_path / "plain.py"
    plain.write_text("print('hello')\n")
    assert cli.main(["grade", str(plain)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"manualgrad grade: {plain} is not an exercise file (its first line must be "
        f"'{exercise.HEADER}RULE' or '{exercise.HEADER}network NAME'; write one with `manualgrad exercise RULE` "
        "or `manualgrad exercise --network NAME`)\n"
    )
