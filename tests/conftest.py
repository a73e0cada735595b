"""Test configuration: float64 available everywhere, no silent rank broadcasting, no compilation cache.

``jax_numpy_rank_promotion="raise"`` makes any backward rule (or test) that broadcasts
arrays of different ranks implicitly fail instead of hiding a wrong shape.
``MANUALGRAD_NO_CACHE`` keeps ``manualgrad check`` (in this process and in the commands the
tests start) off the user's persistent compilation cache: every test compiles what it runs,
whatever ran before it (tests/check/test_cache.py turns the cache on in a folder of its own).
"""

import os

import jax

os.environ["MANUALGRAD_NO_CACHE"] = "1"

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
