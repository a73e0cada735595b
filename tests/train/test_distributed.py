"""Multi-process data parallelism (``manualgrad.train.distributed``): 2 processes on localhost against one
process on 2 devices, a process killed mid-run, resume, the launcher, and the flags' errors."""

import subprocess
import sys

ROOT_ENV = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": "."}


def test_importing_the_command_line_starts_no_jax_backend():
    """jax.distributed.initialize() must come before the first JAX computation: the imports may not compute."""
    script = "import manualgrad.cli, jax._src.xla_bridge as xb; print(len(xb._backends))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ROOT_ENV, check=True)
    assert result.stdout.split() == ["0"]
