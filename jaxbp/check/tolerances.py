"""Pass/fail thresholds for gradient checks, one profile per dtype, each derived from a measurement.

A row passes when its relative error max|a-b| / max(floor, max|a|+max|b|) is at most the profile's
threshold for the kind of reference it was compared with:

- ``autodiff``: jax.grad / jax.vjp evaluated in the candidate's own dtype, at the same point.
- ``finite_differences``: central differences of the loss evaluated in float64 (step ``eps``).

How the numbers were measured: ``python experiments/tolerance_profiles.py`` runs `compare_grads`
over 60 seeded random specs per dtype (the sweep of ``python -m jaxbp.check``: stride 1-3,
VALID/SAME/explicit padding, dilation 1-2, C 1-3, K 1-4, n_out 1-3, batch 1-5 or one example) on
CPU and records, per kind of comparison, the largest relative and absolute errors
(experiments/results/tolerance_profiles.json; ``--max-elementwise 0`` measures the random-direction
test on every leaf, 30 specs, tolerance_profiles_directional.json). A threshold is the worst
relative error times a margin of 10 to 30, so rounding passes while a wrong derivation, off by
O(1), fails by orders of magnitude. The floor turns the test into an absolute one for leaves whose
gradients are tiny or exactly zero (float64 finite differences then return pure round-off, ~u|E|/eps,
and float32 gradients carry the forward's absolute rounding ~u32, however small they are):
floor x threshold is about 10 times the largest absolute error measured.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Tolerance(NamedTuple):
    """A tolerance profile.

    Attributes:
      dtype: the candidate gradients' dtype this profile is for.
      autodiff: max relative error against autodiff in the same dtype.
      finite_differences: max relative error against float64 central differences.
      floor: the relative error's denominator floor (see `jaxbp.check.metrics.relative_error`).
      eps: the finite-difference step (float64 central differences, for every dtype).
    """

    dtype: str
    autodiff: float
    finite_differences: float
    floor: float = 1e-2
    eps: float = 1e-5


# Measured on CPU (jax 0.10.2), 60 random specs x 3 leaves elementwise, 30 x 3 directional:
# float64: manual vs jax.grad and every chain term vs jax.vjp: 0 (bitwise equal: the same XLA ops);
#   the design's 1e-10 is kept for reordered sums on other backends (~1e-15). Manual (and autodiff)
#   vs float64 central differences, eps 1e-5: worst 2.2e-10 elementwise, 3.6e-10 along random
#   directions, largest absolute error 1.0e-11 -> threshold 1e-8, floor 1e-2 (1e-2 x 1e-8 = 1e-10).
# float32: float32 manual vs float32 jax.grad/jax.vjp: 0 on CPU; each is within the measured
#   float32-vs-float64 error below of the truth, so two float32 paths differ by at most twice that
#   -> threshold 1e-5. float32 manual vs float64 central differences: worst 3.4e-7 elementwise,
#   1.8e-7 along random directions, largest absolute error 2.8e-8 (the float32 rounding, u32 = 6e-8,
#   of forward values of order 1) -> threshold 1e-5, floor 3e-2 (3e-2 x 1e-5 = 3e-7).
TOLERANCES = {
    "float64": Tolerance(dtype="float64", autodiff=1e-10, finite_differences=1e-8, floor=1e-2),
    "float32": Tolerance(dtype="float32", autodiff=1e-5, finite_differences=1e-5, floor=3e-2),
}


def tolerance_for(dtype) -> Tolerance:
    """The profile for a dtype; ValueError for dtypes without a measured profile."""
    name = np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(
            f"dtype: no measured tolerance profile for {name} (have {sorted(TOLERANCES)}); "
            "pass tolerance=jaxbp.check.Tolerance(...) with thresholds you have measured"
        )
    return TOLERANCES[name]
