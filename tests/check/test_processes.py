"""``manualgrad check`` checks in processes what :func:`manualgrad.check` checks in threads."""

import dataclasses

import numpy as np

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
