"""Test configuration: float64 available everywhere, and no silent rank broadcasting.

``jax_numpy_rank_promotion="raise"`` makes any backward rule (or test) that broadcasts
arrays of different ranks implicitly fail instead of hiding a wrong shape.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
