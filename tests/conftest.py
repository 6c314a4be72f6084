"""Tests run with float64 available (each test chooses its dtype) and rank promotion off.

Hypothesis is derandomized (the same examples on every run and machine) and has no deadline:
each example compiles new shapes, which takes a few hundred milliseconds.
"""

import jax
from hypothesis import HealthCheck
from hypothesis import settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "jaxbp",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
settings.load_profile("jaxbp")
