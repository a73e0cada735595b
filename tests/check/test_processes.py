"""``manualgrad check`` checks in processes what :func:`manualgrad.check` checks in threads."""

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import manualgrad
from manualgrad.check import processes


def test_processes_find_what_threads_find_to_the_last_digit(monkeypatch):
    """The same samples, keys and programs: equal findings, in the same order. Two rules of 9
    samples over 2 processes, so that each process checks samples of both. (The rules are
    unchanged here, so this process may stand for the command.)"""
    monkeypatch.setattr(processes, "command", lambda: True)
    names = ["identity", "relu"]
    in_threads = manualgrad.check(names)
    in_processes = processes.check(names, processes=2)
    assert len(in_processes.findings) == len(in_threads.findings) == 58
    np.testing.assert_equal(  # NaN equal to NaN: error_over_allowed of an exact check
        [dataclasses.astuple(f) for f in in_processes.findings], [dataclasses.astuple(f) for f in in_threads.findings]
    )
    assert in_processes.passed
    assert 0 < in_processes.compile_seconds < in_processes.seconds


def test_processes_refuse_a_bad_dtype_before_starting():
    try:
        processes.check(["identity"], dtype="float16")
    except ValueError as error:
        assert "dtype must be one of" in str(error)
    else:
        raise AssertionError("float16 accepted")


def test_a_program_that_calls_the_command_is_checked_in_its_own_process():
    """pytest is not the command: its rules may differ from a fresh process's."""
    assert not processes.command()


def _children(pid):
    """The pids whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _ignores_sigint(pid):
    """Whether process ``pid`` ignores SIGINT now (the SigIgn mask of Linux's /proc/PID/status)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:  # it ended
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & 1 << (signal.SIGINT - 1))


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_ctrl_c_stops_the_command_and_its_processes_with_one_line():
    """Ctrl-C in a terminal reaches the whole process group: the command stops with exit 130 and
    one line, no traceback (its own or a worker's), and leaves no worker behind.

    Ctrl-C is sent once the workers exist and the command has stopped ignoring SIGINT (it ignores it
    while it starts them, so that they inherit the ignoring): a press before that is lost by design.
    Checking every rule without the compilation cache is work enough that the command is still at
    it then, however loaded the machine."""
    command = [sys.executable, "-m", "manualgrad", "check", "--no-cache"]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command, **pipes, start_new_session=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        workers = _children(process.pid)
        if len(workers) >= min(2, processes.PROCESSES) and not _ignores_sigint(process.pid):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the command ended before its workers were at work"
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr == "manualgrad check: interrupted (Ctrl-C)\n" and stdout == ""
    deadline = time.time() + 10  # multiprocessing's resource tracker ends when it reads the command's exit
    while [w for w in workers if pathlib.Path(f"/proc/{w}").exists()] and time.time() < deadline:
        time.sleep(0.05)
    assert workers and not [w for w in workers if pathlib.Path(f"/proc/{w}").exists()]
