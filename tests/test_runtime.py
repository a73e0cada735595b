"""``manualgrad.runtime``: glibc's malloc settings that keep a step's freed block for the next step.

Each test allocates and frees an 80 MB block three times in a thread of a fresh interpreter and
counts the page faults: with glibc's defaults every block is mapped afresh, with the settings the
second and third reuse the first's pages.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from manualgrad import runtime
from manualgrad.errors import ManualgradError

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

_REALLOCATE = """
import resource, threading
faults = []
def step():  # one block above glibc's 64 MB thread-arena heap, as XLA:CPU allocates a step's temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(80 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
for _ in range(3):
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
print(faults)
"""


def _environment_without_settings() -> dict[str, str]:
    """This process's environment less any malloc setting, so that the child starts from glibc's defaults."""
    return {k: v for k, v in os.environ.items() if k not in runtime.REUSE_HOST_MEMORY and k != "GLIBC_TUNABLES"}


@glibc_only
@pytest.mark.parametrize("reuse", [False, True])
def test_the_reuse_settings_keep_a_step_blocks_pages(reuse, monkeypatch):
    """An 80 MB block allocated and freed by a thread, three times: with glibc's defaults each is
    mapped afresh, 20 480 pages (4 KiB) faulted in every time; started with
    ``REUSE_HOST_MEMORY`` the second and third reuse the first's pages (bound: 1 % of them, for
    the interpreter's own small allocations). ``host_memory`` names the settings either way."""
    env = _environment_without_settings()
    env |= runtime.REUSE_HOST_MEMORY if reuse else {}
    out = subprocess.run([sys.executable, "-c", _REALLOCATE], capture_output=True, text=True, check=True, env=env)
    faults = json.loads(out.stdout)
    assert faults[0] >= 0.9 * 20_480
    assert (max(faults[1:]) < 205) if reuse else (min(faults[1:]) >= 0.9 * 20_480), faults
    monkeypatch.setattr(runtime, "_applied", [])  # as in a process that has not called reuse_host_memory
    for name in ("GLIBC_TUNABLES", *runtime.REUSE_HOST_MEMORY):
        monkeypatch.delenv(name, raising=False)
    for name, value in (runtime.REUSE_HOST_MEMORY if reuse else {}).items():
        monkeypatch.setenv(name, value)
    expected = " ".join(f"{k}={v}" for k, v in runtime.REUSE_HOST_MEMORY.items()) if reuse else "defaults"
    assert runtime.host_memory() == expected


@glibc_only
@pytest.mark.parametrize("given", [False, True])
def test_reuse_host_memory_sets_them_from_python_unless_the_environment_does(given):
    """``reuse_host_memory()`` after importing jax and before computing, as the command line does:
    the second and third 80 MB blocks reuse the first's pages (bound as above). With a setting in
    the environment it leaves glibc alone (MALLOC_ARENA_MAX=8 alone keeps the blocks mapped afresh)."""

    env = _environment_without_settings()
    env |= {"MALLOC_ARENA_MAX": "8"} if given else {}
    script = "import jax\nfrom manualgrad import runtime\nprint(runtime.reuse_host_memory(), runtime.host_memory())\n"
    command = [sys.executable, "-c", script + _REALLOCATE]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    first, second = out.stdout.splitlines()
    faults = json.loads(second)
    if given:
        assert first == "False MALLOC_ARENA_MAX=8" and min(faults[1:]) >= 0.9 * 20_480, faults
    else:
        expected = " ".join(f"{k}={v}" for k, v in runtime.REUSE_HOST_MEMORY.items())
        assert first == f"True mallopt {expected}" and max(faults[1:]) < 205, faults


@glibc_only
def test_a_setting_that_glibc_refuses_is_a_manualgrad_error(monkeypatch):
    """If ``mallopt`` refuses a setting, the error names it and is both the library's and an ``OSError``."""
    import ctypes

    class Refusing:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Refusing())
    monkeypatch.setattr(runtime, "_applied", [])
    for name in ("GLIBC_TUNABLES", *runtime.REUSE_HOST_MEMORY):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(runtime.HostMemoryError, match="mallopt refused MALLOC_ARENA_MAX=1") as refused:
        runtime.reuse_host_memory()
    assert isinstance(refused.value, ManualgradError) and isinstance(refused.value, OSError)
