"""Tests that need two devices: they run where this process has them, else their file runs again in a
process of its own with two virtual CPU devices.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts its backend, and the
rest of the suite runs on one device (training shards its batch over every local device), so
the flag is set for those files' own process only.
"""

import os
import subprocess
import sys

import jax
import pytest

COUNT = 2
FLAG = f"--xla_force_host_platform_device_count={COUNT}"

present = jax.device_count() >= COUNT
# Marks a test that runs only where the process has the devices (the file's own process, see rerun).
needs_them = pytest.mark.skipif(not present, reason=f"needs {COUNT} devices: rerun() runs it in a process with them")


def rerun(path: str, timeout: int = 600) -> None:
    """Runs the test file ``path`` in a new process with :data:`COUNT` CPU devices; fails with the
    end of its output where any of its tests fails."""
    if present:
        pytest.skip(f"this process has {COUNT} devices: the file's tests ran in it")
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", path]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-6000:] + done.stderr[-2000:]
