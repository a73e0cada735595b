"""`manualgrad check`'s persistent compilation cache: where it lives, how it is turned off, and
that a warm run reports what a cold one does while a changed rule is compiled afresh.

The suite runs with MANUALGRAD_NO_CACHE=1 (tests/conftest.py); these tests turn the cache on in
a folder of their own, in commands of their own: JAX decides at a process's first compile
whether it caches, so turning it on in this process would make later tests depend on it.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jaxlib
import numpy as np

from manualgrad.check import cache, timing

ROOT = pathlib.Path(__file__).resolve().parents[2]
BROKEN_IDENTITY = (
    "import sys\n"
    "from manualgrad import cli\n"
    "from manualgrad.rules import activations\n"
    "activations.identity.defvjp(activations.identity_forward, lambda res, g: (2 * g,))\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def test_cache_directory_default_environment_and_off(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.OFF_VARIABLE)
    monkeypatch.delenv(cache.DIRECTORY_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.directory() == tmp_path / "manualgrad" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.directory() == pathlib.Path.home() / ".cache" / "manualgrad" / "jax"
    monkeypatch.setenv(cache.DIRECTORY_VARIABLE, str(tmp_path / "mine"))
    assert cache.directory() == tmp_path / "mine"
    assert cache.directory(enabled=False) is None  # --no-cache
    monkeypatch.setenv(cache.OFF_VARIABLE, "0")
    assert cache.directory() == tmp_path / "mine"
    monkeypatch.setenv(cache.OFF_VARIABLE, "1")
    assert cache.directory() is None


def test_command_settings_restore_jax_and_xla_flags(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.OFF_VARIABLE)
    monkeypatch.setenv(cache.DIRECTORY_VARIABLE, str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    with cache.command_settings() as where:  # nothing is computed inside: this process keeps no cache
        assert where == tmp_path and jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == cache.MIN_COMPILE_SECONDS
        assert os.environ["XLA_FLAGS"].startswith("--xla_dump_to=/nowhere")
        fast = jaxlib.__version__.startswith(cache.FAST_FLAGS_JAXLIB) and cache._cpu_only()
        assert ("--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]) == fast
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/nowhere"


def _check(folder, *argv, script=None):
    env = {**os.environ, cache.DIRECTORY_VARIABLE: str(folder / "jax"), "PYTHONPATH": str(ROOT)}
    del env[cache.OFF_VARIABLE]
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "manualgrad"]
    return subprocess.run([*command, "check", *argv], capture_output=True, text=True, env=env, cwd=folder, timeout=300)


def test_warm_run_loads_what_the_cold_one_built_and_reports_the_same(tmp_path):
    cold = _check(tmp_path, "identity", "--json")
    assert cold.returncode == 0, cold.stderr
    entries = set((tmp_path / "jax").iterdir())
    assert entries  # every program, the eager ops' too (MIN_COMPILE_SECONDS)
    warm = _check(tmp_path, "identity", "--json")
    assert warm.returncode == 0, warm.stderr
    assert set((tmp_path / "jax").iterdir()) == entries  # nothing built anew
    assert warm.stdout == cold.stdout  # every record, every error to the last digit
    # A changed backward is a new program: built afresh and failed, never the cached right one.
    broken = _check(tmp_path, "identity", script=BROKEN_IDENTITY)
    assert broken.returncode == 1 and "FAIL identity, argument z" in broken.stdout, broken.stderr
    assert f"programs cached in {tmp_path / 'jax'}" in broken.stdout
    assert set((tmp_path / "jax").iterdir()) > entries


def test_no_cache_writes_nothing(tmp_path):
    off = _check(tmp_path, "identity", "--no-cache")
    assert off.returncode == 0 and "no compilation cache" in off.stdout, off.stderr
    assert not (tmp_path / "jax").exists()


def test_compile_share_of_overlapping_threads():
    assert timing.union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0
    clock = timing.CompileClock()
    clock._listen("/jax/core/compile/jaxpr_trace_duration", 0.0, 2.0)
    clock._listen("/jax/core/compile/backend_compile_duration", 1.0, 3.0)  # nested in the same thread: once
    clock._listen("/jax/some/other_event", 3.0, 9.0)
    clock._working = 6.0  # three seconds of compile in six of work: half of the wall time
    assert np.isclose(clock.compile_seconds(10.0), 5.0)
