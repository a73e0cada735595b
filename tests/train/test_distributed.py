"""Multi-process data parallelism (``manualgrad.train.distributed``): 2 processes on localhost against one
process on 2 devices, a process killed mid-run, resume through ``manualgrad launch``, the flags' errors.

Tolerance of the comparisons: the two programs are the same SPMD step over a 2-device mesh with the same
global batches; they differ only in who sums the two per-device partial gradients (XLA's in-process
all-reduce or gloo across processes). A sum of two float32 numbers is commutative, so no reduction order
can differ and the runs come out bit-identical. The bound allows a future
collective that splits or re-associates the sum: 1 ulp (2⁻²³) per step in the gradient, carried through
Adam's normalised updates at most linearly over the run's 100 steps, 100 · 1.2e-7 ≈ 1.2e-5 → 5e-5.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from manualgrad import cli
from manualgrad.train import checkpoint, data, distributed, progress

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
RUN = ("--model", "mlp", "--dataset", "xor", "--epochs", "4", "--batch-size", "32", "--cross-check-batches", "0")
TOTAL = 4 * data.steps_per_epoch(800, 32)  # 100 steps: long enough to kill a process mid-run
BOUND = 5e-5  # relative, on every metric and parameter: see the module's docstring
TIMEOUT = 10  # --process-timeout of the runs here (s)


def _manualgrad(*args, env=ENV, **kwargs):
    return [sys.executable, "-m", "manualgrad", *args], dict(env=env, cwd=ROOT, text=True, **kwargs)


def _run(*args, env=ENV):
    command, options = _manualgrad(*args, env=env)
    return subprocess.run(command, capture_output=True, timeout=240, **options)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run in one process on 2 virtual CPU devices: what the 2-process runs must reproduce."""
    out = tmp_path_factory.mktemp("one_process")
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = _run("train", *RUN, "--devices", "2", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert f"({TOTAL} steps on 2 devices of 1 process)" in result.stdout
    return out


def _final(directory):
    """The newest checkpoint's leaves (numpy) and step."""
    newest = checkpoint.checkpoints(directory)[-1]
    with np.load(newest) as archive:
        leaves = {k: archive[k] for k in archive.files if k != "__meta__"}
    return leaves, checkpoint.read_meta(newest)["step"]


def _relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float32).tiny))


def _assert_same_run(received, expected):
    rows, reference = progress.read_metrics(received / "metrics.csv"), progress.read_metrics(expected / "metrics.csv")
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in reference] == list(range(1, 5))
    worst = max(
        _relative(np.float64(r[k]), np.float64(e[k])) for r, e in zip(rows, reference) for k in progress.METRICS
    )
    (got, step), (want, want_step) = _final(received), _final(expected)
    assert step == want_step == TOTAL and set(got) == set(want)
    worst = max([worst] + [_relative(got[k], want[k]) for k in want if want[k].dtype.kind == "f"])
    assert worst <= BOUND
    return worst


def test_importing_the_command_line_starts_no_jax_backend():
    """jax.distributed.initialize() must come before the first JAX computation: the imports may not compute."""
    script = "import manualgrad.cli, jax._src.xla_bridge as xb; print(len(xb._backends))"
    command, options = _manualgrad()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, **options)
    assert result.stdout.split() == ["0"]


def test_a_killed_process_stops_the_other_and_launch_resumes_the_run(tmp_path, one_process):
    """Process 1 is SIGKILLed mid-run: process 0 stops with an error within the timeout instead of hanging;
    `manualgrad launch --resume` then ends the run with the one-process run's metrics and parameters."""
    out = tmp_path / "run"
    port = distributed.free_port()
    flags = (*RUN, "--out", str(out), "--checkpoint-every", "10", "--process-timeout", str(TIMEOUT))
    processes = []
    for i in range(2):
        command, options = _manualgrad(
            "train", *flags, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)
        )
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options))
    deadline = time.time() + 180
    while not checkpoint.checkpoints(out) and time.time() < deadline and processes[0].poll() is None:
        time.sleep(0.005)
    processes[1].kill()
    killed = time.time()
    _, stderr = processes[0].communicate(timeout=3 * TIMEOUT + 30)
    waited = time.time() - killed
    processes[1].communicate()
    killed_at = _final(out)[1]
    assert 0 < killed_at < TOTAL, "the run finished before process 1 could be killed"
    assert processes[0].returncode != 0
    assert "another task died" in stderr or "heartbeat" in stderr, stderr
    assert waited <= 2 * TIMEOUT + 15, f"process 0 took {waited:.0f} s to stop"

    resumed = _run("launch", "--processes", "2", "--", "train", *flags, "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {killed_at}" in resumed.stdout
    assert f"({TOTAL} steps on 2 devices of 2 processes)" in resumed.stdout
    assert "process 1 of 2 done; process 0 wrote the run's files" in resumed.stdout
    print(
        f"process 0 stopped {waited:.1f} s after process 1 was killed at step {killed_at};",
        f"2 processes vs 1 process on 2 devices: max relative difference {_assert_same_run(out, one_process):.1e}",
    )


def _refused(capsys, *args):
    assert cli.main(["train", *RUN, *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize(
    "args, message",
    [
        (("--coordinator", "localhost:1234"), "--coordinator also needs --num-processes and --process-id"),
        (("--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"), "must be HOST:PORT"),
        (("--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"), "port from 1 to 65535"),
        (
            ("--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"),
            "--process-id must be from 0 to 1 (one less than --num-processes), got 2",
        ),
        (("--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"), "--num-processes must be ≥ 1"),
        (("--distributed", "auto", "--process-timeout", "0"), "--process-timeout must be > 0"),
        (("--distributed", "auto"), "a multi-process run needs --out DIR"),
    ],
)
def test_distributed_flags_that_cannot_work_are_refused_before_anything_runs(capsys, tmp_path, args, message):
    out = () if message.startswith("a multi") else ("--out", str(tmp_path))
    line = _refused(capsys, *args, *out)
    assert line.startswith("manualgrad train: ") and message in line
    assert list(tmp_path.iterdir()) == []


def test_distributed_auto_outside_a_cluster_says_what_to_give():
    result = _run("train", *RUN, "--distributed", "auto", "--out", "/nonexistent/never-written")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("manualgrad train: --distributed auto found no cluster to join")
    assert "--coordinator HOST:PORT --num-processes N --process-id I" in line


def test_launch_relays_each_process_s_lines_whole_without_gloo_s_notices(tmp_path):
    """gloo's C++ notices ("[Gloo] Rank 1 is connected to …") are left out, and the two processes'
    lines arrive whole, never mixed mid-line."""
    one_epoch = ("--model", "mlp", "--dataset", "xor", "--epochs", "1", "--cross-check-batches", "0")
    result = _run("launch", "--processes", "2", "--", "train", *one_epoch, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "Gloo" not in result.stdout + result.stderr
    known = ("run folder ", "epoch   1 ", "process 1 of 2 done;", "test accuracy ", "no cross-check ", "wrote ")
    assert all(line.startswith(known) for line in result.stdout.splitlines()), result.stdout
    assert "after 1 epoch (25 steps on 2 devices of 2 processes)" in result.stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--", "train", "--process-id", "1"], "--process-id are set by launch itself"),
        (["--", "check"], "give the command to run after --, e.g. -- train"),
        ([], "give the command to run after --"),
    ],
)
def test_launch_refuses_what_it_cannot_run(capsys, arguments, message):
    assert cli.main(["launch", "--processes", "2", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_exit_status_counts_a_signal_as_128_plus_its_number():
    assert [distributed.exit_status(c) for c in (0, 2, -signal.SIGKILL, -signal.SIGABRT)] == [0, 2, 137, 134]


def test_processes_started_with_other_arguments_stop_before_writing(tmp_path):
    """Another --lr on process 1 would train on a mixture silently: both processes refuse, nothing is written."""
    out, port = tmp_path / "run", distributed.free_port()
    processes = []
    for i, lr in enumerate(("0.003", "0.01")):
        command, options = _manualgrad(
            "train", *RUN, "--lr", lr, "--out", str(out), "--process-timeout", str(TIMEOUT),
            "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
        )  # fmt: skip
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options))
    for process in processes:
        _, stderr = process.communicate(timeout=3 * TIMEOUT + 60)
        assert process.returncode == 2
        assert "manualgrad train: process(es) 1 hold other arguments or another checkpoint than process 0" in stderr
    assert not out.exists()
