"""Tests run with float64 available (each test chooses its dtype) and rank promotion off.

Hypothesis is derandomized (the same examples on every run and machine) and has no deadline:
each example compiles new shapes, which takes a few hundred milliseconds.

The README runs the tests in two worker processes (pytest-xdist). On a GPU each would take 75%
of the device's memory at start-up (JAX's default), so unless set otherwise they allocate as
they go (JAX's XLA_PYTHON_CLIENT_PREALLOCATE).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

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
