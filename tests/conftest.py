"""Test configuration: float64 available everywhere, no silent rank broadcasting, no compilation cache.

``jax_numpy_rank_promotion="raise"`` makes any backward rule (or test) that broadcasts
arrays of different ranks implicitly fail instead of hiding a wrong shape.
``MANUALGRAD_NO_CACHE`` keeps ``manualgrad check`` (in this process and in the commands the
tests start) off the user's persistent compilation cache: every test compiles what it runs,
whatever ran before it (tests/check/test_cache.py turns the cache on in a folder of its own).
The suite's programs build with the checker's fast-compile options (``cache.fast_eager_builds``:
no LLVM optimisation, one module, in ``XLA_FLAGS`` before the first computation, inherited by
the commands the tests start; on jaxlib 0.10 and the CPU only): the tests compile far more than
they run, and no test times anything.
Two CPU devices (``jax_num_cpu_devices``, read when JAX starts its backend, and unlike ``XLA_FLAGS``
not inherited by the commands the tests start): the rules inside ``jax.shard_map`` and the
collectives run over a mesh of two; everything else uses the first device, or shards over both.
"""

import os

import jax

from manualgrad.check import cache

os.environ["MANUALGRAD_NO_CACHE"] = "1"
cache.fast_eager_builds()

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
